"""Exact resume of the native loop: a stop, a SIGKILL, and half-written checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grass_ft.checkpoint import find_checkpoint, list_checkpoints
from grass_ft.config import build_config
from grass_ft.methods import method_names
from grass_ft.step import StepRunner
from grass_ft.train import run_train


def cfg_for(model, data, out, **kw):
    base = {"model": str(model), "data": str(data), "output_dir": str(out), "max_steps": 20, "batch_size": 2,
            "eval_samples": 0, "gamma": 2, "probe_steps": 2, "sample_interval": 3, "update_interval": 4,
            "lr": 1e-2, "weight_decay": 0.01, "lr_schedule": "cosine", "warmup_steps": 2}
    base.update(kw)
    return build_config(None, {k: str(v) for k, v in base.items()}, known_methods=method_names())


def weights(out: Path):
    return load_file(str(out / "final" / "model.safetensors"))


def trace(out: Path):
    return [json.loads(ln) for ln in (out / "layers.jsonl").read_text().splitlines()]


def losses(out: Path):
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)  # bit-exact
    assert trace(a) == trace(b)
    assert losses(a) == losses(b)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run_train(cfg_for(tiny_model_dir, tiny_data, out), progress=False)
    return out


@pytest.mark.parametrize("method", ["grass"])
def test_stop_and_resume_is_identical(straight, tiny_model_dir, tiny_data, tmp_path, monkeypatch, method):
    out = tmp_path / "run"
    original = StepRunner.train_step

    def stop_at_12(self, step, mbs, forward=None):
        if step == 12:
            raise KeyboardInterrupt  # a user's Ctrl-C after the checkpoint at step 10
        return original(self, step, mbs, forward)

    monkeypatch.setattr(StepRunner, "train_step", stop_at_12)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg_for(tiny_model_dir, tiny_data, out, save_steps=10), progress=False)
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-10"]
    monkeypatch.setattr(StepRunner, "train_step", original)
    run_train(cfg_for(tiny_model_dir, tiny_data, out, save_steps=10, resume="auto"), progress=False)
    assert_same_run(straight, out)


def test_sigkill_mid_run_then_resume(straight, tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "killed"
    cfg = cfg_for(tiny_model_dir, tiny_data, out, save_steps=4, save_total_limit=2)
    args = [f"{k}={v}" for k, v in cfg.to_dict().items() if v is not None]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process: same float sums
    proc = subprocess.Popen([sys.executable, "-m", "grass_ft.cli", "train", "--quiet", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "checkpoint-8").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "final").exists():
        pytest.fail("the run finished before it could be killed; make it longer")
    found = list_checkpoints(out)
    assert found, proc.stderr.read().decode()[-2000:]
    assert len(found) <= 2  # save_total_limit
    run_train(cfg_for(tiny_model_dir, tiny_data, out, save_steps=4, resume="auto"), progress=False)
    assert_same_run(straight, out)


def test_half_written_checkpoint_is_never_picked(tmp_path):
    good = tmp_path / "checkpoint-4"
    good.mkdir()
    for f in ("model.safetensors", "optimizer.pt", "scheduler.pt", "grass_state.pt", "trainer_state.json"):
        (good / f).write_text("x")
    (tmp_path / ".checkpoint-8-abcd").mkdir()  # a temporary directory being written when the process died
    partial = tmp_path / "checkpoint-12"  # a directory missing files (copied by hand, truncated, ...)
    partial.mkdir()
    (partial / "model.safetensors").write_text("x")
    assert find_checkpoint(tmp_path, "auto") == good
    assert find_checkpoint(tmp_path, None) is None
    with pytest.raises(ValueError, match="is not a complete checkpoint .missing optimizer.pt"):
        find_checkpoint(tmp_path, str(partial))
    assert find_checkpoint(tmp_path / "empty", "auto") is None
