"""benchmarks/fsdp_memory_estimate.py on a tiny config: FSDPMemTracker under fake tensors and a fake 8-rank group
runs here, and its categories are consistent with what each arm trains. In a subprocess: the fake process group
must not become this test process's default group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fsdp_memory_estimate.py"


def test_fsdp_estimate_tiny(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny", "--batch", "2", "--seq", "32",
                        "--gamma", "2", "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    fft, grass = json.loads(out.read_text())
    assert (fft["arm"], grass["arm"]) == ("fft-fsdp", "grass-fsdp")
    # the same model, sharded the same way over 8 ranks
    assert fft["Sharded Param"] == grass["Sharded Param"] > 0
    sys.path.insert(0, str(SCRIPT.parent))
    from fsdp_memory_estimate import CONFIGS
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**CONFIGS["tiny"]))
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    n_blocks = len(model.model.layers)
    # FSDP2 shards every parameter on dim 0; these all divide by 8, so rank 0's shard of a block is block // 8
    assert all(p.shape[0] % 8 == 0 for p in model.parameters())
    assert fft["trainable_params_per_rank"] == sum(p.numel() for p in model.parameters()) // 8
    assert grass["trainable_params_per_rank"] == 2 * block // 8  # gamma = 2 blocks, embeddings and head frozen
    # fft: torch AdamW's 2 moments in bf16 per parameter of this rank's shards (+ 0-dim step counters), on the
    # device, at the peak and still between steps
    assert 4 * fft["trainable_params_per_rank"] <= fft["OptState"] <= 4 * fft["trainable_params_per_rank"] + 4096
    assert fft["optstate_between_steps"] == fft["OptState"]
    assert fft["host_optimizer_bytes"] == 0
    # grass: LayerwiseOffloadAdamW keeps fp32 exp_avg, exp_avg_sq and master (12 B) for every parameter of this
    # rank's shard of every decoder block (its candidates) in the host slab; nothing of it stays on the device
    assert grass["host_optimizer_bytes"] == 12 * n_blocks * block // 8
    assert grass["optimizer_device_bytes_between_steps"] == 0
    assert grass["optstate_between_steps"] == 0
    assert grass["OptState"] == 0  # no torch optimizer state: the records pass through the step's ring buffers
    # during step() the ring and compute buffers are on the device: a few chunks, not the whole state
    assert 0 < grass["optimizer_step_device_peak"] < grass["host_optimizer_bytes"]
    # the slab was taken out of the device figures: what remains of the inputs is the batch (int64 token ids)
    assert grass["Inputs"] == fft["Inputs"] == 2 * 32 * 8
    assert 0 < grass["Total"] < fft["Total"]
    assert "| tiny | fft-fsdp |" in r.stdout
