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

from grass_ft.run.checkpoint import find_checkpoint, list_checkpoints
from grass_ft.frontends.cli import main
from grass_ft.config import build_config
from grass_ft.method.methods import method_names
from grass_ft.method.step import StepRunner
from grass_ft.run.train import run_train


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


# The subprocess below stops inside the save of checkpoint-8, after the weights are written: SIGKILL then hits a
# save in progress for certain (polling for a directory to appear would race the save).
SLOW_SAVE = """
import sys, time
from pathlib import Path
import grass_ft.run.checkpoint as ck
from grass_ft.frontends.cli import main
original = ck.save_model
def save_model(model, path):
    original(model, path)
    if ".checkpoint-8-" in path:
        flag = Path(sys.argv[1])
        flag.with_suffix(".tmp").write_text(path)
        flag.with_suffix(".tmp").replace(flag)  # atomic: the test never reads a flag created but not yet written
        time.sleep(600)
ck.save_model = save_model
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_mid_save_then_resume(straight, tiny_model_dir, tiny_data, tmp_path, capsys):
    """SIGKILL while checkpoint-8 is being written: checkpoint-4 stays complete, the hidden temporary is removed
    by the next run (with a warning), and ``resume=auto`` continues bit-exactly from checkpoint-4."""
    out, flag = tmp_path / "killed", tmp_path / "saving"
    cfg = cfg_for(tiny_model_dir, tiny_data, out, save_steps=4, save_total_limit=2)
    args = [f"{k}={v}" for k, v in cfg.to_dict().items() if v is not None]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process: same float sums
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(flag), "train", "--quiet", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not flag.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert flag.exists(), proc.stderr.read().decode()[-2000:]
    temp = Path(flag.read_text()).parent
    assert temp.is_dir() and temp.name.startswith(".checkpoint-8-")  # the save really was cut short
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert (out / "checkpoint-4").stat().st_mode & 0o777 == 0o777 & ~_umask()  # like any other directory
    assert main(["train", "--quiet", "resume=auto", *[a for a in args if not a.startswith("resume=")]]) == 0
    stderr = capsys.readouterr().err
    assert "removed 1 unfinished temporary file(s)" in stderr and temp.name in stderr
    assert not temp.exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert_same_run(straight, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def with_checkpoints(tiny_model_dir, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpts")
    run_train(cfg_for(tiny_model_dir, tiny_data, out, max_steps=10, save_steps=4), progress=False)
    return out


def test_half_written_checkpoint_is_never_picked(with_checkpoints, tmp_path):
    import shutil

    good = tmp_path / "checkpoint-4"
    shutil.copytree(with_checkpoints / "checkpoint-4", good)
    (tmp_path / ".checkpoint-8-abcd").mkdir()  # a temporary directory being written when the process died
    partial = tmp_path / "checkpoint-12"  # a directory missing files (copied by hand, truncated, ...)
    partial.mkdir()
    (partial / "model.safetensors").write_text("x")
    warnings = []
    assert find_checkpoint(tmp_path, "auto", warnings) == good
    assert warnings == [f"skipping damaged {partial} (missing optimizer.pt, scheduler.pt, grass_state.pt, "
                        f"trainer_state.json); resuming from {good}"]
    assert find_checkpoint(tmp_path, None) is None
    with pytest.raises(ValueError, match="is not a complete checkpoint .missing optimizer.pt"):
        find_checkpoint(tmp_path, str(partial))
    assert find_checkpoint(tmp_path / "empty", "auto") is None
