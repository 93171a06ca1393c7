"""Generation, log-likelihood scoring, held-out loss and the written files, on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from grass_ft.evaluation import evaluate as ev
from grass_ft.evaluation import scoring
from grass_ft.data import format_prompt, tokenize_example
from grass_ft.evaluation.evalsets import load_eval_file, load_eval_sets
from grass_ft.base.tasks import choice_target

DATA = Path(__file__).parent / "data"


def _corpus() -> list[str]:
    texts = [format_prompt({"instruction": "x", "input": ""}), format_prompt({"instruction": "x", "input": "y"})]
    for f in (DATA / "commonsense_mc.jsonl", DATA / "llm_adapters" / "ARC-Easy" / "test.json",
              DATA / "llm_adapters" / "gsm8k" / "test.json"):
        for ex in load_eval_file(f, task="gsm8k"):
            texts += [ex["instruction"], ex["output"]]
    return texts + ["the correct answer is answer1 answer2 answer3 answer4 answer5 0123456789"] * 3


def make_tokenizer(pad: bool = True):
    """A byte-level BPE tokenizer trained in-process (no hub): ``<eos>`` is id 0, ``<pad>`` id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>" if pad else None)


def make_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, eos_token_id=0, pad_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    # wider logits than the default init, so greedy choices are far from ties
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    return model.float()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(len(tok))


@pytest.fixture(scope="module")
def mc_examples():
    return load_eval_file(DATA / "commonsense_mc.jsonl")


# ----------------------------------------------------------------------------------------------- generate


