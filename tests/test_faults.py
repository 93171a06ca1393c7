"""Issue 28's faults (docs/RELIABILITY.md, rows 79-106): a run that ends with a ruined model, two runs racing for one
output directory, interruption messages that must name a command that works, and the tail of bad inputs that got a
traceback. Each test asserts the message, the exit code, that no traceback is printed, and what is on disk; each
defect's test fails on the code before issue 28 (the docstrings say how).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shlex
import shutil
import struct
from pathlib import Path

import pytest
import torch
from test_reliability import _nan_from, fails, jsonl, listing, runs, strict_json, sums, train_args, write_jsonl

from grass_ft.run import train as train_mod
from grass_ft.run.checkpoint import checkpoint_problem, list_checkpoints
from grass_ft.frontends.cli import Terminated, main
from grass_ft.config import TrainConfig, _field_types


def one_line(err: str) -> str:
    """The error line of stderr (after any warning lines), asserting it is a single line."""
    lines = [ln for ln in err.strip().splitlines() if "warning:" not in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def data_copy(tiny_data, tmp_path_factory) -> Path:
    """A data file of this module's own, so that a test may edit it."""
    d = tmp_path_factory.mktemp("data28") / "sums.jsonl"
    shutil.copy(tiny_data, d)
    return d


@pytest.fixture(scope="module")
def finished28(tiny_model_dir, data_copy, tmp_path_factory):
    """A finished grass run with checkpoints 1 and 2 and a held-out evaluation of 4 examples."""
    out = tmp_path_factory.mktemp("finished28") / "run"
    assert main(train_args(tiny_model_dir, data_copy, out, save_steps=1, eval_samples=4, max_new_tokens=8)) == 0
    return out


@pytest.fixture
def interrupted28(finished28, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished28, out)
    for name in ("final", "summary.json", "eval.json", "predictions.jsonl"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    return out


# ------------------------------------------------------------------------ defect 1: exit 0 with a ruined model


FLOAT_KEYS = [k for k, t in _field_types(TrainConfig).items() if t in (float, float | None)]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_config_value_is_a_validate_error(key, value, capsys, tmp_path):
    """Every float key (found from TrainConfig, so a key added later is covered): before issue 28 weight_decay=inf
    validated and trained 4 steps into NaN weights, exit 0."""
    assert len(FLOAT_KEYS) >= 7  # tau, alpha, lora_alpha, lora_dropout, lr, weight_decay, max_grad_norm
    err = fails(capsys, "validate", f"{key}={value}", f"output_dir={tmp_path / 'run'}")
    assert one_line(err) == (f"grass-ft validate: error: invalid configuration: `{key}` must be a finite number, "
                             f"got {float(value)!r}")


def test_weight_decay_inf_is_refused_before_anything_is_written(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    err = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, weight_decay="inf", max_steps=4))
    assert "`weight_decay` must be a finite number, got inf" in one_line(err)
    assert not out.exists()


def test_a_run_that_ends_on_bad_steps_fails_and_saves_nothing(tiny_model_dir, tiny_data, tmp_path, capsys):
    """lr=1e30 without clipping: step 1 (the first update; step 0 is the probe) leaves weights whose loss is NaN
    at step 2, the last. Before issue 28 the end rule failed a run only when *every* update was bad, so this one
    exited 0 with final/ and a finite final_train_loss."""
    out = tmp_path / "run"
    err = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, lr="1e30", max_grad_norm=0))
    assert one_line(err).startswith("grass-ft train: error: training diverged at step 2: 1 consecutive step(s) up "
                                    "to step 2 had a non-finite loss or gradient norm; lower `lr` (now 1e+30)")
    assert "(the last good step was 1); no checkpoint was written before it" in err
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert [m["skipped"] for m in jsonl(out / "metrics.jsonl")] == [False, False, True]


