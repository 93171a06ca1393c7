"""The training step on a tiny Llama: probe, draws, frozen parts, reference equivalence, non-finite steps.

The reference comparisons run in lockstep (issue 28): before each step the reference's weights are set to ours, so
both arms compute bit-identical gradients (the same ops on the same values in one process), and after the step the
weights are compared. What differs is then one step of AdamW arithmetic, ours against torch's, op for op and
elementwise: <= 1 ulp (u = 2**-24) per op where a vectorised kernel's lane and a scalar tail round differently,
~20u of an lr-sized update with the moments' carried roundings (tests/test_offload.py derives it), i.e. < 1e-7
absolute at lr 1e-2 -- inside assert_close's float32 atol (1e-5). Comparing the weights after several steps has
no such bound: a one-ulp weight difference changes the next gradients, and Adam turns a cancelling gradient
element's rounding noise into an update of ~lr whatever its sign.
"""

import copy

import pytest
import torch

from grass_ft.config import TrainConfig
from grass_ft.method.methods import prepare
from grass_ft.method.step import NonFiniteError, StepRunner
from tiny import tiny_llama

L = 4


def batches(n_steps, accum=1, bs=2, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        mbs = []
        for _ in range(accum):
            ids = torch.randint(3, 100, (bs, seq), generator=g)
            mbs.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        out.append(mbs)
    return out


def run(cfg: TrainConfig, model=None, steps=None, data=None):
    model = model if model is not None else tiny_llama(layers=L)
    prepared = prepare(model, cfg)
    runner = StepRunner(prepared, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm)
    results = [runner.train_step(t, mbs) for t, mbs in enumerate(data or batches(steps or cfg.max_steps,
                                                                                  cfg.grad_accum))]
    return model, runner, results


def in_lockstep(ours, ref, steps):
    """Run ``steps`` (callables taking the step index) on both arms, setting ``ref``'s weights to ``ours`` before
    each step and comparing them after it (the module docstring's bound)."""
    for t, step in enumerate(steps):
        with torch.no_grad():
            for p, q in zip(ours.parameters(), ref.parameters()):
                q.copy_(p)
        step(t)
        for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p, q, msg=f"step {t}: {n}")


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_probe_only_leaves_every_weight_bit_identical():
    model = tiny_llama(layers=L)
    before = snapshot(model)
    cfg = TrainConfig(method="grass", gamma=2, probe_steps=5, max_steps=6, lr=1e-2, probe_mode="measure")
    _, runner, res = run(cfg, model, steps=5)
    assert all(r.probe for r in res)
    assert moved(before, model) == set()
    assert all(p.grad is None for p in model.parameters())
    # every block was measured during the probe
    assert runner.sampler.window.count.tolist() == [5] * L


def test_only_drawn_blocks_change_and_new_blocks_move():
    cfg = TrainConfig(method="grass", gamma=1, probe_steps=1, sample_interval=1, update_interval=2, max_steps=12,
                      lr=1e-2, tau=10.0, train_embeddings=False, train_head=False)
    model = tiny_llama(layers=L)
    prepared = prepare(model, cfg)
    runner = StepRunner(prepared, max_grad_norm=1.0)
    layout = prepared.layout
    drawn = set()
    for t, mbs in enumerate(batches(12)):
        before = snapshot(model)
        r = runner.train_step(t, mbs)
        changed = moved(before, model)
        if r.probe:
            assert changed == set()
            continue
        expected = {n for b in r.active for n in layout.blocks[b]}
        assert changed == expected, f"step {t}: active {r.active}"
        drawn |= set(r.active)
    assert len(drawn) >= 3  # the active set changed several times, and each newly drawn block moved


@pytest.mark.parametrize("method,keys,expect_emb", [
    ("grass", {"train_embeddings": False, "train_head": False}, False),  # the paper's layout
    ("grass", {}, True),  # the default: trained at every step, as LISA's
    ("lisa", {"train_embeddings": False, "train_head": False}, True),  # LISA as shipped trains them whatever is set
])
def test_frozen_embeddings_and_head_do_not_move_but_lisa_trains_them(method, keys, expect_emb):
    model = tiny_llama(layers=L)
    before = snapshot(model)
    run(TrainConfig(method=method, gamma=1, probe_steps=1, max_steps=4, lr=1e-2, **keys), model)
    changed = moved(before, model)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert (name in changed) == expect_emb, (method, name)


def test_uniform_control_at_its_defaults_is_lisa_with_offloaded_state():
    """grass-uniform at its defaults (embeddings and head trained) draws the blocks LISA draws and makes the same
    updates, so LISA's quality figures are the control's; only where the optimizer state lives differs (LISA: torch
    AdamW, state on the device and never freed). Both optimizers run AdamW's fp32 arithmetic, in different kernels:
    compared in lockstep (the module docstring's bound)."""
    data = batches(8)
    arms = {}
    for method in ("grass-uniform", "lisa"):
        cfg = TrainConfig(method=method, gamma=1, sample_interval=2, max_steps=8, lr=1e-2)
        arms[method] = StepRunner(prepare(tiny_llama(layers=L), cfg), max_grad_norm=cfg.max_grad_norm)
    u, lisa = arms["grass-uniform"], arms["lisa"]
    drawn = {"grass-uniform": [], "lisa": []}
    in_lockstep(u.p.model, lisa.p.model, [
        lambda t: [drawn[m].append(arms[m].train_step(t, data[t]).active) for m in arms] for _ in data])
    assert drawn["grass-uniform"] == drawn["lisa"] and len({tuple(a) for a in drawn["lisa"]}) > 1
    assert u.p.always == lisa.p.always != []
    assert u.p.offload and not lisa.p.offload


