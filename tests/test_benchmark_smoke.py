"""benchmarks/gpu_memory.py end to end in --smoke mode (CPU, tiny Llama, peak RSS): every arm runs in its own
process through the project's code path and lands in the markdown table; a failing arm is reported and the
others continue. Each run starts one interpreter per arm (~8 s each on 2 CPU cores), hence ``slow``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_memory.py"
ARMS = ["fft", "lora", "dora", "lisa", "grass-no-offload", "grass", "grass-static", "grass-head"]


def _run(args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GPU_MEMORY_FAKE_OOM"}
    env.update({"OMP_NUM_THREADS": "1", **(extra_env or {})})
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _rows(md: str) -> dict[str, list[str]]:
    """Table rows by method: ``| model | method | status | peak | ratio | tokens/s | ratio | ... |``."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| smoke-tiny |"):
            rows[cells[1]] = cells
    return rows


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def test_smoke_all_arms(tmp_path):
    out = tmp_path / "x.md"
    proc = _run(["--smoke", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out.read_text())
    assert list(rows) == ARMS
    for method, cells in rows.items():
        assert cells[2] == "ok", (method, cells)
        # peak, its ratio, tokens/s, its ratio
        assert all(_is_number(c) for c in cells[3:7]), (method, cells)
        assert float(cells[3]) > 0 and float(cells[5]) > 0
    assert rows["fft"][4] == "1.00" and rows["fft"][6] == "1.00"
    assert rows["grass"][7].startswith("0.00 /")  # offload: no optimizer state on the device between steps
    assert float(rows["grass"][8]) > 0 and float(rows["lisa"][8]) == 0  # host state only with offload
    text = out.read_text()
    assert "command: `python benchmarks/gpu_memory.py --smoke --out" in text
    assert "transformers" in text and "**Incomplete" not in text
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [r["method"] for r in lines] == ARMS
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in lines)
    rec = {r["method"]: r for r in lines}
    for arm in ("grass", "grass-static", "grass-head"):
        assert rec[arm]["optimizer"] == "LayerwiseOffloadAdamW" and rec[arm]["opt_state_host_gib"] > 0
        assert rec[arm]["probe_peak_gib"] > 0 and _is_number(rows[arm][14])  # the probe's peak, apart
    for arm in ("fft", "lora", "dora", "lisa"):  # torch AdamW arms run fused, as transformers does on CUDA
        assert rec[arm]["optimizer"] == "AdamW (fused)" and rec[arm]["probe_peak_gib"] is None
    assert rec["grass-no-offload"]["opt_state_dtype"] == "float32"  # its state precision as it is
    # the default layout adds the embeddings' and head's state to the host slab
    assert rec["grass-head"]["opt_state_host_gib"] > rec["grass"]["opt_state_host_gib"]
    assert rec["lisa"]["blocks_drawn"] >= 2  # LISA's active set switched during the run
    assert all(r["gradient_checkpointing"] for r in lines)  # the paper's setting is the default


def test_failed_arm_is_reported_and_others_continue(tmp_path):
    out = tmp_path / "y.md"
    proc = _run(["--smoke", "--methods", "fft,lisa,grass", "--checkpointing", "auto", "--out", str(out)],
                {"GPU_MEMORY_FAKE_OOM": "lisa:no-ckpt,grass:always"})
    assert proc.returncode == 1, proc.stderr[-3000:]  # one arm failed
    rows = _rows(out.read_text())
    assert list(rows) == ["fft", "lisa", "grass"]
    assert rows["fft"][2] == "ok" and rows["fft"][4] == "1.00"
    # out of memory without checkpointing -> rerun once with it, and the table says so
    assert rows["lisa"][2] == "ok" and rows["lisa"][11] == "on" and _is_number(rows["lisa"][4])
    assert rows["grass"][2].startswith("oom:") and rows["grass"][3] == "–"


def test_without_cuda_exits_with_a_message():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    proc = _run(["--models", "tinyllama", "--methods", "fft"])
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--smoke" in proc.stderr


ARMS_OF_THE_CHECK = ["import", "gpu_tests", "fused_adamw_resume", "pure_bf16", "pinning_fallback", "memory_tinyllama",
                     "step_7b"]


def test_gpu_check_smoke(tmp_path):
    """benchmarks/gpu_check.sh --smoke: every arm of the one-GPU check in its CPU form (the GPU tests collected and
    skipped, the memory arms on the tiny model), one line each and a summary line; every figure in
    $OUT/summary.json, beside only the printed lines and the logs' archive."""
    script = SCRIPT.parent / "gpu_check.sh"
    out = tmp_path / "out"
    hooks = ("GPU_MEMORY_FAKE_OOM", "GPU_CHECK_BOUNDS", "GPU_CHECK_STALL", "GPU_CHECK_DEADLINE")
    env = {k: v for k, v in os.environ.items() if k not in hooks}
    env.update({"OMP_NUM_THREADS": "1", "OUT": str(out), "PYTHON": sys.executable})
    proc = subprocess.run(["bash", str(script), "--smoke"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    status = {ln.split(":")[0].removeprefix("[gpu_check] "): ln.split(": ")[1].split()[0] for ln in lines[1:-1]}
    assert list(status) == ARMS_OF_THE_CHECK
    assert status == {"import": "ok", "gpu_tests": "skip", "fused_adamw_resume": "skip", "pure_bf16": "skip",
                      "pinning_fallback": "skip", "memory_tinyllama": "ok", "step_7b": "ok"}
    assert lines[-1].startswith("[gpu_check] summary: 3 ok, 4 skip, 0 fail in ")
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.txt", "logs.tar.gz", "summary.json"]
    assert (out / "gpu_check.txt").read_text().splitlines() == lines
    summary = json.loads((out / "summary.json").read_text())
    arms = {a["arm"]: a for a in summary["arms"]}
    assert summary["total_s"] <= summary["deadline_s"] == 360 and all(a["seconds"] <= a["limit_s"] + 1
                                                                     for a in arms.values())
    assert arms["import"]["grass_ft"] == str(SCRIPT.parent.parent / "src" / "grass_ft")
    assert arms["gpu_tests"]["skipped"] >= 10 and arms["fused_adamw_resume"]["skipped"] == 2  # collected, skipped
    rows = {r["method"]: r for r in arms["memory_tinyllama"]["rows"]}
    assert list(rows) == ["grass"] and rows["grass"]["status"] == "ok" and rows["grass"]["peak_gib"] > 0
    assert arms["step_7b"]["need_host_gib"] > 70 and arms["step_7b"]["rows"][0]["method"] == "grass"
    bad = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--bogus" in bad.stderr