def _nan_weight_after(monkeypatch, step: int):
    """After the optimizer step of ``step``, put a NaN into the embedding row of a token the data never uses: the
    losses stay finite, so only a check of the weights themselves can see it."""
    from grass_ft.method.step import StepRunner

    real = StepRunner.train_step

    def train_step(self, t, mbs, forward=None):
        res = real(self, t, mbs, forward=forward)
        if t == step:
            with torch.no_grad():
                self.p.model.get_input_embeddings().weight[-1, 0] = float("nan")
        return res

    monkeypatch.setattr(StepRunner, "train_step", train_step)


@pytest.mark.parametrize("bad_at, kept", [(1, ["checkpoint-1"]), (3, ["checkpoint-2", "checkpoint-3"])],
                         ids=["before-a-checkpoint", "at-the-last-step"])
def test_weights_that_are_not_finite_are_never_saved(tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch,
                                                     bad_at, kept):
    """Before issue 28 the weights were never checked: checkpoint-2 and final/ were written with the NaN, exit 0."""
    _nan_weight_after(monkeypatch, bad_at)
    out = tmp_path / "run"
    err = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, max_steps=4, save_steps=1))
    assert one_line(err).startswith(f"grass-ft train: error: training diverged: after step {bad_at} the weights are "
                                    f"not finite (1 of ")
    assert "tensors: model.embed_tokens.weight); an update up to step" in err
    assert f"the newest {out / kept[-1]}" in err
    assert [p.name for p in list_checkpoints(out)] == kept and checkpoint_problem(out / kept[-1]) is None
    assert not (out / "final").exists() and not (out / "summary.json").exists()


def test_a_bad_streak_writes_no_checkpoint_and_keeps_the_one_before(tiny_model_dir, tiny_data, tmp_path, capsys,
                                                                   monkeypatch):
    """Steps 3 and 4 have a NaN loss (max_bad_steps=2 stops the run at step 4). Before issue 28 checkpoint-4 was
    written from the bad step and pruned checkpoint-3 (save_total_limit=1), the last one from before it went bad."""
    _nan_from(monkeypatch, {3, 4, 5})
    out = tmp_path / "run"
    err = fails(capsys, *train_args(tiny_model_dir, tiny_data, out, max_steps=6, save_steps=1, save_total_limit=1,
                                    max_bad_steps=2))
    assert "warning: no checkpoint is written while steps are bad (since step 3); the checkpoints from before are " \
           "kept" in err
    assert one_line(err).startswith("grass-ft train: error: training diverged at step 3: 2 consecutive step(s) up "
                                    "to step 4")
    assert f"(the last good step was 2); the checkpoints from before it went bad are kept, the newest " \
           f"{out / 'checkpoint-3'} (a resume must keep lr" in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]