def test_left_padded_batches_match_unbatched(monkeypatch, model, tok, mc_examples):
    prompts = [format_prompt(ex) for ex in mc_examples[:5]]  # different lengths -> real padding
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1
    calls = []
    real_generate = model.generate

    def spy(**kwargs):  # records (rows, prompt width, new tokens, left-padded?) of each generate call
        seqs = real_generate(**kwargs)
        width = kwargs["input_ids"].shape[1]
        mask = kwargs["attention_mask"]
        calls.append((seqs.shape[0], width, seqs.shape[1] - width, bool(mask[:, -1].all()), bool(mask[:, 0].all())))
        return seqs

    monkeypatch.setattr(model, "generate", spy)
    model.train()
    batched = ev.generate(model, tok, prompts, max_new_tokens=8, batch_size=3, progress=False)
    single = [ev.generate(model, tok, [p], max_new_tokens=8, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(b for b in batched)  # a random model does not stop at once
    assert [c[0] for c in calls[:2]] == [3, 2] and all(c[2] <= 8 for c in calls)
    assert all(c[3] for c in calls)  # every row's last prompt position is a real token: left padding
    assert not all(c[4] for c in calls[:2])  # and some batched row was really padded
    assert model.training and tok.padding_side == "right"  # both restored


def test_generate_stops_at_eos(tok):
    model = make_model(len(tok))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[0] = 0  # all logits 0: argmax is id 0, which is <eos>
    out = ev.generate(model, tok, ["a", "bb bb"], max_new_tokens=5, batch_size=2, progress=False)
    assert out == ["", ""]


def test_generate_without_pad_token_uses_eos_and_restores(model, tok):
    no_pad = make_tokenizer(pad=False)
    assert no_pad.pad_token is None
    prompts = ["a b", "a much longer prompt here"]
    assert ev.generate(model, no_pad, prompts, 4, 2, progress=False) == ev.generate(model, tok, prompts, 4, 2,
                                                                                   progress=False)
    assert no_pad.pad_token is None and no_pad.padding_side == "right"


def test_generate_rejects_bad_arguments(model, tok):
    with pytest.raises(ValueError, match="`max_new_tokens` must be a positive integer, got 0"):
        ev.generate(model, tok, ["a"], max_new_tokens=0, batch_size=1)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got -1"):
        ev.generate(model, tok, ["a"], max_new_tokens=1, batch_size=-1)


# ------------------------------------------------------------------------------------------ loglik scoring


def _hand_logprob(model, tok, example, label) -> float:
    prompt = tok(format_prompt(example))["input_ids"]
    target = tok(choice_target(label), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
    return sum(logp[len(prompt) + k - 1, t].item() for k, t in enumerate(target))


def test_choice_logprobs_match_hand_computation(model, tok, mc_examples):
    mc_examples = mc_examples[:4]
    scores = ev.choice_logprobs(model, tok, mc_examples, None, batch_size=3, progress=False)
    assert [list(s) for s in scores[:3]] == [["true", "false"], ["true", "false"], ["solution1", "solution2"]]
    got, want = [], []
    for ex, s in zip(mc_examples, scores):
        for label, value in s.items():
            got.append(value)
            want.append(_hand_logprob(model, tok, ex, label))
    # batched (right-padded) and unpadded forwards differ only by float32 summation order: the padded positions
    # are masked to exact zeros, and the reductions along the hidden size (K <= 128, 2 blocks, the head K = 64)
    # may be blocked differently for another batch shape. First order, each value -- a sum over the ~10 target
    # tokens of a log-softmax over 400 logits of std ~8 (the head is N(0, 1): |value| up to ~220) -- moves by
    # the reductions' K u ~ 64 x 6e-8 ~ 4e-6 of its terms' magnitude per matmul on its path, ~1e-5 over the
    # path: rtol 1e-5 of the value, and atol 1e-4 for values near 0 (a term's rounding, |z| u x 10 tokens x K)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-4)
    preds = ev.score_choices(model, tok, mc_examples, None, batch_size=4, progress=False)
    assert preds == [choice_target(max(s, key=s.get)) for s in scores]


def test_loglik_picks_the_trained_answer(tok):
    """A few steps of training on one option make log-likelihood scoring choose it."""
    model = make_model(len(tok), seed=1)
    ex = {"instruction": "Please choose: sky?\n\nAnswer format: answer1/answer2/answer3", "input": "",
          "output": choice_target("answer3"), "answer": "answer3", "task": "arc-e"}
    feats = tokenize_example(tok, ex, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    ids, labels = torch.tensor([feats["input_ids"]]), torch.tensor([feats["labels"]])
    for _ in range(8):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    result = ev.evaluate_examples(model, tok, [ex], mode="loglik", batch_size=2, progress=False)
    assert result["accuracy"] == 1.0 and result["predictions"][0]["extracted"] == "answer3"


# ----------------------------------------------------------------------------------------- evaluate_examples


def test_evaluate_examples_scores_and_groups(monkeypatch, tok, model):
    examples = [
        {"instruction": "q1", "input": "", "output": "", "answer": "21"},
        {"instruction": "q2", "input": "", "output": "", "answer": "950", "task": "svamp"},
        {"instruction": "q3", "input": "", "output": "", "answer": "answer2", "task": "ARC-Easy"},
        {"instruction": "q4", "input": "", "output": "", "answer": "[3.75]"},
    ]
    canned = ["The answer is 21.", "so 1,000", "the correct answer is answer2", "nothing"]
    monkeypatch.setattr(scoring, "generate", lambda *a, **k: list(canned))
    r = ev.evaluate_examples(model, tok, examples, "gsm8k", progress=False)
    assert [p["correct"] for p in r["predictions"]] == [True, False, True, False]
    assert [p["extracted"] for p in r["predictions"]] == [21.0, 1000.0, "answer2", None]
    assert [p["task"] for p in r["predictions"]] == ["gsm8k", "svamp", "arc-e", "gsm8k"]
    assert r["predictions"][0]["prompt"] == format_prompt(examples[0])
    assert r["accuracy"] == 0.5 and r["n"] == 4
    assert r["per_task"] == {"gsm8k": {"accuracy": 0.5, "n": 2}, "svamp": {"accuracy": 0.0, "n": 1},
                             "arc-e": {"accuracy": 1.0, "n": 1}}


def test_evaluate_examples_checks_before_running(model, tok, mc_examples):
    with pytest.raises(ValueError, match="`mode` must be one of generate, loglik, got 'beam'"):
        ev.evaluate_examples(model, tok, mc_examples, mode="beam")
    with pytest.raises(ValueError, match="no examples"):
        ev.evaluate_examples(model, tok, [], "gsm8k")
    with pytest.raises(ValueError, match="no 'task' key and no default task"):
        ev.evaluate_examples(model, tok, [{"instruction": "q", "output": "", "answer": "1"}])
    with pytest.raises(ValueError, match="holds no number"):
        ev.evaluate_examples(model, tok, [{"instruction": "q", "output": "", "answer": "x"}], "gsm8k")
    with pytest.raises(ValueError, match="task 'gsm8k' has no fixed answer options"):
        ev.evaluate_examples(model, tok, [{"instruction": "q", "output": "", "answer": "1"}], "gsm8k",
                             mode="loglik")


def test_evaluate_examples_generate_on_tiny_model(model, tok, mc_examples):
    r = ev.evaluate_examples(model, tok, mc_examples, mode="generate", max_new_tokens=4, batch_size=4,
                             progress=False)
    assert r["n"] == 8 and set(r["per_task"]) == {"boolq", "piqa", "siqa", "hellaswag", "winogrande", "obqa",
                                                    "arc-c"}
    loglik = ev.evaluate_examples(model, tok, mc_examples, mode="loglik", batch_size=4, progress=False)
    assert all(p["extracted"] is not None for p in loglik["predictions"])  # loglik always names an option


# ----------------------------------------------------------------------------------------------- eval_loss


def test_eval_loss_matches_hand_computation(model, tok):
    examples = load_eval_sets(DATA / "llm_adapters")["gsm8k"] + load_eval_file(DATA / "commonsense_mc.jsonl")[:3]
    total, count = 0.0, 0
    for ex in examples:
        f = tokenize_example(tok, ex, 200)  # long prompts are cut: truncated examples count too
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
        labels = torch.tensor(f["labels"])
        total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
        count += int((labels[1:] != -100).sum())
    assert count > 20
    want = torch.tensor(total / count)
    for batch_size in (1, 2, 4):  # token-weighted: independent of how examples are batched
        got = torch.tensor(ev.eval_loss(model, tok, examples, max_seq_len=200, batch_size=batch_size))
        # both are sums of the same per-token cross-entropies (float64 on the host here, fp32 per batch there)
        # over the ~10^3 target tokens, divided by the same count: the fp32 batch sums add ~n u of a mean loss
        # ~6 (n <= 200 tokens per row: ~1e-5 relative of a row's sum) -- assert_close's float32 default (rtol
        # 1.3e-6 + atol 1e-5) holds for the mean, where those errors average over the rows
        torch.testing.assert_close(got, want)


def test_eval_loss_errors(model, tok):
    ex = {"instruction": "a long instruction " * 20, "input": "", "output": "x", "answer": "1"}
    with pytest.raises(ValueError, match="no output tokens to score.*max_seq_len=8"):
        ev.eval_loss(model, tok, [ex], max_seq_len=8, batch_size=1)


# ------------------------------------------------------------------------------------------ files / run_eval


def _check_files(out: Path, result: dict) -> None:
    saved = json.loads((out / "eval.json").read_text())
    lines = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == saved["n"] == result["n"]
    assert saved["accuracy"] == sum(l["correct"] for l in lines) / len(lines) == result["accuracy"]
    assert set(lines[0]) == {"prompt", "generated", "extracted", "gold", "correct", "task"}
    for task, d in saved["per_task"].items():
        mine = [l for l in lines if l["task"] == task]
        assert d["n"] == len(mine) and d["accuracy"] == sum(l["correct"] for l in mine) / len(mine)


def test_write_eval(tmp_path, monkeypatch, model, tok):
    examples = [{"instruction": f"q{i}", "input": "", "output": "", "answer": str(i)} for i in range(5)]
    monkeypatch.setattr(scoring, "generate", lambda *a, **k: ["0", "1", "x", "4", "4"])
    result = ev.evaluate_examples(model, tok, examples, "gsm8k", progress=False)
    result["eval_loss"] = 1.25
    paths = ev.write_eval(tmp_path / "out", result)
    _check_files(tmp_path / "out", result)
    assert json.loads(paths["eval"].read_text())["eval_loss"] == 1.25
    assert result["accuracy"] == 0.6
    bad = dict(result, accuracy=0.9)
    with pytest.raises(ValueError, match="accuracy 0.9 disagrees with its predictions"):
        ev.write_eval(tmp_path / "bad", bad)
    with pytest.raises(ValueError, match="no 'predictions' list"):
        ev.write_eval(tmp_path / "bad", {"accuracy": 1.0})


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, model, tok):
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", ["generate", "loglik"])
def test_run_eval_on_saved_model(tmp_path, saved_model, mode):
    data = DATA / "commonsense_mc.jsonl"
    result = ev.run_eval(saved_model, data, None, 3, tmp_path, mode=mode, max_new_tokens=4, batch_size=4,
                         max_seq_len=256, progress=False)
    assert result["n"] == 8 and result["mode"] == mode and result["eval_loss"] > 0
    assert result["model_note"] is None
    _check_files(tmp_path, result)


def test_run_eval_on_peft_adapter(tmp_path, saved_model, tok):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved_model)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert (adapter / "adapter_config.json").is_file()
    result = ev.run_eval(adapter, DATA / "llm_adapters", "ARC-Easy", None, tmp_path / "out", mode="loglik",
                         batch_size=4, max_seq_len=256, progress=False)
    _check_files(tmp_path / "out", result)
    # the loaded adapter scores like the in-memory peft model, and differs from the base model
    arc = load_eval_sets(DATA / "llm_adapters", ["arc-e"])["arc-e"]
    loaded, _ = ev.load_for_eval(adapter)
    from_disk = ev.choice_logprobs(loaded, tok, arc, None, 4, False)
    in_memory = ev.choice_logprobs(peft_model, tok, arc, None, 4, False)
    with peft_model.disable_adapter():
        plain = ev.choice_logprobs(peft_model, tok, arc, None, 4, False)
    flat = lambda scores: torch.tensor([v for s in scores for v in s.values()])  # noqa: E731
    # the same weights (safetensors round-trips fp32 bit for bit) and the same ops: equal, so the default float32
    # tolerance is only headroom; the base model differs by the adapter's effect, O(1) in a log-probability
    torch.testing.assert_close(flat(from_disk), flat(in_memory))
    assert not torch.allclose(flat(from_disk), flat(plain))


def test_run_eval_rejects_bad_options(tmp_path, saved_model):
    with pytest.raises(ValueError, match="`mode` must be one of generate, loglik"):
        ev.run_eval(saved_model, DATA / "commonsense_mc.jsonl", mode="sample")


# ------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
@pytest.mark.real_model
def test_run_eval_real_smollm2(tmp_path, capsys):
    """`grass-ft eval` on the base SmolLM2 over a held-out GSM-style file and a multiple-choice file."""
    from grass_ft.frontends.cli import main
    from grass_ft.data import EVAL_SEED_OFFSET, generate_examples

    gsm_file = tmp_path / "gsm_heldout.jsonl"
    gsm_file.write_text("".join(json.dumps(ex) + "\n" for ex in generate_examples("gsm_symbolic", 8, EVAL_SEED_OFFSET)))
    assert main(["eval", "model=smollm2-135m", f"data={gsm_file}", "task=gsm8k", "eval_samples=8",
                 f"output_dir={tmp_path / 'gsm'}", "max_new_tokens=16", "batch_size=8"]) == 0
    assert "accuracy" in capsys.readouterr().out
    gsm = json.loads((tmp_path / "gsm" / "eval.json").read_text())
    assert gsm["n"] == 8
    assert "4-bit" in gsm["model_note"]  # results from the packaged model must carry the quantisation caveat
    _check_files(tmp_path / "gsm", gsm)
    assert main(["eval", "model=smollm2-135m", f"data={DATA / 'commonsense_mc.jsonl'}", "mode=loglik",
                 f"output_dir={tmp_path / 'mc'}", "batch_size=8"]) == 0
    mc = json.loads((tmp_path / "mc" / "eval.json").read_text())
    assert mc["n"] == 8
    _check_files(tmp_path / "mc", mc)
    lines = [json.loads(ln) for ln in (tmp_path / "mc" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["extracted"] is not None for p in lines)


def test_eval_loss_by_task_matches_per_task_calls(model, tok):
    gsm = load_eval_sets(DATA / "llm_adapters")["gsm8k"]
    mc = load_eval_file(DATA / "commonsense_mc.jsonl")[:3]
    examples = [dict(ex, task="gsm8k") for ex in gsm] + [dict(ex, task="mc") for ex in mc]
    overall, per_task = ev.eval_loss_by_task(model, tok, examples, max_seq_len=200, batch_size=3)
    assert set(per_task) == {"gsm8k", "mc"}
    # per-task and overall means of the same per-token losses, grouped into other batches: the fp32 batch sums
    # differ by reordering (n u of the sum, n <= 200 tokens per row, ~1e-5 relative of a row's loss sum); the
    # means over ~10^3 tokens (~6 nats) stay inside the float32 default (atol 1e-5 + rtol 1.3e-6 x 6 ~ 1.8e-5)
    for name, subset in (("gsm8k", examples[:len(gsm)]), ("mc", examples[len(gsm):])):
        torch.testing.assert_close(torch.tensor(per_task[name]),
                                   torch.tensor(ev.eval_loss(model, tok, subset, max_seq_len=200, batch_size=1)))
    torch.testing.assert_close(torch.tensor(overall),
                               torch.tensor(ev.eval_loss(model, tok, examples, max_seq_len=200, batch_size=2)))
    assert min(per_task.values()) < overall < max(per_task.values())  # token-weighted mean of the two


# ------------------------------------------------------------------------------------- the one entry point


def test_evaluate_entry_point_keys_loss_and_accuracy_by_one_task_rule(model, tok):
    """Issue 13: "GSM8K" and "gsm8k" are one task for per-task loss as for accuracy; answerless rows (and
    loss-only tasks) count in the loss only."""
    rows = [{"instruction": "1+1=", "input": "", "output": "2", "answer": "2", "task": "GSM8K"},
            {"instruction": "2+2=", "input": "", "output": "4", "answer": "4", "task": "gsm8k"},
            {"instruction": "3+3=", "input": "", "output": "6", "answer": "6"},  # the run's task
            {"instruction": "say hi", "input": "", "output": "hi"},  # no answer: loss only
            {"instruction": "true?", "input": "", "output": "true", "answer": "true", "task": "BoolQ"}]
    res = ev.evaluate(model, tok, rows, task="gsm8k", max_new_tokens=2, batch_size=2, max_seq_len=128,
                      progress=False)
    assert set(res["eval_loss_per_task"]) == {"gsm8k", "boolq"}
    assert set(res["per_task"]) == {"gsm8k", "boolq"} and res["per_task"]["gsm8k"]["n"] == 3
    assert res["n"] == 4
    # the overall loss is the token-weighted mean of the per-task ones, and equals eval_loss on all rows
    # the same batches (batch_size 2) in the same order through the same code: equal up to the float64 division
    # of the token-weighted sums (<= 2 ulps), far inside rel 1e-6
    assert res["eval_loss"] == pytest.approx(ev.eval_loss(model, tok, rows, 128, 2), rel=1e-6)
    only = ev.evaluate(model, tok, rows, task="gsm8k", loss_only="BOOLQ", max_new_tokens=2, batch_size=2,
                       max_seq_len=128, progress=False)
    assert set(only["per_task"]) == {"gsm8k"} and set(only["eval_loss_per_task"]) == {"gsm8k", "boolq"}
    from grass_ft.config import ConfigError

    with pytest.raises(ConfigError, match=r"'arc-e' is not a task of the held-out examples \(their tasks: boolq, "
                                          r"gsm8k\)"):
        ev.evaluate(model, tok, rows, task="gsm8k", loss_only="arc_easy", progress=False)
