"""Data through `datasets`: every format from local files, chat templates (SmolLM2's own), which tokens carry
loss, evaluation prompts rendered as in training, `validate`'s row-level errors, and the tokenisation cache."""

import json
from types import SimpleNamespace

import pytest

from grass_ft import data as data_mod
from grass_ft import data as formats
from grass_ft.frontends.cli import main
from grass_ft.data import IGNORE_INDEX, DataError
from grass_ft.model import cache_dir

SMOL = cache_dir() / "smollm2-135m"
needs_smol = pytest.mark.skipif(not (SMOL / "tokenizer.json").is_file(),
                                reason="the packaged SmolLM2 tokenizer is prepared by `make setup`")

# A ChatML template of our own for the character tokenizer of tests/tiny.py (it has no template of its own).
CHATML = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '<eos>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")

MULTI_TURN = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"}], "answer": "4", "task": "gsm8k"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(data, **kw):
    base = dict(data=str(data), eval_data=None, train_samples=8, eval_samples=0, seed=0, data_format="auto",
                data_split="train", eval_split="test", data_config=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOL)


@pytest.fixture
def char_tok():
    from tiny import char_tokenizer

    return char_tokenizer()


def supervised_runs(enc, tok):
    """The decoded text of each maximal run of tokens whose label is not IGNORE_INDEX."""
    runs, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == t  # a supervised label is the token itself (the model shifts)
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


# ----------------------------------------------------------------------------------------- each format


@pytest.mark.parametrize("fmt,rows,suffix", [
    ("alpaca", [{"instruction": "1+1=", "input": "", "output": "2", "answer": "2"}] * 3, ".json"),
    ("prompt_completion", [{"prompt": "1+1=", "completion": "2"}] * 3, ".jsonl"),
    ("messages", [MULTI_TURN] * 3, ".jsonl"),
    ("text", [{"text": "one two three"}] * 3, ".csv"),
    ("text", [{"text": "one two three"}] * 3, ".parquet"),
])
def test_each_format_loads_from_a_local_file_and_is_detected(tmp_path, fmt, rows, suffix):
    import datasets

    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        write_jsonl(path, rows)
    else:
        ds = datasets.Dataset.from_list(rows)
        ds.to_csv(str(path), index=False) if suffix == ".csv" else ds.to_parquet(str(path))
    ds, got = data_mod.load_rows(str(path))
    assert got == fmt and len(ds) == 3
    # a directory of such files loads too (datasets infers the builder from the files)
    ds2, got2 = data_mod.load_rows(str(tmp_path))
    assert got2 == fmt and len(ds2) == 3


def test_plain_prompt_completion_masks_the_prompt(char_tok):
    enc = formats.encode({"prompt": "ab", "completion": "cd"}, char_tok, 64)
    assert supervised_runs(enc, char_tok) == ["cd<eos>"]
    assert enc["input_ids"][:2] == char_tok("ab")["input_ids"]


def test_text_format_supervises_every_token(char_tok):
    enc = formats.encode({"text": "abc"}, char_tok, 64)
    assert enc["labels"] == enc["input_ids"] == char_tok("abc")["input_ids"] + [char_tok.eos_token_id]


def test_explicit_format_and_a_row_that_does_not_fit(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "prompt": "p", "completion": "c"},
                                              {"text": "b", "prompt": "p"}])
    assert data_mod.load_rows(str(path), "text")[1] == "text"
    with pytest.raises(DataError, match=r"d\.jsonl:2: `prompt` and `completion` must both be strings"):
        data_mod.load_rows(str(path))  # auto: prompt + completion columns -> prompt_completion


# ------------------------------------------------------------------------------- chat template, real model