def test_summary_train_loss_is_the_last_steps_own(tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    """final_train_loss is the mean of the finite losses among the last 10 steps: never a figure from further back
    standing in for a skipped step."""
    _nan_from(monkeypatch, {11})
    out = tmp_path / "run"
    runs(capsys, *train_args(tiny_model_dir, tiny_data, out, max_steps=13))
    losses = [m["loss"] for m in jsonl(out / "metrics.jsonl")]
    tail = [x for x in losses[-10:] if math.isfinite(x)]
    # the same 9 floats (JSON round-trips a float exactly) summed in the same order: equal, not close
    assert len(tail) == 9 and strict_json(out / "summary.json")["final_train_loss"] == sum(tail) / 9


# ----------------------------------------------------------------- defect 2: a second run deletes the first


@pytest.mark.parametrize("resume", [None, "auto"], ids=["fresh", "resume"])
def test_a_run_that_finishes_while_another_starts_is_never_removed(tiny_model_dir, data_copy, finished28, tmp_path,
                                                                  capsys, monkeypatch, resume):
    """The interleaving, driven without sleeps: run B passes its checks (the directory empty, or an interrupted run
    to resume), and while it tokenises, run A starts and finishes there. B must then refuse under the lock and
    remove nothing. Before issue 28 B removed A's finished run (or its final/ and summary.json) and exited 0."""
    out = tmp_path / "run"
    if resume:  # an interrupted run that both A and B resume
        shutil.copytree(finished28, out)
        for name in ("final", "summary.json", "eval.json", "predictions.jsonl"):
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    extra = {"save_steps": 1, "eval_samples": 4, "max_new_tokens": 8, **({"resume": resume} if resume else {})}
    real, gap = train_mod._check_and_tokenize, []

    def check_and_tokenize(cfg, dist):
        inputs = real(cfg, dist)
        if not gap:  # run B, between its checks and its claim of output_dir: run A, start to finish
            gap.append("A")
            assert main(train_args(tiny_model_dir, data_copy, out, **extra)) == 0
        return inputs

    monkeypatch.setattr(train_mod, "_check_and_tokenize", check_and_tokenize)
    capsys.readouterr()
    rc = main(train_args(tiny_model_dir, data_copy, out, **extra))
    cap = capsys.readouterr()
    before_b = listing(out)
    assert rc == 2 and "Traceback" not in cap.err and gap == ["A"]
    said = ("holds a finished run (summary.json, final); there is nothing to resume" if resume else
            "already holds a run (config.yaml, metrics.jsonl, layers.jsonl, summary.json, final/, eval.json, ...)")
    assert cap.err.strip().splitlines()[-1].startswith(f"grass-ft train: error: `output_dir` {str(out)!r} {said}")
    assert (out / "final" / "model.safetensors").is_file() and (out / "summary.json").is_file()
    assert listing(out) == before_b and not (out / train_mod.LOCK_NAME).exists()


def test_the_decision_under_the_lock_sees_a_checkpoint_written_meanwhile(interrupted28):
    """The other half of deciding under the lock: a resume that planned on checkpoint-1 finds checkpoint-2 there."""
    import dataclasses

    from grass_ft.config import build_config
    from grass_ft.run.preflight import RunError

    cfg = dataclasses.replace(build_config(str(interrupted28 / "config.yaml")), output_dir=str(interrupted28),
                              resume="auto")
    with pytest.raises(RunError, match="changed while this run was starting .*checkpoint-2.*nothing was removed"):
        train_mod._decide_under_lock(cfg, 1, interrupted28 / "checkpoint-1")


# ------------------------------------------------------------- defect 3: messages that send the user into a wall


def test_sigterm_during_the_final_evaluation_names_a_command_that_finishes_it(tiny_model_dir, data_copy, finished28,
                                                                            tmp_path, capsys, monkeypatch):
    """Before issue 28 the line said that resume=auto continues the run, which then refused: "holds a finished
    run". Now it names `grass-ft eval` on final/, and that command (run here as printed) evaluates the same
    held-out examples with the run's settings: eval.json and predictions.jsonl equal the uninterrupted run's."""
    real = train_mod.evaluate_model

    def evaluate_model(model, tokenizer, examples, cfg, desc):
        if desc == "after":
            raise Terminated
        return real(model, tokenizer, examples, cfg, desc)

    monkeypatch.setattr(train_mod, "evaluate_model", evaluate_model)
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, data_copy, out, save_steps=1, eval_samples=4, max_new_tokens=8)
    line = one_line(fails(capsys, *args, code=143))
    cmd = f"grass-ft eval model={out / 'final'} output_dir={out}"
    assert line == (f"grass-ft train: terminated (SIGTERM); training finished and {out / 'final'} holds the trained "
                    f"model, but the evaluation after it was cut short (no summary.json): `{cmd}` evaluates it on the "
                    f"run's held-out examples")
    monkeypatch.undo()
    assert "holds a finished run (final)" in one_line(fails(capsys, *args, "resume=auto"))  # the wall it was
    assert main(shlex.split(line.split("`")[1])[1:]) == 0
    assert f"wrote {out}/eval.json and predictions.jsonl" in capsys.readouterr().out
    assert (out / "predictions.jsonl").read_text() == (finished28 / "predictions.jsonl").read_text()
    mine, theirs = (json.loads((d / "eval.json").read_text()) for d in (out, finished28))
    assert {k: mine[k] for k in ("eval_loss", "accuracy", "n")} == {k: theirs[k] for k in ("eval_loss", "accuracy", "n")}


