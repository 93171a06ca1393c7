"""Bad inputs and faults (docs/RELIABILITY.md): for each, the message, the exit code and what is left on disk.

Runs go through ``grass_ft.cli.main`` in-process (fast); only the signal tests start a process. Each test names
its row of the table in docs/RELIABILITY.md (``R<n>``). The tiny model's tokenizer works per character, so a
prompt takes ~140 tokens: ``max_seq_len=192`` keeps the answers, 64 cuts every one away (R19).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grass_ft.run.checkpoint import check_same_run, checkpoint_problem, find_checkpoint, list_checkpoints
from grass_ft.frontends.cli import main
from grass_ft.config import ConfigError
from grass_ft.base.errors import UserError
from grass_ft.base.registry import traits

# method=grass (the paper's, with its measuring probe step, which updates nothing): the step numbers the tests below
# expect count that probe step
T = {"method": "grass", "max_steps": 3, "probe_steps": 1, "probe_mode": "measure", "batch_size": 2,
     "max_seq_len": 192, "eval_samples": 0, "gamma": 2}


def train_args(model, data, out, **extra) -> list[str]:
    return ["train", "--quiet", *[f"{k}={v}" for k, v in {"model": model, "data": data, "output_dir": out,
                                                           **T, **extra}.items()]]


def fails(capsys, *argv, code: int = 2) -> str:
    """Run the CLI in-process; assert the exit code and one error with no traceback; return stderr."""
    rc = main(list(map(str, argv)))
    cap = capsys.readouterr()
    assert rc == code, cap.err[-3000:]
    assert "Traceback" not in cap.err
    return cap.err


def runs(capsys, *argv) -> str:
    rc = main(list(map(str, argv)))
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-3000:]
    return cap.err


def listing(d: Path) -> dict[str, int]:
    """Every file under ``d`` with its modification time: equal listings mean nothing was touched."""
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*"))}


def strict_json(path: Path):
    def no_nan(c):
        raise AssertionError(f"{path} holds {c}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=no_nan)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tiny_data, tmp_path_factory):
    """A finished grass run with checkpoints 1 and 2 (seed 42); tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_args(tiny_model_dir, tiny_data, out, save_steps=1)) == 0
    return out


