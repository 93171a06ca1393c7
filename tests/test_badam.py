"""method=badam: BAdam's cyclic block order (γ blocks at a time, in order, wrapping), its moments restarted at
each switch, and a resumed run continuing the cycle."""

import pytest
import torch

from grass_ft.config import TrainConfig
from grass_ft.method.methods import prepare
from grass_ft.base.registry import traits
from grass_ft.method.sampler import LayerSampler, cyclic_group
from grass_ft.method.step import StepRunner
from test_step import batches
from tiny import tiny_llama

L = 4


def test_cyclic_groups_go_in_order_and_wrap():
    assert [cyclic_group(k, 4, 30) for k in (0, 1, 6)] == [[0, 1, 2, 3], [4, 5, 6, 7], [24, 25, 26, 27]]
    assert cyclic_group(7, 4, 30) == [0, 1, 28, 29]  # 28, 29, then round to 0, 1
    assert cyclic_group(8, 4, 30) == [2, 3, 4, 5]
    # every block once per ceil(30/4) = 8 draws, and the cycle has period lcm(30, 4) / 4 = 15 draws
    assert set().union(*(cyclic_group(k, 4, 30) for k in range(8))) == set(range(30))
    assert [cyclic_group(k + 15, 4, 30) for k in range(15)] == [cyclic_group(k, 4, 30) for k in range(15)]
    assert cyclic_group(3, 30, 30) == list(range(30))  # all blocks: nothing ever switches
    with pytest.raises(ValueError, match="cannot draw 5 distinct blocks out of 4"):
        cyclic_group(0, 5, 4)


def test_cyclic_sampler_draws_every_sample_interval_without_a_probe():
    s = LayerSampler("cyclic", num_blocks=10, gamma=3, probe_steps=4, sample_interval=2, seed=0, probe_mode="train")
    assert s.start == 0 and s.measure_steps == 0 and not s.records(0) and not s.records_importance
    drawn = []
    for step in range(10):
        s.begin_step(step)
        drawn.append(list(s.active))
    assert drawn[::2] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 9], [2, 3, 4]]
    assert drawn[1::2] == drawn[::2]  # between draws the group stays
    s.observe({0: 1.0})  # no importance is kept: the order ignores gradients
    assert s.window.count.sum() == 0


def test_resume_continues_the_cycle():
    def sampler():
        return LayerSampler("cyclic", num_blocks=7, gamma=2, sample_interval=3, seed=5)

    whole, first = sampler(), sampler()
    for step in range(8):
        whole.begin_step(step)
        first.begin_step(step)
    state = first.state_dict()
    resumed = sampler()
    resumed.load_state_dict(state)
    assert resumed.active == whole.active == [4, 5]  # steps 6-8: draw 2
    for step in range(8, 40):
        whole.begin_step(step)
        resumed.begin_step(step)
        assert resumed.active == whole.active, step
    with pytest.raises(ValueError, match="for kind 'cyclic', this run uses 'uniform'"):
        LayerSampler("uniform", num_blocks=7, gamma=2).load_state_dict(state)


def first_step_error(before: torch.Tensor, after: torch.Tensor, grad: torch.Tensor, lr: float) -> float:
    """Largest distance, in units of lr, between the update and AdamW's first step after a (re)start of the moments,
    ``-lr * g / (|g| + eps)`` (bias correction makes m_hat = g and v_hat = g^2; eps 1e-8, no weight decay)."""
    first = -lr * grad / (grad.abs() + 1e-8)
    return float(((after - before) - first).abs().max()) / lr


def test_badam_restarts_a_blocks_moments_when_it_comes_round_again():
    """4 blocks, γ = 2, a switch every step: blocks 0-1, 2-3, 0-1. At the third step blocks 0-1 are trained again;
    BAdam restarts their moments, so their update is AdamW's first step. The control is the same cyclic order with
    the moments kept (the flag turned off after building): a second step, which mixes two gradients."""
    lr = 1e-3
    errors = {}
    for reset in (True, False):
        model = tiny_llama(layers=L)
        prepared = prepare(model, TrainConfig(method="badam", gamma=2, sample_interval=1, lr=lr, max_grad_norm=0.0,
                                              train_embeddings=False, train_head=False))
        assert prepared.offload and prepared.reset_state_on_switch  # whatever reset_state_on_switch says
        prepared.reset_state_on_switch = reset
        runner = StepRunner(prepared)
        weight = model.model.layers[0].mlp.down_proj.weight
        grads = []
        weight.register_hook(lambda g: grads.append(g.detach().clone()))
        for step, mbs in enumerate(batches(3)):
            before = weight.detach().clone()
            assert runner.train_step(step, mbs).active == [[0, 1], [2, 3], [0, 1]][step]
        errors[reset] = first_step_error(before, weight.detach(), grads[-1], lr)
    # fp32: the update lr * g / (|g| + eps) computed in a few roundings (~1e-7 relative) and added to |w| < 1,
    # whose spacing is at most 2**-24 = 6e-8: far below 1e-3 lr = 1e-6
    assert errors[True] < 1e-3
    assert errors[False] > 0.1  # kept moments: m_hat / sqrt(v_hat) of two gradients is not sign(g) * 1


def test_badam_is_registered_as_cyclic_with_offloaded_state():
    t = traits("badam")
    assert t.sampling == "cyclic" and t.offload and not t.measures and not t.refreshes
    prepared = prepare(tiny_llama(layers=L), TrainConfig(method="badam", gamma=2))
    assert prepared.sampler.kind == "cyclic" and prepared.sampler.start == 0