@pytest.mark.parametrize("extra", [{"overwrite_output_dir": "true"}, {"resume": "auto"}], ids=["overwrite", "resume"])
def test_interrupted_before_the_output_dir_is_claimed_says_nothing_was_touched(tiny_model_dir, data_copy, finished28,
                                                                             tmp_path, capsys, monkeypatch, extra):
    """Ctrl-C while tokenising, over a finished run with overwrite_output_dir=true, or over an interrupted one with
    resume=auto: nothing was removed yet, and the same command (resume=auto kept) starts the run. Before issue 28
    the line said no checkpoint had been written, as if the run had begun, or named the checkpoint to resume."""
    out = tmp_path / "run"
    shutil.copytree(finished28, out)
    if "resume" in extra:
        for name in ("final", "summary.json", "eval.json", "predictions.jsonl"):
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    before = listing(out)

    def interrupt(cfg, dist):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_check_and_tokenize", interrupt)
    args = train_args(tiny_model_dir, data_copy, out, save_steps=1, eval_samples=4, max_new_tokens=8, **extra)
    line = one_line(fails(capsys, *args, code=130))
    assert line == (f"grass-ft train: interrupted; nothing in {out} was touched; "
                    f"`{shlex.join(['grass-ft', *args])}` starts the run")
    assert listing(out) == before
    monkeypatch.undo()
    assert main(shlex.split(line.split("`")[1])[1:]) == 0 and (out / "summary.json").is_file()


def _interrupted_write(monkeypatch, where: str):
    """A second Ctrl-C tearing down a write: the OSError (EBADF) raised while the first KeyboardInterrupt unwinds,
    as a file closed under a writer produces. ``where``: while the checkpoint's files are written (it never
    appears), or while older checkpoints are pruned (it is complete and in place)."""
    from grass_ft.run import checkpoint as ckpt

    # the second checkpoint's write, or its pruning of the first (the first prune: save_total_limit=1)
    name, torn_call = {"writing": ("save_model", 2), "pruning": ("remove_dir", 1)}[where]
    real, calls = getattr(ckpt, name), []

    def torn(*a, **k):
        calls.append(1)
        if len(calls) == torn_call:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise OSError(errno.EBADF, "Bad file descriptor") from None
        return real(*a, **k)

    monkeypatch.setattr(ckpt, name, torn)


@pytest.mark.parametrize("where, newest", [("writing", "checkpoint-1"), ("pruning", "checkpoint-2")])
def test_ctrl_c_during_a_save_tells_the_truth_about_the_disk(tiny_model_dir, tiny_data, tmp_path, capsys,
                                                            monkeypatch, where, newest):
    """Before issue 28 this exited 2 with "cannot write .../checkpoint-2: Bad file descriptor", although (when
    pruning) checkpoint-2 was complete."""
    _interrupted_write(monkeypatch, where)
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, tiny_data, out, max_steps=4, save_steps=1, save_total_limit=1)
    line = one_line(fails(capsys, *args, code=130))
    assert line.startswith(f"grass-ft train: interrupted; the newest checkpoint, {out / newest}, is intact: "
                           f"`{shlex.join(['grass-ft', *args, 'resume=auto'])}` continues from it")
    assert checkpoint_problem(out / newest) is None and not (out / "final").exists()


# ---------------------------------------------------------------------------------------------------- the tail


def _eval_dir(kind: str, finished: Path, tmp: Path) -> Path:
    """An output directory for `grass-ft eval` that already holds an evaluation: a finished run's or a plain one."""
    d = tmp / "ev"
    if kind == "run":
        shutil.copytree(finished, d)
    else:
        d.mkdir()
        shutil.copy(finished / "eval.json", d)
        shutil.copy(finished / "predictions.jsonl", d)
    return d