@needs_smol
def test_multi_turn_messages_loss_on_every_assistant_turn_with_smollm2_template(smol_tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [MULTI_TURN, {"messages": MULTI_TURN["messages"][1:3]}])
    ds, fmt = data_mod.load_rows(str(path))
    tokenised = data_mod.tokenize_dataset(ds, smol_tok, fmt, 512)
    assert supervised_runs(tokenised[1], smol_tok) == ["Hello!<|im_end|>"]  # one turn, default system prompt
    enc = tokenised[0]
    assert enc == formats.encode(MULTI_TURN, smol_tok, 512)
    # exactly the two assistant turns, each with its end-of-turn token; the "\n" after it and every
    # system/user token (and the role headers) carry no loss
    assert supervised_runs(enc, smol_tok) == ["Hello!<|im_end|>", "4<|im_end|>"]
    full = smol_tok.apply_chat_template(MULTI_TURN["messages"], tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full
    assert enc["input_ids"] == list(full)  # the template's own tokenisation, nothing added
    # train_on_inputs widens the loss to every token
    wide = formats.encode(MULTI_TURN, smol_tok, 512, train_on_inputs=True)
    assert wide["labels"] == wide["input_ids"]


@needs_smol
def test_eval_prompt_is_the_training_prefix_before_the_last_assistant_turn(smol_tok):
    enc = formats.encode(MULTI_TURN, smol_tok, 512)
    prompt = formats.prompt_ids(MULTI_TURN, smol_tok)
    assert enc["input_ids"][:len(prompt)] == prompt
    last_run_start = max(i for i, lab in enumerate(enc["labels"])
                         if lab != IGNORE_INDEX and enc["labels"][i - 1] == IGNORE_INDEX)
    assert last_run_start == len(prompt)
    assert formats.prompt_text(MULTI_TURN, smol_tok).endswith("<|im_start|>user\n2+2?<|im_end|>\n"
                                                             "<|im_start|>assistant\n")


@needs_smol
def test_conversational_prompt_completion_supervises_the_completion_only(smol_tok):
    row = {"prompt": MULTI_TURN["messages"][:2] + [{"role": "assistant", "content": "Hello!"},
                                                    {"role": "user", "content": "2+2?"}],
           "completion": [{"role": "assistant", "content": "4"}]}
    assert supervised_runs(formats.encode(row, smol_tok, 512), smol_tok) == ["4<|im_end|>"]


def test_messages_without_a_chat_template_is_a_clear_error_and_chat_template_fixes_it(tmp_path, char_tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [MULTI_TURN] * 4)
    loaded = data_mod.load_data(cfg_for(path))
    with pytest.raises(DataError, match=r"has no chat template; set chat_template=FILE\.jinja"):
        data_mod.prepare_tokenizer(char_tok, None, loaded.first_rows(), "tiny")
    tpl = tmp_path / "chatml.jinja"
    tpl.write_text(CHATML)
    data_mod.prepare_tokenizer(char_tok, str(tpl), loaded.first_rows(), "tiny")
    enc = data_mod.tokenize_dataset(loaded.train, char_tok, loaded.format, 256)[0]
    assert supervised_runs(enc, char_tok) == ["Hello!<eos>", "4<eos>"]
    with pytest.raises(DataError, match="`chat_template` file 'nope.jinja' does not exist"):
        data_mod.prepare_tokenizer(char_tok, "nope.jinja", loaded.first_rows(), "tiny")


def test_tokenisation_goes_through_a_cached_datasets_map(tmp_path, char_tok):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(20)])
    ds, fmt = data_mod.load_rows(str(path))
    first = data_mod.tokenize_dataset(ds, char_tok, fmt, 64)
    second = data_mod.tokenize_dataset(ds, char_tok, fmt, 64)
    assert first.cache_files and first.cache_files == second.cache_files  # the second map read the first's file
    assert first[3] == formats.encode(ds[3], char_tok, 64)
    assert data_mod.tokenize_dataset(ds, char_tok, fmt, 32).cache_files != first.cache_files  # settings count


def test_held_out_split_and_eval_data_keep_their_format(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [dict(MULTI_TURN, answer=str(i)) for i in range(10)])
    loaded = data_mod.load_data(cfg_for(path, eval_samples=3))
    assert len(loaded.train) == 7 and len(loaded.held) == 3 and loaded.format == "messages"
    assert all(ex["_format"] == "messages" for ex in loaded.held)
    assert sorted(ex["answer"] for ex in loaded.held) + sorted(r["answer"] for r in loaded.train) != []
    assert {ex["answer"] for ex in loaded.held}.isdisjoint(r["answer"] for r in loaded.train)


