"""Importance bookkeeping: one recorder and one non-finite policy in both loops, the training probe, the
relative metric, the uniform control arm and the equal-updates budget."""

import math

import pytest
import torch

from grass_ft.config import ConfigError, TrainConfig, build_config
from grass_ft.method.importance import GradNormRecorder, finite_observation
from grass_ft.method.methods import method_names, prepare, step_budget
from grass_ft.method.sampler import LayerSampler, sweep_groups
from grass_ft.method.step import StepRunner
from tiny import tiny_llama

L = 4


def batches(n, bs=2, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (bs, seq), generator=g)
        out.append([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}])
    return out


def poison(param, steps_to_poison: set[int], clock: list[int]):
    """Make ``param``'s gradient inf at the listed steps (``clock[0]`` is the current step); the loss stays finite."""
    return param.register_hook(lambda g: g * float("inf") if clock[0] in steps_to_poison else g)


# ------------------------------------------------------------------------------------------- the policy


def test_an_observation_with_a_non_finite_value_is_dropped_whole():
    assert finite_observation({0: 1.0, 1: 2.0}) == {0: 1.0, 1: 2.0}
    assert finite_observation({0: 1.0, 1: float("inf")}) == {}
    assert finite_observation({0: float("nan")}) == {}


def test_recorder_modes_read_the_same_rms_and_count_drops():
    model = tiny_llama(layers=L)
    blocks = [[p for p in layer.parameters()] for layer in model.model.layers]
    numel = [sum(p.numel() for p in b) for b in blocks]
    rec = GradNormRecorder(blocks, numel)
    ids = torch.randint(3, 100, (2, 12))
    rec.attach("last")
    model(input_ids=ids, labels=ids).loss.backward()
    last = rec.flush()
    read = rec.read(range(L))
    assert set(last) == set(read) == set(range(L))
    # the same sums of squares (positive terms: no cancellation), reduced in a different order (torch.dot per
    # tensor against _foreach_norm squared): any two orders of n positive fp32 terms differ by <= (n - 1) u of
    # the sum, n = 2048 for the largest block tensor here, 1.2e-4; the RMS is its square root, so half that,
    # 6.1e-5, plus a few u for the square root and the per-block adds: rel_tol 1e-4 holds for any order on any CPU
    for b in range(L):
        assert math.isclose(last[b], read[b], rel_tol=1e-4)
    blocks[1][0].grad[0, 0] = float("nan")
    assert rec.read(range(L)) == {} and rec.dropped == 1


@pytest.mark.parametrize("poisoned_step", [1, 5])  # 1: in the measuring probe; 5: a training step
def test_native_loop_a_non_finite_gradient_does_not_poison_importance(poisoned_step):
    model = tiny_llama(layers=L)
    cfg = TrainConfig(method="grass", gamma=2, probe_steps=3, sample_interval=2, update_interval=4, max_steps=12,
                      lr=1e-3, max_grad_norm=1.0, probe_mode="measure")
    runner = StepRunner(prepare(model, cfg), max_grad_norm=1.0)
    clock = [0]
    handles = [poison(p, {poisoned_step}, clock) for layer in model.model.layers for p in layer.parameters()]
    results = []
    for t, mbs in enumerate(batches(12)):
        clock[0] = t
        results.append(runner.train_step(t, mbs))
    for h in handles:
        h.remove()
    assert results[poisoned_step].skipped or results[poisoned_step].probe
    assert runner._recorder.dropped == 1
    sampler = runner.sampler
    refreshed = [e for r in results for e in r.events if e["event"] in ("probe", "refresh")]
    assert len(refreshed) >= 2
    for e in refreshed:
        assert all(math.isfinite(x) for x in e["mgn"]) and all(math.isfinite(p) for p in e["probs"])
    # float64 softmax of 4 values: each probability within a few ulps (u = 2**-53), their sum within ~1e-15 of 1
    assert torch.isfinite(sampler.probs).all() and math.isclose(float(sampler.probs.sum()), 1.0, rel_tol=1e-9)