@pytest.mark.parametrize("kind, whose", [("run", "a training run's evaluation"), ("eval", "an earlier evaluation")])
def test_eval_never_replaces_an_evaluation_unasked(finished28, tiny_model_dir, tiny_data, tmp_path, capsys, kind,
                                                   whose):
    d = _eval_dir(kind, finished28, tmp_path)
    before = listing(d)
    argv = ["eval", f"model={tiny_model_dir}", f"data={tiny_data}", "task=gsm8k", "eval_samples=2",
            "max_new_tokens=4", f"output_dir={d}"]
    assert one_line(fails(capsys, *argv)) == (
        f"grass-ft eval: error: invalid configuration: `output_dir` {str(d)!r} already holds eval.json and "
        f"predictions.jsonl ({whose}); pass overwrite_output_dir=true to replace them, or choose another output_dir")
    assert listing(d) == before
    assert main([*argv, "overwrite_output_dir=true"]) == 0
    assert (f"grass-ft eval: warning: overwrite_output_dir: replacing eval.json and predictions.jsonl ({whose}) in "
            f"{d}") in capsys.readouterr().err
    assert json.loads((d / "eval.json").read_text())["n"] == 2


def _damaged_results(tmp: Path) -> list[str]:
    (tmp / "cmp").mkdir()
    (tmp / "cmp" / "results.json").write_text('[{"method": "fft",\n')
    return ["plot", tmp / "cmp"]


def _latin1_yaml(tmp: Path) -> list[str]:
    (tmp / "c.yaml").write_bytes(b"lr: 1e-4\nmodel: caf\xe9\n")
    return ["validate", "--config", tmp / "c.yaml"]


def _small_vocab_model(tmp: Path, data: Path) -> list[str]:
    """A model of 50 embedding rows saved with the 103-character tokenizer."""
    from tiny import char_tokenizer, tiny_llama

    d = tmp / "model50"
    tiny_llama(50).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return train_args(d, data, tmp / "run")


def _latin1_csv(tmp: Path) -> list[str]:
    (tmp / "d.csv").write_bytes(b"instruction,input,output,answer\n1+1=,,The answer is 2,2\ncaf\xe9,,x,1\n")
    return ["validate", f"data={tmp / 'd.csv'}", f"output_dir={tmp / 'run'}"]


def _rows(fmt: str, tmp: Path, model: Path) -> list[str]:
    row = {"prompt_completion": {"prompt": "1+1=", "completion": "2"},
           "messages": {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]},
           "text": {"text": "1+1=2"}}[fmt]
    data = write_jsonl(tmp / f"{fmt}.jsonl", [row] * 12)
    return train_args(model, data, tmp / "run", eval_samples=4)


def _nan_model(tmp: Path, data: Path) -> list[str]:
    from tiny import char_tokenizer, tiny_llama

    d, model = tmp / "nanmodel", tiny_llama(len(char_tokenizer()))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    model.save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return train_args(d, data, tmp / "run")


