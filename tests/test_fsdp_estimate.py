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
    # optimizer state: 2 moments in bf16 per trainable parameter of this rank's shards (+ 0-dim step counters)
    for row in (fft, grass):
        assert 4 * row["trainable_params_per_rank"] <= row["OptState"] <= 4 * row["trainable_params_per_rank"] + 4096
    sys.path.insert(0, str(SCRIPT.parent))
    from fsdp_memory_estimate import CONFIGS
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**CONFIGS["tiny"]))
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert fft["trainable_params_per_rank"] == sum(p.numel() for p in model.parameters()) // 8
    assert grass["trainable_params_per_rank"] == 2 * block // 8  # gamma = 2 blocks, embeddings and head frozen
    assert 0 < grass["Total"] < fft["Total"]
    assert "| tiny | fft-fsdp |" in r.stdout