def test_trainer_loop_a_non_finite_gradient_does_not_poison_importance(tmp_path):
    from test_hf import L as HF_L, TOK, Features, collator, training_args
    from transformers import Trainer, TrainerCallback

    from grass_ft.frontends.hf import GrassCallback

    model = tiny_llama(len(TOK), layers=HF_L)
    clock = [0]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock[0] = state.global_step

    # step 1 is in the probe: the recorder frees every gradient, so the Trainer's model stays finite
    handles = [poison(p, {1}, clock) for layer in model.model.layers for p in layer.parameters()]
    grass = GrassCallback(method="grass", gamma=2, probe_steps=3, sample_interval=2, update_interval=2,
                          probe_mode="measure")
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=9), train_dataset=Features(),
                      data_collator=collator, callbacks=[grass, Clock()])
    trainer.train()
    for h in handles:
        h.remove()
    runner = grass.runner
    assert runner._recorder.dropped == 1
    assert torch.isfinite(runner.sampler.mgn).all() and (runner.sampler.mgn > 0).all()
    assert torch.isfinite(runner.sampler.probs).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------- training probe


def test_sweep_groups_cover_every_block_gamma_at_a_time():
    g = torch.Generator().manual_seed(3)
    groups = sweep_groups(30, 4, g)
    assert len(groups) == 8 and all(len(set(x)) == 4 for x in groups)
    assert set().union(*map(set, groups)) == set(range(30))
    assert sum(len(x) for x in groups[:7]) == 28  # the first seven groups are disjoint: a permutation


def test_training_probe_schedule_reads_while_it_trains_then_draws_by_importance():
    s = LayerSampler("static", num_blocks=6, gamma=2, probe_steps=2, sample_interval=3, probe_mode="train", seed=1)
    assert s.sweep_steps == 6 and s.measure_steps == 0 and s.start == 6
    seen = []
    for t in range(6):
        ev = s.begin_step(t)
        assert not s.in_probe(t) and s.records(t)
        if t % 2 == 0:
            assert ev and ev[0]["event"] == "draw" and ev[0]["sweep"]
        seen.append(list(s.active))
        s.observe({b: float(b + 1) for b in s.active})
    assert set().union(*map(set, seen)) == set(range(6))
    ev = s.begin_step(6)
    assert [e["event"] for e in ev] == ["probe", "draw"]
    torch.testing.assert_close(s.mgn, torch.arange(1, 7, dtype=torch.float64))  # small integers: exact in float64
    assert not s.records(6)  # GRASS* records nothing after the probe


def test_training_probe_updates_at_every_step_and_only_the_group(tmp_path):
    model = tiny_llama(layers=L)
    cfg = TrainConfig(method="grass", gamma=2, probe_steps=1, probe_mode="train", sample_interval=2,
                      update_interval=2, max_steps=6, lr=1e-2)
    prepared = prepare(model, cfg)
    runner = StepRunner(prepared)
    assert step_budget(cfg, prepared.sampler) == (6, 6)
    trained = set()
    for t, mbs in enumerate(batches(2)):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        res = runner.train_step(t, mbs)
        assert not res.probe and not res.skipped
        moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
        want = {n for b in res.active for n in prepared.layout.blocks[b]} | set(prepared.always)
        assert moved == want and prepared.always  # the group, and the embeddings/head trained at every step
        trained |= set(res.active)
    assert trained == set(range(L))  # two groups of two: every block once
    assert runner.sampler.window.count.tolist() == [1] * L


# ------------------------------------------------------------------------------------ relative metric