@pytest.fixture
def interrupted(finished, tmp_path):
    """A copy of :func:`finished` as if stopped after checkpoint-2: no final/, no summary.json."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sums(n: int, **extra) -> list[dict]:
    return [{"instruction": f"{i % 10}+1=", "input": "", "output": f"The answer is {i % 10 + 1}",
             "answer": str(i % 10 + 1), **extra} for i in range(n)]


# ------------------------------------------------------------------------------------------- the CLI itself


def test_r01_misspelled_key_did_you_mean(capsys):
    assert "unknown key `gama` (did you mean `gamma`?)" in fails(capsys, "validate", "gama=3")
    assert "unknown key `sample_intervall` (did you mean `sample_interval`?)" in fails(
        capsys, "validate", "sample_intervall=3")
    assert "(did you mean `max_new_tokens`?)" in fails(capsys, "eval", "model=x", "data=y", "max_new_token=3")


def test_r02_config_file_missing(tmp_path, capsys):
    msg = fails(capsys, "validate", "--config", tmp_path / "nope.yaml")
    assert f"config file {tmp_path / 'nope.yaml'}: No such file or directory" in msg


def test_r03_debug_switch_shows_the_traceback(capsys, monkeypatch):
    with pytest.raises(ConfigError, match="`tau` must be > 0"):
        main(["--debug", "validate", "tau=0"])
    monkeypatch.setenv("GRASS_FT_DEBUG", "1")
    with pytest.raises(UserError):
        main(["validate", "tau=0"])
    monkeypatch.delenv("GRASS_FT_DEBUG")
    assert "`tau` must be > 0" in fails(capsys, "validate", "tau=0")


def test_r04_unknown_command(capsys):
    assert "unknown command 'trian'" in fails(capsys, "trian")


def test_r05_eval_unknown_task_and_missing_model(tmp_path, tiny_data, capsys):
    msg = fails(capsys, "eval", f"model={tmp_path}/m", f"data={tiny_data}", "task=gsm9k")
    assert "`task`: no answer rule for task 'gsm9k'; known tasks:" in msg
    msg = fails(capsys, "eval", f"model={tmp_path}/m", f"data={tiny_data}", "task=gsm8k",
                f"output_dir={tmp_path / 'ev'}")
    assert f"model directory {tmp_path}/m does not exist" in msg
    assert not (tmp_path / "ev").exists()


# --------------------------------------------------------------------------------------------------- data


def test_r06_non_utf8_data_names_the_line(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "latin1.jsonl"
    rows = [json.dumps(r) for r in sums(4)]
    latin1 = '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")
    data.write_bytes(("\n".join(rows[:2]) + "\n").encode() + latin1)
    out = tmp_path / "run"
    msg = fails(capsys, *train_args(tiny_model_dir, data, out))
    offset = len(("\n".join(rows[:2]) + "\n").encode()) + len('{"instruction": "caf')
    assert f"{data}:3: not valid UTF-8 (byte 0xe9 at offset {offset}); save the file as UTF-8" in msg
    assert not out.exists()  # R24: no empty output_dir when a data check fails
    assert f"{data}:3: not valid UTF-8" in fails(capsys, "validate", f"data={data}", f"output_dir={out}")


def test_r07_unknown_task_in_the_data_fails_before_the_model(tmp_path, tiny_model_dir, tiny_data, capsys):
    held = write_jsonl(tmp_path / "held.jsonl", sums(3) + sums(1, task="gsm9k"))
    out = tmp_path / "run"
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, eval_data=held, eval_samples=4))
    assert f"{held}: held-out example 3: no answer rule for task 'gsm9k'" in msg
    assert not out.exists()


def test_r08_gold_answer_without_a_number(tmp_path, tiny_model_dir, tiny_data, capsys):
    held = write_jsonl(tmp_path / "held.jsonl", [{**sums(1)[0], "answer": "seven"}])
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, tmp_path / "run", eval_data=held, eval_samples=1))
    assert "held-out example 0: gold answer 'seven' for task 'gsm8k' holds no number" in msg


def test_r09_every_answer_truncated_is_refused_with_the_count(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = tmp_path / "run"
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, max_seq_len=64))
    assert (f"{tiny_data}: all 64 training examples lose their whole answer to truncation at max_seq_len=64 "
            f"(the prompt fills it), so every label is masked") in msg
    assert not out.exists()


def test_r10_some_answers_truncated_warns_with_the_count(tmp_path, tiny_model_dir, capsys):
    long = [{**r, "instruction": "x" * 200 + r["instruction"]} for r in sums(5)]
    data = write_jsonl(tmp_path / "mixed.jsonl", sums(20) + long)
    err = runs(capsys, *train_args(tiny_model_dir, data, tmp_path / "run"))
    assert "warning: 5 of 25 training examples lose their whole answer to truncation at max_seq_len=192" in err
    assert (tmp_path / "run" / "summary.json").is_file()


def test_r11_fewer_examples_than_one_batch(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "three.jsonl", sums(3))
    msg = fails(capsys, *train_args(tiny_model_dir, data, tmp_path / "run", batch_size=4))
    assert f"{data}: 3 training examples, fewer than one batch (batch_size=4 = 4); lower batch_size" in msg
    assert not (tmp_path / "run").exists()


def test_r12_too_few_examples_to_hold_out(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "four.jsonl", sums(4))
    msg = fails(capsys, *train_args(tiny_model_dir, data, tmp_path / "run", eval_samples=4))
    assert "has 4 examples, too few to hold out eval_samples=4" in msg


def test_r13_unknown_generator(capsys, tmp_path):
    msg = fails(capsys, "validate", "data=gsm-mixx", f"output_dir={tmp_path / 'run'}")
    assert "unknown data generator 'gsm-mixx'; known: gsm_symbolic" in msg


def test_r14_validate_reports_data_and_model_at_once(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"instruction": "\xff"}\n')
    msg = fails(capsys, "validate", f"data={data}", f"model={tmp_path / 'nomodel'}", f"output_dir={tmp_path / 'r'}")
    assert f"{data}:1: not valid UTF-8" in msg and f"model directory {tmp_path / 'nomodel'} does not exist" in msg


# -------------------------------------------------------------------------------------------------- model


def _model_dir(tmp_path: Path, tiny_model_dir: Path, edit) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    edit(d)
    return d


@pytest.mark.parametrize("edit, message", [
    (lambda d: [p.unlink() for p in d.iterdir()], "model directory {d} is empty"),
    (lambda d: (d / "config.json").write_text("{not json"), "{d}/config.json: not valid JSON"),
    (lambda d: (d / "config.json").write_text('{"hidden_size": 8}'), "{d}/config.json: no `model_type`"),
    (lambda d: (d / "config.json").write_text('{"model_type": "vit", "architectures": ["ViTModel"]}'),
     "model directory {d} holds a 'vit' model (ViTModel), which is not a causal language model"),
    (lambda d: (d / "config.json").write_text('{"model_type": "nosuch"}'),
     "{d}/config.json: transformers cannot read it"),
    (lambda d: (d / "model.safetensors").unlink(), "model directory {d} has no weights (expected one of"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     "{d}/model.safetensors is damaged"),
    (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
     "model directory {d} has no tokenizer"),
])
def test_r15_bad_model_directory_is_one_line_before_anything_is_written(tmp_path, tiny_model_dir, tiny_data,
                                                                        capsys, edit, message):
    d = _model_dir(tmp_path, tiny_model_dir, edit)
    out = tmp_path / "run"
    msg = fails(capsys, *train_args(d, tiny_data, out))
    assert message.format(d=d) in msg and msg.count("\n") == 1, msg
    assert not out.exists()


def test_r16_run_directory_given_as_model(finished, tiny_data, tmp_path, capsys):
    msg = fails(capsys, *train_args(finished, tiny_data, tmp_path / "run"))
    assert f"model directory {finished} has no config.json, so it is not a model directory; did you mean " \
           f"{finished / 'final'}?" in msg


def test_r17_missing_relative_path_never_asks_the_hub(tmp_path, tiny_data, capsys, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: calls.append(a) or 1 / 0)
    monkeypatch.chdir(tmp_path)
    for spec in ("./models/nope", "models/a/nope", "~/nope-model"):
        assert f"model directory {spec} does not exist" in fails(capsys, *train_args(spec, tiny_data, "run"))
    assert calls == []
    # "models/nope" could be a hub id: one quick look-up (here failing), no retries, one line
    t0 = time.perf_counter()
    msg = fails(capsys, *train_args("models/nope", tiny_data, "run"))
    assert "model 'models/nope' is not a local directory" in msg and "the hub cannot be reached" in msg
    assert calls == [("models/nope",)] and time.perf_counter() - t0 < 20
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "not in the hub cache (HF_HUB_OFFLINE is set)" in fails(capsys, *train_args("models/nope", tiny_data, "run"))
    assert len(calls) == 1 and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def mpt_dir(tmp_path_factory):
    """A tiny MPT: a causal LM whose block list (transformer.blocks) is not among the known paths."""
    from transformers import AutoModelForCausalLM, MptConfig
    from tiny import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=len(tok),
                                                       max_seq_len=512))
    d = tmp_path_factory.mktemp("mpt") / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_r18_model_without_a_known_block_list(mpt_dir, tiny_data, tmp_path, capsys):
    msg = fails(capsys, *train_args(mpt_dir, tiny_data, tmp_path / "a"))
    assert "cannot find the decoder blocks of MptForCausalLM (tried model.layers" in msg
    assert "set `layers_attribute` to the dotted path of its block list" in msg
    assert not (tmp_path / "a" / "final").exists()
    msg = fails(capsys, *train_args(mpt_dir, tiny_data, tmp_path / "b", layers_attribute="transformer.layers"))
    assert "`layers_attribute` 'transformer.layers' does not name a non-empty nn.ModuleList in MptForCausalLM" in msg
    runs(capsys, *train_args(mpt_dir, tiny_data, tmp_path / "c", layers_attribute="transformer.blocks"))
    assert len(jsonl(tmp_path / "c" / "layers.jsonl")[0]["mgn"]) == 2


def test_r19_tied_embeddings_train_save_and_reload_tied(tmp_path, tiny_data, capsys):
    from transformers import AutoModelForCausalLM
    from tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    src = tmp_path / "tied"
    tiny_llama(len(tok), tie=True).save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "run"
    runs(capsys, *train_args(src, tiny_data, out, train_embeddings="true", train_head="true", max_steps=4,
                             save_steps=2, lr=1e-2))
    m = AutoModelForCausalLM.from_pretrained(out / "final")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    before = AutoModelForCausalLM.from_pretrained(src).model.embed_tokens.weight
    assert not torch.equal(m.model.embed_tokens.weight, before)  # the one shared tensor was trained
    assert checkpoint_problem(out / "checkpoint-2") is None


# -------------------------------------------------------------------------------------------- output_dir


def test_r20_a_finished_run_is_never_replaced_unasked(finished, tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = listing(out)
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, seed=7))
    assert f"`output_dir` '{out}' already holds a run (config.yaml, metrics.jsonl, layers.jsonl, summary.json, " \
           f"final/, checkpoint-1/, ...); pass overwrite_output_dir=true to replace it, resume=auto to continue it" in msg
    assert listing(out) == before
    assert "already holds a run" in fails(capsys, "validate", f"output_dir={out}")


def test_r21_overwrite_replaces_the_whole_previous_run(finished, tiny_model_dir, tiny_data, tmp_path, capsys):
    """Issue 13 case 2: the older run's checkpoints go with it, so a later resume=auto cannot pick them."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    err = runs(capsys, *train_args(tiny_model_dir, tiny_data, out, seed=7, lr=5e-5, max_steps=2, save_steps=1,
                                   overwrite_output_dir="true"))
    assert (f"warning: overwrite_output_dir: replacing the previous run in {out} (config.yaml, metrics.jsonl, "
            f"layers.jsonl, summary.json, final, checkpoint-") in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["run"]["seed"] == 7 and state["run"]["lr"] == 5e-5
    assert strict_json(out / "summary.json")["seed"] == 7 and len(jsonl(out / "metrics.jsonl")) == 2


