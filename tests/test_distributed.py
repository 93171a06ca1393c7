"""Multi-process training on CPU with gloo (torchrun): same result as one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grass_ft.config import build_config
from grass_ft.methods import method_names
from grass_ft.models import block_layout
from grass_ft.train import run_train

pytestmark = pytest.mark.slow

GRASS_FT = str(Path(sys.executable).parent / "grass-ft")


def equal_length_data(path: Path, n: int = 48) -> Path:
    # every example has the same token count, so a 2-rank mean of per-rank means equals the 1-rank mean
    lines = [json.dumps({"instruction": f"{i % 10}+{(3 * i) % 10}=", "input": "",
                         "output": f"The answer is {i % 10 + (3 * i) % 10:02d}", "answer": str(i % 10 + (3 * i) % 10)})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def keys(model, data, out, **kw):
    base = {"model": model, "data": data, "output_dir": out, "max_steps": 10, "gamma": 2, "probe_steps": 2,
            "sample_interval": 2, "update_interval": 4, "eval_samples": 0, "lr": 1e-2, "seed": 5}
    base.update(kw)
    return {k: str(v) for k, v in base.items()}


def torchrun(args: dict, nproc: int = 2, timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRASS_FT_TRACE_ALL_RANKS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--no-python",
           GRASS_FT, "train", "--quiet", *[f"{k}={v}" for k, v in args.items()]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def weights(out):
    return load_file(str(Path(out) / "final" / "model.safetensors"))


def jsonl(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = equal_length_data(tmp / "eq.jsonl")
    one = tmp / "one"
    run_train(build_config(None, keys(tiny_model_dir, data, one, batch_size=4), known_methods=method_names()),
              progress=False)
    two = tmp / "two"
    torchrun(keys(tiny_model_dir, data, two, batch_size=2, save_steps=4, save_total_limit=0))
    return tmp, data, one, two


def test_two_processes_equal_one_with_same_global_batch(runs):
    _, _, one, two = runs
    w1, w2 = weights(one), weights(two)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], msg=k)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2


def test_identical_traces_on_both_ranks_and_several_switches(runs):
    _, _, one, two = runs
    rank0, rank1 = jsonl(two / "layers.jsonl"), jsonl(two / "layers.rank1.jsonl")
    assert rank0 == rank1
    draws = [tuple(e["active"]) for e in rank0 if e["event"] == "draw"]
    assert len(draws) == 4 and len(set(draws)) >= 2  # the active set changed
    # the same draws as the single process (MGN from all-reduced gradients, same generator)
    assert [tuple(e["active"]) for e in jsonl(one / "layers.jsonl") if e["event"] == "draw"] == draws


def test_allreduce_bytes_are_the_active_share(runs, tiny_model_dir):
    _, _, _, two = runs
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layout = block_layout(model)
    total = sum(p.numel() for p in model.parameters())
    for m in jsonl(two / "metrics.jsonl"):
        if m["probe"]:
            continue
        expected = sum(layout.numel[b] for b in m["active"]) / total
        assert m["allreduce_fraction_of_fft"] == pytest.approx(expected, rel=1e-6)
        assert m["allreduce_bytes"] == sum(layout.numel[b] for b in m["active"]) * 4


def test_resume_with_same_world_size(runs, tiny_model_dir):
    tmp, data, _, two = runs
    resumed = tmp / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-4", resumed / "checkpoint-4")
    for log in ("metrics.jsonl", "layers.jsonl"):
        shutil.copy(two / log, resumed / log)
    torchrun(keys(tiny_model_dir, data, resumed, batch_size=2, save_steps=4, resume="auto"))
    w, ref = weights(resumed), weights(two)
    for k in ref:
        torch.testing.assert_close(w[k], ref[k], rtol=0, atol=0, msg=k)
    assert jsonl(resumed / "layers.jsonl") == jsonl(two / "layers.jsonl")
