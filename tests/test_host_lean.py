"""The host-lean layout of LayerwiseOffloadAdamW (``host_lean``, used with ``reset_state_on_switch=true``): the same
updates as the full layout whose moments restart on a switch, with the host holding only the fp32 masters of
released blocks; state dicts keep working across a release."""

import copy

import pytest
import torch

from grass_ft.method.offload import LayerwiseOffloadAdamW, block_key
from tiny import tiny_llama


def _model():
    return tiny_llama(layers=4).to(torch.bfloat16)


def _drive(model, opt, steps, lean, seed=0, start=0):
    """Block ``t % 4`` trains at step ``t`` (plus the norm); the block that leaves is released (lean) or its
    moments reset (the full layout with BAdam's reset), as StepRunner does with reset_state_on_switch."""
    g = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    for t in range(start, start + steps):
        active = f"model.layers.{t % 4}"
        if t > start or start:
            left = f"model.layers.{(t - 1) % 4}"
            (opt.release if lean else opt.reset_state)([left])
        for n, p in named.items():
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype) if block_key(n) in (active, "model.norm.weight") \
                else None
        opt.step()
    return {n: p.detach().clone() for n, p in named.items()}


def test_same_updates_as_the_full_layout_with_reset():
    ref_model, lean_model = _model(), _model()
    ref = LayerwiseOffloadAdamW(ref_model.named_parameters(), lr=1e-2, weight_decay=0.1)
    lean = LayerwiseOffloadAdamW(lean_model.named_parameters(), lr=1e-2, weight_decay=0.1, host_lean=True)
    a = _drive(ref_model, ref, 10, lean=False)
    b = _drive(lean_model, lean, 10, lean=True)
    for n in a:  # the same ops on the same values in the same order: bit-identical
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=0, msg=n)
    assert any(not torch.equal(a[n], dict(_model().named_parameters())[n]) for n in a)


def test_host_keeps_masters_of_released_blocks_and_moments_of_the_active_one():
    model = _model()
    opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-2, host_lean=True)
    full = LayerwiseOffloadAdamW(_model().named_parameters(), lr=1e-2)
    block = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0."))
    norm = model.model.norm.weight.numel()
    assert opt.memory_report()["host_state_bytes"] == 0  # nothing until a group steps
    _drive(model, opt, 6, lean=True)  # every block has trained; block 1 is the active one after step 5
    # 3 released blocks: fp32 masters (4 B); the active block and the norm: moments and master (12 B)
    want = 3 * block * 4 + (block + norm) * 12
    assert opt.memory_report()["host_state_bytes"] == want
    assert want < full.memory_report()["host_state_bytes"]  # the full layout holds 12 B for every parameter


def test_state_dict_after_a_release_resumes_bit_exactly():
    model = _model()
    opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-2, host_lean=True)
    _drive(model, opt, 5, lean=True)
    saved_model, saved_state = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    released = [n for n, s in saved_state["state"].items() if "step" not in s]
    assert released and all(set(saved_state["state"][n]) == {"master"} for n in released)
    straight = _drive(model, opt, 5, lean=True, seed=1, start=5)
    resumed_opt = LayerwiseOffloadAdamW(saved_model.named_parameters(), lr=1e-2, host_lean=True)
    resumed_opt.load_state_dict(saved_state)
    assert resumed_opt.memory_report()["host_state_bytes"] == opt_bytes_after(saved_state)
    resumed = _drive(saved_model, resumed_opt, 5, lean=True, seed=1, start=5)
    for n in straight:
        torch.testing.assert_close(resumed[n], straight[n], rtol=0, atol=0, msg=n)


def opt_bytes_after(state):
    """Host bytes a loaded lean optimizer holds: records (12 B) for parameters saved with moments, masters (4 B)
    for those saved with a master only."""
    return sum((12 if "step" in s else 4) * s["master"].numel() for s in state["state"].values())


@pytest.mark.parametrize("reset", [True, False])
def test_step_runner_releases_blocks_that_leave_only_with_reset_state_on_switch(reset):
    from grass_ft.config import TrainConfig
    from grass_ft.method.methods import prepare
    from grass_ft.method.step import StepRunner

    cfg = TrainConfig(method="grass-uniform", gamma=1, sample_interval=1, reset_state_on_switch=reset, offload=True,
                      lr=1e-2, dtype="bfloat16")
    runner = StepRunner(prepare(_model(), cfg))
    assert runner.p.optimizer._lean is reset
    ids = torch.randint(3, 100, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for t in range(6):
        runner.train_step(t, [batch])
    held = {k for k in runner.p.optimizer._store if k.startswith("model.layers.")}
    assert held == ({f"model.layers.{runner.sampler.active[0]}"} if reset else {f"model.layers.{b}" for b in range(4)})