def test_r22_bad_resume_path_leaves_the_previous_run(finished, tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = listing(out)
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, resume=tmp_path / "nope",
                                    overwrite_output_dir="true"))
    assert f"`resume` '{tmp_path / 'nope'}' is not a complete checkpoint (no such directory)" in msg
    assert listing(out) == before


def test_r23_resume_on_a_finished_run_is_refused(finished, tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = listing(out)
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, save_steps=1, resume="auto"))
    assert "holds a finished run (summary.json, final); there is nothing to resume" in msg
    assert listing(out) == before


def test_r24_compare_refuses_a_previous_compare(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = tmp_path / "cmp"
    (out / "fft").mkdir(parents=True)
    (out / "fft" / "summary.json").write_text("{}")
    before = listing(out)
    msg = fails(capsys, "compare", "--quiet", "methods=fft,lora", f"model={tiny_model_dir}", f"data={tiny_data}",
                f"output_dir={out}")
    assert f"`output_dir` '{out}' already holds a compare (fft/); pass overwrite_output_dir=true" in msg
    assert listing(out) == before


def test_r25_resume_auto_without_checkpoint_starts_fresh(tiny_model_dir, tiny_data, tmp_path, capsys):
    runs(capsys, *train_args(tiny_model_dir, tiny_data, tmp_path / "new", resume="auto"))
    assert (tmp_path / "new" / "summary.json").is_file()


def test_r26_failed_write_is_one_line_and_leaves_no_temporary(tiny_model_dir, tiny_data, tmp_path, capsys,
                                                               monkeypatch):
    import errno

    import grass_ft.run.checkpoint as ck

    def full(model, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "save_model", full)
    out = tmp_path / "run"
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, save_steps=1))
    assert f"cannot write {out / 'checkpoint-1'}: No space left on device; earlier checkpoints are intact" in msg
    assert not (out / "final").exists() and not [p for p in out.iterdir() if p.name.startswith((".", "checkpoint"))]