def test_relative_importance_starts_uniform_and_favours_blocks_whose_gradient_held_up():
    s = LayerSampler("adaptive", num_blocks=4, gamma=2, probe_steps=1, sample_interval=1, update_interval=1,
                     importance="relative", alpha=1.0, seed=0)
    s.begin_step(0)
    s.observe({0: 4.0, 1: 2.0, 2: 1.0, 3: 1.0})  # very different raw MGN
    s.begin_step(1)
    # ratio 1 everywhere: a float64 softmax of equal values, exact to an ulp (the float64 default: 1e-7)
    torch.testing.assert_close(s.probs, torch.full((4,), 0.25, dtype=torch.float64))
    probe = {0: 4.0, 1: 2.0, 2: 1.0, 3: 1.0}
    now = {0: 1.0, 1: 2.0, 2: 0.5, 3: 1.0}  # block 0 fell to a quarter, block 1 held, block 2 halved
    trained = list(s.active)
    s.observe({b: now[b] for b in trained})
    s.begin_step(2)
    want = torch.tensor([now[b] / probe[b] if b in trained else 1.0 for b in range(4)], dtype=torch.float64)
    torch.testing.assert_close(s.score(), want)  # alpha = 1: the newest window only; one float64 division each
    # a block whose gradient fell is drawn less than one that held up or was not trained, whatever its raw MGN
    for b in range(4):
        for c in range(4):
            if want[b] < want[c]:
                assert s.probs[b] < s.probs[c]


def test_relative_importance_is_for_grass_only():
    with pytest.raises(ConfigError, match="importance=relative"):
        build_config(overrides={"method": "grass-static", "importance": "relative"})


# --------------------------------------------------------------------------------- uniform control arm


def test_uniform_control_is_grass_with_uniform_draws():
    assert "grass-uniform" in method_names()
    cfg = TrainConfig(method="grass-uniform", gamma=2, probe_steps=4, max_steps=10)
    ctl = prepare(tiny_llama(layers=L), cfg)
    grass = prepare(tiny_llama(layers=L), TrainConfig(method="grass", gamma=2, max_steps=10))
    assert ctl.sampler.kind == "uniform" and ctl.sampler.measure_steps == 0 and not ctl.sampler.records(0)
    assert ctl.always == grass.always != []  # embeddings and head trained at every step (the default), as GRASS
    assert ctl.offload and type(ctl.optimizer) is type(grass.optimizer)
    assert step_budget(cfg, ctl.sampler) == (10, 10)


# ------------------------------------------------------------------------------------- equal updates


def test_count_probe_steps_decides_what_max_steps_counts():
    model = tiny_llama(layers=L)
    # the paper's probe (it updates nothing): whether its steps count toward max_steps decides the updates
    counted = TrainConfig(method="grass", gamma=4, probe_steps=4, max_steps=20, probe_mode="measure")
    extra = TrainConfig(method="grass", gamma=4, probe_steps=4, max_steps=20, count_probe_steps=False,
                        probe_mode="measure")
    sampler = prepare(model, counted).sampler
    assert step_budget(counted, sampler) == (20, 16)
    assert step_budget(extra, sampler) == (24, 20)
    assert step_budget(TrainConfig(method="fft", max_steps=20, count_probe_steps=False), None) == (20, 20)
    # with the probe on top, probe_steps may exceed max_steps
    build_config(overrides={"method": "grass", "probe_steps": 30, "max_steps": 20, "count_probe_steps": "false",
                            "probe_mode": "measure"})


@pytest.mark.parametrize("counted", [True, False])
def test_the_cli_loop_honours_count_probe_steps(tmp_path, tiny_model_dir, tiny_data, counted):
    import json

    from grass_ft.run.train import run_train

    cfg = TrainConfig(method="grass", model=str(tiny_model_dir), data=str(tiny_data), gamma=2, probe_steps=2,
                      max_steps=4, batch_size=2, eval_samples=0, count_probe_steps=counted, probe_mode="measure",
                      output_dir=str(tmp_path / "run"))
    run_train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["probe"] for r in rows) == 2
    assert sum(not r["probe"] for r in rows) == (2 if counted else 4)  # updates