# (id, argv builder (tmp, tiny model, tiny data) -> argv, the line's start, its expected text, what is on disk)
TAIL = [
    ("eval-batch-size-0", lambda t, m, d: ["eval", f"model={m}", f"data={d}", "task=gsm8k", "batch_size=0"],
     "grass-ft eval: error: invalid configuration: `batch_size` must be >= 1, got '0'", None),
    ("eval-max-new-tokens-0", lambda t, m, d: ["eval", f"model={m}", f"data={d}", "task=gsm8k", "max_new_tokens=0"],
     "grass-ft eval: error: invalid configuration: `max_new_tokens` must be >= 1, got '0'", None),
    ("eval-max-seq-len-1", lambda t, m, d: ["eval", f"model={m}", f"data={d}", "task=gsm8k", "max_seq_len=1"],
     "grass-ft eval: error: invalid configuration: `max_seq_len` must be >= 8, got '1'", None),
    ("eval-loglik-on-gsm8k", lambda t, m, d: ["eval", f"model={m}", f"data={d}", "task=gsm8k", "mode=loglik",
                                              "eval_samples=2"],
     "grass-ft eval: error: invalid configuration: `mode` loglik: evaluation data {d}, example 0: task 'gsm8k' has "
     "no fixed answer options, so it cannot be scored by log-likelihood", None),
    ("eval-output-dir-a-file", lambda t, m, d: ["eval", f"model={m}", f"data={d}", "task=gsm8k", f"output_dir={d}"],
     "grass-ft eval: error: invalid configuration: `output_dir` '{d}' is not writable: Not a directory ({d})", None),
    ("train-output-dir-a-file", lambda t, m, d: train_args(m, d, d),
     "grass-ft train: error: `output_dir` '{d}' is not writable: Not a directory ({d})", None),
    ("plot-damaged-results", lambda t, m, d: _damaged_results(t),
     "grass-ft plot: error: {t}/cmp/results.json:2: not valid JSON (Expecting property name enclosed in double "
     "quotes); the file is damaged", lambda t: not (t / "cmp" / "loss.png").exists()),
    ("yaml-not-utf8", lambda t, m, d: _latin1_yaml(t),
     "grass-ft validate: error: invalid configuration: {t}/c.yaml:2: not valid UTF-8 (byte 0xe9 at offset 19); save "
     "the file as UTF-8", None),
    ("tokenizer-beyond-vocab", lambda t, m, d: _small_vocab_model(t, d),
     "grass-ft train: error: the tokenizer of model '{t}/model50' produces token id ", lambda t: not (t / "run").exists()),
    ("csv-latin1", lambda t, m, d: _latin1_csv(t),
     "grass-ft validate: error: {t}/d.csv:3: not valid UTF-8 (byte 0xe9 at offset 59); save the file as UTF-8",
     None),
    ("prompt-completion-default-task", lambda t, m, d: _rows("prompt_completion", t, m),
     "grass-ft train: error: {t}/prompt_completion.jsonl: held-out example 0: no gold answer to score it by "
     "task=gsm8k (format prompt_completion rows carry none): add an `answer` field to the rows (and set task= to its "
     "answer rule), or set eval_loss_only_tasks=gsm8k to score the held-out loss only (or eval_samples=0)",
     lambda t: not (t / "run").exists()),
    ("messages-default-task", lambda t, m, d: _rows("messages", t, m),
     "grass-ft train: error: {t}/messages.jsonl: held-out example 0: no gold answer to score it by task=gsm8k "
     "(format messages rows carry none)", lambda t: not (t / "run").exists()),
    ("text-default-task", lambda t, m, d: _rows("text", t, m),
     "grass-ft train: error: {t}/text.jsonl: held-out example 0: format text rows have no prompt to answer, so "
     "task=gsm8k cannot score them; set eval_loss_only_tasks=gsm8k", lambda t: not (t / "run").exists()),
    ("nan-in-the-base-weights", lambda t, m, d: _nan_model(t, d),
     "grass-ft train: error: model '{t}/nanmodel' holds weights that are not finite (model.layers.1.mlp.up_proj."
     "weight): the model files are damaged or were saved from a diverged run", lambda t: not (t / "run").exists()),
    ("train-output-dir-empty", lambda t, m, d: train_args(m, d, ""),
     "grass-ft train: error: invalid configuration: `output_dir` must name a directory (empty would write the run "
     "into the current directory), got ''", lambda t: list(Path.cwd().iterdir()) == []),
    ("eval-output-dir-empty", lambda t, m, d: ["eval", f"model={m}", f"data={d}", "task=gsm8k", "output_dir="],
     "grass-ft eval: error: invalid configuration: `output_dir` must name a directory (empty would write into the "
     "current directory)", lambda t: list(Path.cwd().iterdir()) == []),
]