def test_r27_outputs_get_the_usual_directory_mode(finished):
    mask = os.umask(0)
    os.umask(mask)
    for d in ("final", "checkpoint-1", "checkpoint-2"):
        assert (finished / d).stat().st_mode & 0o777 == 0o777 & ~mask, d


# ------------------------------------------------------------------------------------------------- resume


def test_r28_resume_refuses_another_runs_checkpoint(interrupted, tiny_model_dir, tiny_data, capsys):
    before = listing(interrupted)
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, interrupted, seed=7, lr=5e-5, resume="auto"))
    assert f"{interrupted / 'checkpoint-2'} belongs to a different run: lr={traits('grass').lr} there, 5e-05 here; " \
           f"seed=42 there, 7 here. Resume with the checkpoint's values" in msg
    assert listing(interrupted) == before


def test_r29_resume_with_another_method_leaves_config_yaml(interrupted, tiny_model_dir, tiny_data, capsys):
    config = (interrupted / "config.yaml").read_text()
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, interrupted, method="lora", resume="auto"))
    assert "belongs to a different run: method='grass' there, 'lora' here" in msg
    assert (interrupted / "config.yaml").read_text() == config


def test_r30_resume_continues_the_same_run(interrupted, finished, tiny_model_dir, tiny_data, capsys):
    runs(capsys, *train_args(tiny_model_dir, tiny_data, interrupted, save_steps=1, resume="auto",
                             eval_samples=0, logging_steps=1))
    assert jsonl(interrupted / "metrics.jsonl") [-1]["loss"] == jsonl(finished / "metrics.jsonl")[-1]["loss"]


