"""Issue 31: the recipe a Trainer / TRL user knows -- epochs and warm-up ratio, evaluation during training with the
best model and early stopping, packing, fp16 and dtype=auto, outputs that look finished, wandb from its
environment -- and one line, exit 2, for bad input to every new key."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from grass_ft import data as data_mod
from grass_ft.frontends.cli import main
from grass_ft.config import TrainConfig, build_config
from grass_ft.method.methods import method_names
from grass_ft.run.resolve import resolve_warmup, steps_for_epochs, updates_per_epoch
from grass_ft.run.train import run_train


def _cfg(model_dir, data, out, **kw):
    keys = {"model": str(model_dir), "data": str(data), "output_dir": str(out), "batch_size": "4",
            "method": "grass-uniform", "gamma": "2", "max_seq_len": "256", "eval_samples": "8", "max_new_tokens": "4",
            **{k: str(v) for k, v in kw.items()}}
    return build_config(None, keys, known_methods=method_names())


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------- configuration


def test_the_issues_keys_validate(capsys):
    assert main(["validate", "num_train_epochs=2", "warmup_ratio=0.1", "eval_steps=5", "packing=true",
                 "dtype=float16", "early_stopping_patience=2"]) == 0
    assert "configuration OK" in capsys.readouterr().out


@pytest.mark.parametrize("keys,says", [
    (["num_train_epochs=-1"], "`num_train_epochs` must be > 0"),
    (["num_train_epochs=many"], "`num_train_epochs` must be a number"),
    (["warmup_ratio=1"], "`warmup_ratio` must be in [0, 1)"),
    (["eval_steps=5", "eval_samples=0"], "`eval_steps` needs held-out data, but eval_samples=0"),
    (["early_stopping_patience=2"], "`early_stopping_patience` counts evaluations, so it needs eval_steps > 0"),
    (["load_best_model_at_end=true"], "`load_best_model_at_end` needs evaluations during training"),
    (["metric_for_best_model=bleu"], "`metric_for_best_model` must be one of eval_loss, eval_accuracy"),
    (["save_dtype=int8"], "`save_dtype` must be one of auto, float32, bfloat16, float16"),
    (["attn_implementation=fast"], "`attn_implementation` must be one of auto, eager, sdpa"),
    (["dtype=float64"], "`dtype` must be one of auto, float32, bfloat16, float16"),
    (["packing=maybe"], "`packing` must be true or false"),
])
def test_bad_input_to_each_new_key_is_one_line_and_exit_2(tmp_path, capsys, keys, says):
    out = tmp_path / "run"
    code = main(["train", f"output_dir={out}", *keys])
    err = capsys.readouterr().err
    assert code == 2 and says in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # nothing was written


def test_max_steps_given_wins_over_epochs_and_the_default_yields():
    assert TrainConfig().max_steps == 30 and TrainConfig(num_train_epochs=2).max_steps is None
    given = build_config(None, {"num_train_epochs": "2", "max_steps": "7"})
    assert given.max_steps == 7 and given.num_train_epochs == 2.0
    assert build_config(None, {"metric_for_best_model": "accuracy"}).metric_for_best_model == "eval_accuracy"


def test_epochs_and_warmup_follow_the_trainers_arithmetic():
    cfg = TrainConfig(batch_size=4, grad_accum=2)
    # 100 rows, 4 a batch, 2 processes: 12 full batches (the ragged tail dropped), 6 updates an epoch
    assert updates_per_epoch(100, cfg, 2) == 6
    assert steps_for_epochs(2.5, 100, cfg, 2) == 15 and steps_for_epochs(0.1, 100, cfg, 2) == 1  # ceil
    assert steps_for_epochs(1, 3, cfg, 1) == 1  # never 0 steps
    assert resolve_warmup(TrainConfig(warmup_ratio=0.1), 25) == 3  # ceil(2.5), as Trainer.get_warmup_steps
    assert resolve_warmup(TrainConfig(warmup_ratio=0.1, warmup_steps=5), 25) == 5  # warmup_steps wins


# ---------------------------------------------------------------------------------------------- packing


def test_pack_features_is_best_fit_decreasing_and_collate_restarts_positions():
    feats = [{"input_ids": [5] * n, "labels": [7] * n} for n in (6, 3, 5, 2, 4)]
    rows = data_mod.pack_features(feats, 8)
    # longest first, each into the fullest row that still fits it: [6, 2], [5, 3], [4]
    assert [r["seq_lengths"] for r in rows] == [[6, 2], [5, 3], [4]]
    batch = data_mod.collate(rows, pad_id=1)
    assert "attention_mask" not in batch and int(batch["num_tokens"]) == 20
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert batch["position_ids"][2].tolist() == [0, 1, 2, 3, 0, 0, 0, 0]  # padded like TRL: position 0
    # no token is predicted from another example: every example's first label is masked (and the padding)
    assert batch["labels"][0].tolist() == [-100, 7, 7, 7, 7, 7, -100, 7]
    assert batch["labels"][2].tolist() == [-100, 7, 7, 7, -100, -100, -100, -100]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_the_examples_apart(attn):
    from grass_ft.method.loss import supervised_loss
    from tiny import tiny_llama

    model = tiny_llama(103, layers=2)
    model.config._attn_implementation = attn
    gen = torch.Generator().manual_seed(0)
    feats = [{"input_ids": torch.randint(3, 103, (n,), generator=gen).tolist()} for n in (9, 6, 5)]
    for f in feats:
        f["labels"] = list(f["input_ids"])
    packed = data_mod.collate(data_mod.pack_features(feats, 20), pad_id=1)
    packed.pop("num_tokens")
    alone = data_mod.collate(feats, pad_id=1)
    # the same tokens scored (each example's first token has no predecessor either way), the same count: the mean
    # over them differs only by the fp32 order of the sums and the attention's reduction lengths (~1e-6 relative)
    torch.testing.assert_close(supervised_loss(model, packed), supervised_loss(model, alone))


def test_packing_refuses_a_model_that_lets_packed_examples_mix():
    from grass_ft.data.packing import PackingError, check_packing, mixing
    from tiny import tiny_llama

    model = tiny_llama(103, layers=2)
    assert mixing(model) < 1e-5  # transformers reads the restarting positions as example boundaries

    forward = model.forward

    def ignores_positions(*args, **kw):  # an attention that takes the row as one sequence
        kw.pop("position_ids", None)
        return forward(*args, **kw)

    model.forward = ignores_positions
    with pytest.raises(PackingError, match=r"`packing` needs an attention that keeps packed examples apart, and "
                                           r"model 'tiny' with attn_implementation=\w+ does not"):
        check_packing(model, TrainConfig(model="tiny", packing=True))


# ------------------------------------------------------------------------------------- whole runs (CLI)


@pytest.mark.slow
def test_the_issues_run_evaluates_during_training_and_finishes_in_fp16(tmp_path, tiny_model_dir):
    from tiny import write_examples

    data = write_examples(tmp_path / "sums.jsonl", n=208)
    out = tmp_path / "run"
    # 200 examples (8 held out) of 160-180 tokens, 2 or 3 to a 512-token row
    cfg = _cfg(tiny_model_dir, data, out, num_train_epochs=0.4, warmup_ratio=0.1, eval_steps=3, packing="true",
               dtype="float16", early_stopping_patience=2, max_seq_len=512)
    summary = run_train(cfg, progress=False)
    record = yaml.safe_load((out / "config.yaml").read_text())
    rows = summary["train_rows"]
    assert 200 / 3 <= rows <= 100  # packed, never split
    steps = math.ceil(0.4 * (rows // 4))  # the Trainer's ceil(epochs x updates per epoch), full batches of 4
    assert record["max_steps"] == steps == summary["max_steps"] == summary["steps"]
    assert record["warmup_steps"] == math.ceil(0.1 * steps)
    assert record["dtype"] == "float16" and record["load_best_model_at_end"] is True
    assert not [k for k, v in record.items() if v is None]  # no null anywhere
    evals = [m for m in _lines(out / "metrics.jsonl") if "eval_loss" in m]
    assert [m["step"] for m in evals] == list(range(2, steps - 1, 3))  # after steps 3, 6, ... (the last: "after")
    assert all(math.isfinite(m["eval_loss"]) and "best_metric" in m for m in evals)
    train = [m for m in _lines(out / "metrics.jsonl") if "loss" in m]
    assert all(m["loss_scale"] > 0 for m in train)
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "float16"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "final" / "model.safetensors").values()} == {torch.float16}
    card = (out / "final" / "README.md").read_text()
    assert "base_model:" in card and "grass-uniform" in card and "| eval loss |" in card and "grass-ft train" in card
    assert (out / "loss.png").is_file() and (out / "active_blocks.png").is_file()
    assert summary["dtype"] == "float16" and summary["overflow_steps"] is not None
    assert not (out / "best").exists()  # final/ holds what best/ kept


@pytest.mark.slow
def test_dtype_auto_is_float32_on_a_cpu_and_save_dtype_casts_only_the_files(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    summary = run_train(_cfg(tiny_model_dir, tiny_data, out, max_steps=2, save_dtype="bfloat16", eval_samples=0),
                        progress=False)
    record = yaml.safe_load((out / "config.yaml").read_text())
    assert record["dtype"] == "float32" == summary["dtype"] and record["gamma"] == 2
    assert record["eval_data"] == "holdout" and record["offload"] is True and record["lora_alpha"] == 64.0
    assert record["resume"] == "none" and record["layers_attribute"] == "model.layers" and record["run_name"] == "run"
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    # the resolved config.yaml is itself a valid configuration of the same run
    again = build_config(str(out / "config.yaml"), known_methods=method_names())
    assert again.max_steps == 2 and again.dtype == "float32" and again.held_out_split


@pytest.mark.slow
def test_fft_keeps_gamma_auto_and_a_short_run_on_a_file_is_warned(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = tmp_path / "run"
    from tiny import write_examples

    data = write_examples(tmp_path / "many.jsonl", n=400)
    run_train(_cfg(tiny_model_dir, data, out, method="fft", gamma="auto", eval_samples=0, batch_size=2,
                   max_seq_len=192), progress=False)  # max_steps left at its default, 30
    assert yaml.safe_load((out / "config.yaml").read_text())["gamma"] == "auto"
    err = capsys.readouterr().err
    assert "max_steps=30 x 2 rows a step = 60 of the data's 400 training examples (15.0% of one epoch)" in err
    run_train(_cfg(tiny_model_dir, data, tmp_path / "asked", method="fft", eval_samples=0, batch_size=2,
                   max_seq_len=192, max_steps=2), progress=False)
    assert "of one epoch" not in capsys.readouterr().err  # a max_steps the user typed is their choice


@pytest.mark.slow
def test_evaluation_leaves_the_draws_and_the_weights_as_they_were(tmp_path, tiny_model_dir, tiny_data):
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("plain", {}), ("evaluated", {"eval_steps": 2})):
        out = tmp_path / name
        run_train(_cfg(tiny_model_dir, tiny_data, out, max_steps=6, method="grass", probe_steps=1,
                       sample_interval=2, update_interval=2, **extra), progress=False)
        runs[name] = out
    assert (runs["plain"] / "layers.jsonl").read_text() == (runs["evaluated"] / "layers.jsonl").read_text()
    a, b = (load_file(runs[r] / "final" / "model.safetensors") for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same arithmetic on the same batches: bit-exact
    assert len([m for m in _lines(runs["evaluated"] / "metrics.jsonl") if "eval_loss" in m]) == 2


@pytest.mark.slow
def test_early_stopping_ends_the_run_and_final_holds_the_best(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    # accuracy stays 0 on this untrained tiny model: the first evaluation is the best, the second is not better
    summary = run_train(_cfg(tiny_model_dir, tiny_data, out, max_steps=10, eval_steps=1, early_stopping_patience=1,
                             metric_for_best_model="accuracy"), progress=False)
    assert summary["stopped_early"] and summary["steps"] == 2 and summary["best_step"] == 1
    assert summary["final_from_best"]
    assert len([m for m in _lines(out / "metrics.jsonl") if "loss" in m]) == 2


# ------------------------------------------------------------------------------------------------ wandb


def test_wandb_mode_follows_the_environment(tmp_path, monkeypatch):
    from grass_ft.run.logging_sinks import wandb_mode

    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode({"WANDB_MODE": "online"}) == (None, None)  # the user's word, read by wandb.init
    mode, why = wandb_mode({})
    assert mode == "offline" and "no W&B credentials" in why
    # credentials, but the host does not answer: offline (a closed local port stands in for an unreachable host)
    mode, why = wandb_mode({"WANDB_API_KEY": "x", "WANDB_BASE_URL": "http://127.0.0.1:9"}, timeout=1.0)
    assert mode == "offline" and "cannot be reached" in why


def test_wandb_init_gets_project_name_and_mode_as_its_users_set_them(tmp_path, monkeypatch):
    from grass_ft.run.logging_sinks import MetricSinks

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(
        log=lambda *a, **k: None, finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    monkeypatch.setenv("WANDB_MODE", "online")
    MetricSinks("wandb", tmp_path, {"lr": 1e-4}, run_name="exp-7").close()
    assert calls[-1]["project"] == "my-project" and calls[-1]["name"] == "exp-7" and "mode" not in calls[-1]
    monkeypatch.delenv("WANDB_PROJECT")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    MetricSinks("wandb", tmp_path, {}).close()
    assert calls[-1]["project"] == "grass-ft" and calls[-1]["mode"] == "offline" and calls[-1]["name"] == tmp_path.name


def test_real_wandb_reads_its_environment(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from grass_ft.run.logging_sinks import MetricSinks

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sinks = MetricSinks("wandb", tmp_path, {"lr": 1e-4}, run_name="named")
    run = sinks.wandb
    assert run.project == "from-env" and run.name == "named" and run.settings.mode == "offline"
    sinks.close()
    assert wandb.run is None


# ------------------------------------------------------------------------------------------------ help


def test_help_texts_match_what_the_code_does(capsys):
    from grass_ft.frontends.compare import DEFAULT_METHODS

    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert ",".join(DEFAULT_METHODS) in top and "grass-uniform" in top and "method=auto" in top
    assert main(["compare", "--help"]) == 0
    assert f"(default: {','.join(DEFAULT_METHODS)})" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    keys = capsys.readouterr().out
    data_line = next(ln for ln in keys.splitlines() if ln.strip().startswith("data "))
    assert all(w in data_line for w in (".parquet", ".csv", "hub data set", "data_format"))
    for key in ("num_train_epochs", "warmup_ratio", "eval_steps", "metric_for_best_model", "load_best_model_at_end",
                "early_stopping_patience", "packing", "attn_implementation", "save_dtype", "run_name"):
        assert f"  {key} " in keys, key
    dtype_line = next(ln for ln in keys.splitlines() if ln.strip().startswith("dtype "))
    assert "(default: 'auto')" in dtype_line and "float16 (with dynamic loss scaling)" in dtype_line


@pytest.mark.slow
def test_a_run_of_resolved_keys_resumes_and_a_changed_one_is_named(tmp_path, tiny_model_dir, tiny_data):
    import shutil

    from safetensors.torch import load_file

    from grass_ft.run.checkpoint import CheckpointError

    out = tmp_path / "run"
    keys = dict(num_train_epochs=0.5, warmup_ratio=0.25, save_steps=2, save_total_limit=0, eval_samples=0)
    run_train(_cfg(tiny_model_dir, tiny_data, out, **keys), progress=False)  # 64 rows: 16 updates, 8 steps
    done = load_file(out / "final" / "model.safetensors")
    for name in ("final", "summary.json", "checkpoint-6"):
        (shutil.rmtree if (out / name).is_dir() else Path.unlink)(out / name)
    # the same command resumes: dtype, max_steps and warmup_steps resolve again to what checkpoint-4 recorded
    run_train(_cfg(tiny_model_dir, tiny_data, out, resume="auto", **keys), progress=False)
    again = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(done[k], again[k]) for k in done)
    for name in ("final", "summary.json"):
        (shutil.rmtree if (out / name).is_dir() else Path.unlink)(out / name)
    with pytest.raises(CheckpointError, match=r"belongs to a different run: num_train_epochs=0.5 there, 1.0 here"):
        run_train(_cfg(tiny_model_dir, tiny_data, out, resume="auto", **{**keys, "num_train_epochs": 1}),
                  progress=False)