# -------------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("rows,where", [
    ([MULTI_TURN, {"messages": [{"role": "user", "content": "x"}]}], r"bad\.jsonl:2: `messages` has no assistant"),
    ([MULTI_TURN, {"messages": [{"role": "robot", "content": "x"}]}], r"bad\.jsonl:2: `messages`\[0\] has role 'robot'"),
    ([{"foo": 1}], r"cannot tell the data format from the columns \['foo'\]"),
])
def test_validate_reports_the_file_and_row_of_a_format_error(tmp_path, capsys, rows, where):
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["validate", f"data={bad}", "eval_samples=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(where, err), err


def test_validate_checks_parquet_rows_and_reports_ok(tmp_path, capsys):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}]).to_parquet(
        str(path))
    assert main(["validate", f"data={path}"]) == 2
    assert "d.parquet: row 2: `prompt` and `completion` must both be strings" in capsys.readouterr().err
    good = tmp_path / "g.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}] * 5).to_parquet(str(good))
    # eval_samples=0: 5 rows are too few to hold out the default 32, which validate reports as train would
    assert main(["validate", f"data={good}", "eval_samples=0", "batch_size=2"]) == 0
    assert "format prompt_completion, first 5 rows checked" in capsys.readouterr().out


def test_missing_hub_data_set_is_one_line(monkeypatch, capsys):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # the libraries read these at import, which an earlier test of the session did: offline for them too, or
    # load_dataset tries the (unreachable) hub and its retries take ~20 s
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["validate", "data=nobody/no-such-data-set"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hub data set 'nobody/no-such-data-set'" in err, err


def test_train_on_messages_end_to_end_with_chat_template_key(tmp_path, tiny_model_dir):
    from grass_ft.config import build_config
    from grass_ft.method.methods import method_names
    from grass_ft.run.train import run_train

    rows = [{"messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}],
             "answer": str(a + b)} for a in range(5) for b in range(5)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    tpl = tmp_path / "chatml.jinja"
    tpl.write_text(CHATML)
    out = tmp_path / "run"
    cfg = build_config(None, {"model": str(tiny_model_dir), "data": str(data), "chat_template": str(tpl),
                              "output_dir": str(out), "max_steps": "4", "batch_size": "2", "gamma": "2",
                              "probe_steps": "1", "eval_samples": "3", "max_new_tokens": "3",
                              "eval_before": "false"}, known_methods=method_names())
    summary = run_train(cfg, progress=False)
    assert summary["eval_n"] == 3 and summary["accuracy"] is not None and summary["eval_loss"] > 0
    preds = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    # evaluated on the prompt rendered by the same template as training, ending in the generation prompt
    assert all(p["prompt"].startswith("<user>") and p["prompt"].endswith("<eos><assistant>") for p in preds)


def test_validate_renders_rows_with_the_models_tokenizer(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [MULTI_TURN] * 3)
    # the tiny model's tokenizer has no chat template: validate says so before any training
    assert main(["validate", f"model={tiny_model_dir}", f"data={data}", "gamma=2", "eval_samples=0", "batch_size=2"]) == 2
    assert "chat.jsonl: row 1: the data is in a chat format (messages), but the tokenizer of model" in \
        capsys.readouterr().err
    tpl = tmp_path / "t.jinja"
    tpl.write_text(CHATML)
    assert main(["validate", f"model={tiny_model_dir}", f"data={data}", "gamma=2", "eval_samples=0", "batch_size=2", f"chat_template={tpl}"]) == 0
    tpl.write_text("{{ raise_exception('no system role here') }}")
    assert main(["validate", f"model={tiny_model_dir}", f"data={data}", "gamma=2", "eval_samples=0", "batch_size=2", f"chat_template={tpl}"]) == 2
    assert "row 1: the chat template fails on it: no system role here" in capsys.readouterr().err


def test_grass_ft_eval_on_a_messages_file(tmp_path, tiny_model_dir, capsys):
    rows = [{"messages": [{"role": "user", "content": f"{a}+1="}, {"role": "assistant", "content": str(a + 1)}],
             "answer": str(a + 1)} for a in range(4)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "ev"
    assert main(["eval", f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}", "max_new_tokens=2"]) == 2
    assert "examples without a `task` key need task=NAME" in capsys.readouterr().err
    assert main(["eval", f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}", "max_new_tokens=2",
                 "task=gsm8k"]) == 2
    assert "has no chat template; set chat_template=FILE.jinja" in capsys.readouterr().err
    tpl = tmp_path / "t.jinja"
    tpl.write_text(CHATML)
    assert main(["eval", f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}", "max_new_tokens=2",
                 "task=gsm8k", f"chat_template={tpl}"]) == 0
    preds = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in preds] == [f"<user>{a}+1=<eos><assistant>" for a in range(4)]
    assert json.loads((out / "eval.json").read_text())["eval_loss"] > 0