def test_r31_damaged_newest_checkpoint_falls_back_with_a_warning(interrupted, finished, tiny_model_dir, tiny_data,
                                                                 capsys):
    weights = interrupted / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a truncated copy
    n = weights.stat().st_size
    err = runs(capsys, *train_args(tiny_model_dir, tiny_data, interrupted, save_steps=1, resume="auto"))
    assert (f"warning: skipping damaged {interrupted / 'checkpoint-2'} (model.safetensors has {n} bytes, {n + 100} "
            f"were written); resuming from {interrupted / 'checkpoint-1'}") in err
    assert jsonl(interrupted / "metrics.jsonl")[-1]["loss"] == jsonl(finished / "metrics.jsonl")[-1]["loss"]


def test_r32_every_checkpoint_damaged(interrupted, tiny_model_dir, tiny_data, capsys):
    for c in ("checkpoint-1", "checkpoint-2"):
        (interrupted / c / "trainer_state.json").write_text("{")
    before = listing(interrupted)
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, interrupted, resume="auto"))
    assert f"`resume=auto`: every checkpoint in {interrupted} is damaged" in msg
    assert "trainer_state.json is unreadable (JSONDecodeError)" in msg
    assert listing(interrupted) == before


def test_r33_damaged_checkpoint_named_by_path(interrupted, tiny_model_dir, tiny_data, capsys):
    (interrupted / "checkpoint-2" / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated")
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, interrupted, resume=interrupted / "checkpoint-2"))
    assert "is not a complete checkpoint (optimizer.pt has 14 bytes, " in msg