@pytest.mark.parametrize("build, said, on_disk", [c[1:] for c in TAIL], ids=[c[0] for c in TAIL])
def test_tail_bad_input_is_one_line(build, said, on_disk, tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    """Each of these printed a traceback (or, for the data formats and the NaN weights, a misleading line) before
    issue 28."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # empty: where an empty output_dir would write
    line = one_line(fails(capsys, *build(tmp_path, tiny_model_dir, tiny_data)))
    assert line.startswith(said.format(t=tmp_path, d=tiny_data)), line
    assert on_disk is None or on_disk(tmp_path)


@pytest.mark.parametrize("bom, suffix", [(b"\xef\xbb\xbf", ".jsonl"), (b"\xef\xbb\xbf", ".csv")], ids=["jsonl", "csv"])
def test_a_utf8_byte_order_mark_is_accepted(bom, suffix, tiny_model_dir, tmp_path, capsys):
    """Windows tools write a BOM; before issue 28 a JSONL file with one failed: "Unexpected UTF-8 BOM"."""
    rows = sums(12)
    if suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        text = "instruction,input,output,answer\n" + "".join(f"{r['instruction']},,{r['output']},{r['answer']}\n"
                                                             for r in rows)
    data = tmp_path / f"bom{suffix}"
    data.write_bytes(bom + text.encode())
    runs(capsys, *train_args(tiny_model_dir, data, tmp_path / "run", eval_samples=4, max_new_tokens=4))
    assert strict_json(tmp_path / "run" / "eval.json")["n"] == 4


def test_a_nan_in_a_checkpoint_is_reported_as_a_broken_checkpoint(interrupted28, tiny_model_dir, data_copy, capsys):
    """Before issue 28: "training diverged ... lower lr", as if the resumed run had done it."""
    ckpt = interrupted28 / "checkpoint-2" / "model.safetensors"
    raw = bytearray(ckpt.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start = json.loads(raw[8:8 + n])["model.layers.0.mlp.up_proj.weight"]["data_offsets"][0] + 8 + n
    raw[start:start + 4] = struct.pack("<f", float("nan"))  # same size: the header checks pass
    ckpt.write_bytes(bytes(raw))
    checkpoints = {k: v for k, v in listing(interrupted28).items() if k.startswith("checkpoint-")}
    line = one_line(fails(capsys, *train_args(tiny_model_dir, data_copy, interrupted28, save_steps=1,
                                              eval_samples=4, max_new_tokens=8, resume="auto")))
    assert line == (f"grass-ft train: error: checkpoint {interrupted28 / 'checkpoint-2'} holds weights that are not "
                    f"finite (model.layers.0.mlp.up_proj.weight): it was written from a broken model (or damaged "
                    f"since); resume from an older checkpoint with resume=PATH, or start a new run")
    assert {k: v for k, v in listing(interrupted28).items() if k.startswith("checkpoint-")} == checkpoints
    assert not (interrupted28 / "final").exists()


def test_resume_refuses_a_data_file_that_changed(interrupted28, tiny_model_dir, data_copy, tmp_path, capsys):
    """Before issue 28 resume=auto went on over other data (the same path), silently another run."""
    from grass_ft.run.checkpoint import data_fingerprint

    data = tmp_path / "sums.jsonl"
    shutil.copy(data_copy, data)
    ckpt_run = json.loads((interrupted28 / "checkpoint-2" / "trainer_state.json").read_text())["run"]
    old = data_fingerprint(str(data))
    ckpt_state = interrupted28 / "checkpoint-2" / "trainer_state.json"  # the run as if it had trained on `data`
    ckpt_state.write_text(json.dumps({**json.loads(ckpt_state.read_text()),
                                      "run": {**ckpt_run, "data": str(data.resolve())}}))
    with data.open("a") as f:
        f.write(json.dumps(sums(1)[0]) + "\n")
    new = data_fingerprint(str(data))
    assert old != new and ckpt_run["data_sha256"] == data_fingerprint(str(data_copy))
    before = listing(interrupted28)
    line = one_line(fails(capsys, *train_args(tiny_model_dir, data, interrupted28, save_steps=1, eval_samples=4,
                                              max_new_tokens=8, resume="auto")))
    assert (f"{interrupted28 / 'checkpoint-2'} belongs to a different run: data_sha256={old!r} there, {new!r} here "
            f"(the data file changed since the run began)") in line
    assert listing(interrupted28) == before


def test_saved_weights_get_the_users_umask(finished28):
    """transformers writes model.safetensors through a private temporary file: 0600 before issue 28."""
    mask = os.umask(0)
    os.umask(mask)
    for f in (finished28 / "final" / "model.safetensors", finished28 / "checkpoint-2" / "model.safetensors",
              finished28 / "final" / "config.json"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_options_may_follow_the_keys(tiny_model_dir, tiny_data, tmp_path, capsys):
    """`grass-ft train key=value --quiet` was an argparse usage error (two lines, exit 2)."""
    assert main(["validate", f"model={tiny_model_dir}", "--quiet", f"data={tiny_data}",
                 f"output_dir={tmp_path / 'run'}"]) == 0