@pytest.mark.parametrize("train_head", [False, True])
def test_train_head_trains_a_tied_head(train_head):
    """With tied embeddings the head is the embedding matrix: train_head=true must move it (it used to stay
    frozen, since the tied tensor is listed once, as an embedding), and train_head=false must not."""
    model = tiny_llama(layers=L, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = snapshot(model)
    run(TrainConfig(method="grass", gamma=1, probe_steps=1, max_steps=3, lr=1e-2, train_embeddings=False,
                    train_head=train_head), model)
    changed = moved(before, model)
    assert ("model.embed_tokens.weight" in changed) == train_head
    assert ("model.norm.weight" in changed) == train_head


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("offload", [True, False])
def test_all_blocks_no_probe_matches_plain_adamw_loop(accum, clip, offload):
    model = tiny_llama(layers=L)
    ref = copy.deepcopy(model)
    data = batches(4, accum)
    cfg = TrainConfig(method="grass", gamma=L, probe_steps=0, train_embeddings=True, train_head=True, max_steps=4,
                      lr=1e-2, weight_decay=0.1, grad_accum=accum, max_grad_norm=clip, offload=offload)
    runner = StepRunner(prepare(model, cfg), grad_accum=accum, max_grad_norm=clip)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)

    def step(t):  # ours, then the reference: a plain PyTorch loop
        runner.train_step(t, data[t])
        for mb in data[t]:
            (ref(**mb).loss / accum).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    in_lockstep(model, ref, [step] * len(data))


def test_offloaded_state_is_off_device_and_flat():
    cfg = TrainConfig(method="grass", gamma=1, probe_steps=1, sample_interval=1, max_steps=10, lr=1e-3)
    _, runner, _ = run(cfg)
    rep = runner.p.optimizer.memory_report()
    assert rep["device_state_bytes"] == 0 and rep["host_state_bytes"] > 0
    # LISA as shipped: torch AdamW keeps every drawn block's state where the parameters live
    lisa = TrainConfig(method="lisa", gamma=1, sample_interval=1, max_steps=10, lr=1e-3)
    _, lrunner, _ = run(lisa)
    assert not hasattr(lrunner.p.optimizer, "memory_report")
    assert len(lrunner.p.optimizer.state) > 0


@pytest.mark.parametrize("embeddings_and_head", [False, True])
def test_gradient_checkpointing_with_lowest_block_frozen(monkeypatch, embeddings_and_head):
    """Checkpointed blocks 0-1 frozen: with the embeddings frozen backward stops above them; trained (the default),
    it runs through the frozen checkpointed blocks down to the input embedding, which must then move."""
    import grass_ft.method.sampler as sampler_mod
    from grass_ft.model import enable_checkpointing

    monkeypatch.setattr(sampler_mod, "draw", lambda logp, k, g: [2])  # the lowest blocks stay frozen
    model = tiny_llama(layers=L)
    enable_checkpointing(model)
    before = snapshot(model)
    cfg = TrainConfig(method="grass", gamma=1, probe_steps=2, sample_interval=100, max_steps=4, lr=1e-2,
                      train_embeddings=embeddings_and_head, train_head=embeddings_and_head, probe_mode="measure")
    prepared = prepare(model, cfg)
    runner = StepRunner(prepared)
    for t, mbs in enumerate(batches(4)):
        r = runner.train_step(t, mbs)
    assert r.active == [2]
    assert moved(before, model) == set(prepared.layout.blocks[2]) | set(prepared.always)
    assert ("model.embed_tokens.weight" in prepared.always) == embeddings_and_head
    assert runner.sampler.window.count.tolist() == [0, 0, 2, 0]  # only the trained block is measured after the probe
    assert runner.sampler.mgn.gt(0).all()  # the probe measured every block under checkpointing too


def test_non_finite_loss_is_skipped_then_stops():
    model = tiny_llama(layers=L)
    cfg = TrainConfig(method="grass", gamma=2, probe_steps=0, max_steps=10, lr=1e-2)
    prepared = prepare(model, cfg)
    runner = StepRunner(prepared, max_bad_steps=3)
    good = batches(1)[0]

    def nan_forward(m, mb):
        return m(**mb).loss * float("nan")

    before = snapshot(model)
    r = runner.train_step(0, good, forward=nan_forward)
    assert r.skipped and runner.skipped_steps == 1 and moved(before, model) == set()
    r = runner.train_step(1, good)
    assert not r.skipped and runner.bad_in_a_row == 0
    runner.train_step(2, good, forward=nan_forward)
    runner.train_step(3, good, forward=nan_forward)
    with pytest.raises(NonFiniteError, match="3 consecutive steps had a non-finite loss"):
        runner.train_step(4, good, forward=nan_forward)