def test_r34_checkpoint_without_a_run_record_and_other_world_size(tmp_path):
    with pytest.raises(UserError, match="does not record the run that wrote it"):
        check_same_run(tmp_path, None, {"seed": 1})
    with pytest.raises(UserError, match="world_size=2 there, 1 here"):
        check_same_run(tmp_path, {"seed": 1, "world_size": 2}, {"seed": 1, "world_size": 1})
    check_same_run(tmp_path, {"seed": 1}, {"seed": 1, "new_key": 3})  # a key only one side knows is not compared


# --------------------------------------------------------------------------------------------- divergence


def test_r35_huge_lr_stuck_at_uniform_loss_is_stopped(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, lr=1e6))
    assert f"training diverged at step 2: the loss is {math.log(103):.4f} = ln(vocabulary size), a uniform guess" in msg
    assert "lower `lr` (now 1e+06)" in msg
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert [m["step"] for m in jsonl(out / "metrics.jsonl")] == [0, 1, 2]


def test_r35_stuck_rule_zero_gradient_and_what_is_not_stuck():
    """SmolLM2 at lr=1e6 (issue 13) showed grad_norm 0, the tiny model shows NaN: both are stuck at ln(V).
    A random model starts ~0.5% from ln(V) with a real gradient: not stuck."""
    from grass_ft.run.divergence import DivergenceWatch
    from grass_ft.base.errors import DivergenceError

    v = 49152
    w = DivergenceWatch(max_bad_steps=5, vocab=v, lr=1e6)
    assert w.is_stuck(math.log(v), 0.0) and w.is_stuck(math.log(v) * (1 + 5e-5), float("nan"))
    assert not w.is_stuck(math.log(v), 0.3) and not w.is_stuck(math.log(v) * 0.995, 0.0)
    assert not w.is_stuck(math.log(v), None)  # a probe step has no gradient norm
    w.observe(0, 10.9, None, probe=True, skipped=False)
    w.observe(1, 10.2, 0.8, probe=False, skipped=False)
    w.observe(2, math.log(v), 0.0, probe=False, skipped=False)  # one stuck step: not yet stopped ...
    with pytest.raises(DivergenceError, match=r"at step 2: the loss is 10.8027 = ln\(vocabulary size\).* zero "
                                              r"gradient norm for 1 step\(s\) up to step 2"):
        w.check_end()  # ... but a run must not end on it
    w.observe(3, 10.1, 0.5, probe=False, skipped=False)
    w.check_end()  # recovered


def _nan_from(monkeypatch, steps: set[int]):
    """Make the tiny Llama's loss NaN at the given forward calls (one forward per step here).

    The decoder body is patched, not the causal-LM wrapper, so that both loss paths (the full forward and the
    supervised-only loss, which calls the body directly) see the NaN.
    """
    from transformers import LlamaModel

    original, calls = LlamaModel.forward, [0]

    def forward(self, *a, **k):
        out = original(self, *a, **k)
        if self.training:
            calls[0] += 1
            if calls[0] - 1 in steps:
                out.last_hidden_state = out.last_hidden_state * float("nan")
        return out

    monkeypatch.setattr(LlamaModel, "forward", forward)


def test_r36_non_finite_steps_stop_the_run_and_log_the_last_step(tiny_model_dir, tiny_data, tmp_path, capsys,
                                                                 monkeypatch):
    _nan_from(monkeypatch, set(range(2, 100)))
    out = tmp_path / "run"
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, max_steps=10, max_bad_steps=3))
    assert "training diverged at step 2: 3 consecutive step(s) up to step 4 had a non-finite loss" in msg
    metrics = jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4] and metrics[-1]["skipped"]
    assert not (out / "final").exists() and not (out / "summary.json").exists()


