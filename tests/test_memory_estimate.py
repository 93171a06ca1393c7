"""benchmarks/memory_estimate.py on a tiny config: the fake-tensor estimate runs through the project's step, its
categories add up, parameter bytes are exact, host state is kept apart, and the analytic floor's arithmetic."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory_estimate as me  # noqa: E402

TINY = me.MODELS["tiny"]


@pytest.fixture(scope="module")
def fft():
    return me.estimate_arm("tiny", "fft", batch_size=2, seq_len=16)


@pytest.fixture(scope="module")
def grass():
    return me.estimate_arm("tiny", "grass", batch_size=2, seq_len=16)


def test_fft_parameter_bytes_are_numel_times_two_and_categories_add_up(fft):
    assert fft["status"] == "ok", fft.get("error")
    numel = me.model_numel(TINY)
    assert fft["params"] == numel  # the config arithmetic counts every parameter
    assert fft["param_bytes"] == numel * 2  # bf16, exactly
    for s in fft["steps"]:
        assert s["at_peak"]["parameters"] == numel * 2  # every parameter is live at every moment
        assert sum(s["at_peak"].values()) == s["peak"]
        assert sum(s["end_by_category"].values()) == s["end"]
    # fused AdamW keeps two bf16 moments per parameter plus a 4-byte fp32 step count per parameter tensor
    n_tensors = 1 + TINY["num_hidden_layers"] * 9 + 1 + 1  # embeddings, 9 per block, final norm, head
    steady = fft["steps"][-1]
    assert steady["end_by_category"]["optimizer state"] == 2 * numel * 2 + 4 * n_tensors
    assert steady["end_by_category"]["gradients"] == 0  # zero_grad(set_to_none=True) after the step
    assert fft["fused_adamw"] and fft["opt_state_dtypes"] == ["bfloat16"]
    assert fft["train_peak"] >= numel * 2 * 4  # weights + grads + two moments coexist in the step


def test_grass_host_state_is_apart_and_probe_reported(grass):
    assert grass["status"] == "ok", grass.get("error")
    assert grass["steps"][0]["probe"] and not grass["steps"][1]["probe"]
    assert grass["probe_peak"] > 0 and grass["train_peak"] > 0
    # the offloading optimizer's host store: found by walking it, equal to what it reports, not in the device peak
    report = grass["memory_report"]
    assert grass["host_tensor_bytes"] == report["host_state_bytes"] > 0
    assert grass["host_bytes"] == report["host_state_bytes"]
    last = grass["steps"][-1]
    assert last["end_by_category"]["optimizer state"] == 0  # nothing of the optimizer stays on the device
    assert last["peak_all"] >= last["peak"] + 0  # with the host store counted the total can only be larger
    # two active blocks' bf16 gradients at most
    assert last["at_peak"]["gradients"] <= 2 * me.block_numel(TINY) * 2


def test_analytic_floor_on_llama2_7b():
    c = me.MODELS["llama2-7b"]
    assert me.block_numel(c) == 202_383_360  # 4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096
    assert me.model_numel(c) == 6_738_415_616  # Llama-2-7b-hf's parameter count
    f = me.analytic_floor(c, gamma=2, batch_size=4, seq_len=1024, step_buffer_bytes=10**8)
    assert f["weights"] == 6_738_415_616 * 2
    assert f["gradients"] == 2 * 202_383_360 * 2
    assert f["checkpointed activations"] == 32 * 4 * 1024 * 4096 * 2
    assert f["step buffers"] == 10**8
    assert f["total"] == sum(v for k, v in f.items() if k != "total")


def test_gemma_and_tinyllama_counts_match_their_published_sizes():
    assert me.model_numel(me.MODELS["tinyllama"]) == 1_100_048_384
    assert me.model_numel(me.MODELS["gemma-2b"]) == 2_506_172_416  # tied embeddings count once


def test_replay_leaves_host_storages_out():
    class W:  # stands for MemTracker's _WeakRefInfo
        def __init__(self, reftype):
            self.reftype = type("R", (), {"value": reftype})()

    p, a, h = W("Parameter"), W("Activation"), W("Other")
    log = [(p, 100, "forward"), (h, 1000, "optimizer step"), (a, 50, "forward"), (a, -50, "backward")]
    out = me.replay(log, host_ids={id(h)}, opt_ids=set())
    assert out["peak"] == 150 and out["at_peak"]["activations"] == 50 and out["phase"] == "forward"
    assert out["host_end"] == 1000 and out["peak_all"] == 1150 and out["end"] == 100


def test_probe_hook_allocates_no_full_size_copy():
    """The probe reads each gradient's squared norm in its hook: in fp32, but without a full-size fp32 copy of a
    bf16 gradient (or of its square), which would lift the probe's peak above the training step's."""
    import torch

    from grass_ft.method.importance import NORM_CHUNK, GradNormRecorder

    p = torch.nn.Parameter(torch.zeros(4 * NORM_CHUNK + 3, dtype=torch.bfloat16))
    rec = GradNormRecorder([[p]], [p.numel()])
    rec.attach("probe")
    p.grad = torch.full_like(p, 0.5)
    peak = me.profiler_peak(lambda: rec._hook(0)(p))
    # one chunk's fp32 copy (and a few scalars), not the 2 x 4 B x numel of an fp32 copy and its square
    assert peak <= NORM_CHUNK * 4 + 1024
    assert p.grad is None
    assert rec.flush() == {0: pytest.approx(0.5)}  # r = sqrt(sum(0.25) / N) = 0.5: every step exact in fp32
    rec.detach()


def test_worst_case_draws_are_distinct_and_end_at_block_zero(grass):
    assert me.worst_case_draws(32, 2, 3) == [[4, 5], [2, 3], [0, 1]]
    assert me.worst_case_draws(4, 2, 3) == [[0, 1], [2, 3], [0, 1]]  # wraps when the blocks run out
    assert grass["steps"][-1]["active"] == [0, 1]  # the estimate's GRASS step trained the forced draw