def test_r37_short_run_that_never_recovers_fails_at_the_end(tiny_model_dir, tiny_data, tmp_path, capsys,
                                                            monkeypatch):
    """Issue 13 case 3: max_steps < max_bad_steps used to exit 0 with an untrained final/."""
    _nan_from(monkeypatch, {1, 2})
    out = tmp_path / "run"
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, out))
    assert "training diverged at step 1: 2 consecutive step(s) up to step 2 had a non-finite loss" in msg
    assert not (out / "final").exists() and not (out / "summary.json").exists()


def test_r38_one_bad_step_is_skipped_and_summary_is_strict_json(tiny_model_dir, tiny_data, tmp_path, capsys,
                                                                monkeypatch):
    _nan_from(monkeypatch, {1})
    out = tmp_path / "run"
    runs(capsys, *train_args(tiny_model_dir, tiny_data, out, max_steps=4))
    s = strict_json(out / "summary.json")
    assert s["skipped_steps"] == 1 and math.isfinite(s["final_train_loss"])
    assert s["eval_loss"] is None  # unset values are null, never NaN


def test_r38b_out_of_device_memory_is_one_line_naming_the_keys_that_fit_and_keeps_the_checkpoint(
        tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    """A device that runs out of memory (the default `fft` keeps all its optimizer state there) is the user's to
    fix by keys: one line, exit 2, the checkpoint already written intact, nothing that looks finished."""
    from grass_ft.method.step import StepRunner

    real, calls = StepRunner.train_step, [0]

    def oom_at_second(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StepRunner, "train_step", oom_at_second)
    out = tmp_path / "run"
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, method="fft", save_steps=1))
    assert msg.strip().splitlines()[-1:] == [  # after the warning that fft ignores T's sampling keys
        "grass-ft train: error: out of device memory with method=fft (CUDA out of memory. Tried to allocate 2.00 "
        "GiB); the run is not finished (no final/, checkpoints already written are intact). To fit: method=grass-uniform "
        "trains gamma blocks at a time with their optimizer state on the host (far below fft's peak: "
        "docs/gpu_memory.md), or lower batch_size (with grad_accum to keep the batch) or max_seq_len, or set "
        "gradient_checkpointing=true"]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert checkpoint_problem(out / "checkpoint-1") is None
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    calls[0] = 0  # LISA keeps its state on the device too: offload is the first key to try
    msg = fails(capsys, *train_args(tiny_model_dir, tiny_data, tmp_path / "lisa", method="lisa", max_steps=2))
    assert msg.strip().endswith("To fit: lower gamma (now 2), set offload=true, or lower batch_size (with "
                                "grad_accum to keep the batch) or max_seq_len, or set gradient_checkpointing=true")


def test_r38c_a_training_probe_sweep_that_lasts_the_whole_run_is_warned(tiny_model_dir, tiny_data, tmp_path,
                                                                        capsys):
    """The training probe visits every block gamma at a time: 4 blocks, gamma 2, probe_steps 2 take 4 steps."""
    args = train_args(tiny_model_dir, tiny_data, tmp_path / "a", probe_mode="train", probe_steps=2, max_steps=4)
    assert ("grass-ft: warning: probe_mode=train: the sweep over 4 blocks, gamma=2 at a time and probe_steps=2 steps "
            "each, takes 4 steps, the whole run of 4: method=grass will never draw by importance. Raise max_steps or "
            "gamma, lower probe_steps, or set probe_mode=measure") in runs(capsys, *args)
    assert "warning" not in runs(capsys, *train_args(tiny_model_dir, tiny_data, tmp_path / "b", probe_mode="train",
                                                     probe_steps=2, max_steps=5))  # step 4 draws by importance


# ------------------------------------------------------------------------------------------------ signals


def test_r39_ctrl_c_in_process_without_checkpoints(tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    from grass_ft.method.step import StepRunner

    def interrupt(self, step, mbs, forward=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(StepRunner, "train_step", interrupt)
    args = train_args(tiny_model_dir, tiny_data, tmp_path / "run")
    err = fails(capsys, *args, code=130)
    assert err.strip() == (f"grass-ft train: interrupted; no checkpoint was written (save_steps=N writes them); "
                           f"`{shlex.join(['grass-ft', *map(str, args), 'resume=auto'])}` starts the run again")
    monkeypatch.undo()  # the printed command works from that state (issue 28): it trains the run to the end
    assert main(shlex.split(err.split("`")[1])[1:]) == 0 and (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize("sig,code,said", [(signal.SIGINT, 130, "interrupted"),
                                           (signal.SIGTERM, 143, "terminated (SIGTERM)")], ids=["SIGINT", "SIGTERM"])
def test_r40_signal_exits_with_the_checkpoint_intact(tiny_model_dir, tiny_data, tmp_path, sig, code, said):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, tiny_data, out, max_steps=100000, save_steps=2, save_total_limit=1)
    # SIGINT as a terminal delivers it: a test run in the background (`make test &`, some CI runners) hands its
    # children SIGINT ignored, and Python then installs no KeyboardInterrupt handler; restore the default
    proc = subprocess.Popen([sys.executable, "-m", "grass_ft.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(out):
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        f"grass-ft train: {said}; the newest checkpoint, ")
    newest = find_checkpoint(out, "auto")
    assert f"{newest}, is intact: `{shlex.join(['grass-ft', *args, 'resume=auto'])}` continues from it" in err
    assert checkpoint_problem(newest) is None and not (out / "final").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_r42_a_second_run_on_a_directory_in_use_is_refused_and_removes_nothing(tiny_model_dir, tiny_data,
                                                                                 tmp_path, capsys):
    from grass_ft.run.outputs import LOCK_NAME, output_dir_lock

    out = tmp_path / "run"
    runs(capsys, *train_args(tiny_model_dir, tiny_data, out, save_steps=2))
    assert not (out / LOCK_NAME).exists()  # a finished run leaves no lock file
    before = listing(out)
    with output_dir_lock(out):  # as a run in progress holds it (another open file: flock conflicts in-process too)
        holder = (out / LOCK_NAME).read_text()
        err = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, overwrite_output_dir="true"))
        assert err.strip() == (f"grass-ft train: error: `output_dir` {str(out)!r} is in use by another run "
                               f"({holder}); wait for it to end or choose another output_dir")
        assert holder.startswith(f"pid {os.getpid()} on ")
        assert {k: v for k, v in listing(out).items() if k != LOCK_NAME} == before  # nothing removed or written
    # a lock file whose run was killed (no process holds it) does not block: the next run takes it over
    (out / LOCK_NAME).write_text("pid 1 on elsewhere")
    runs(capsys, *train_args(tiny_model_dir, tiny_data, out, overwrite_output_dir="true"))
    assert (out / "final").is_dir() and not (out / LOCK_NAME).exists()


def test_r41_only_what_a_killed_write_leaves_is_cleaned(tmp_path):
    from grass_ft.base.atomic import remove_dir, remove_stale_temporaries

    debris = [".trash-ab12cd34", ".final-ab12cd34", ".checkpoint-8-ab12cd34", ".summary.json.tmp"]
    for name in debris[:3]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("x")
    (tmp_path / debris[3]).write_text("{")
    kept = [".git", ".keep", "notes.txt", "checkpoint-4", ".final"]
    for name in kept:
        (tmp_path / name).mkdir() if "." not in name[1:] else (tmp_path / name).write_text("x")
    assert remove_stale_temporaries(tmp_path) == sorted(debris)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    remove_dir(tmp_path / "checkpoint-4")  # pruning: renamed away first, so never half-deleted under its name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(kept) - {"checkpoint-4"})
