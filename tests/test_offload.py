"""LayerwiseOffloadAdamW against torch.optim.AdamW on a tiny Llama, plus memory, checkpoint and reset contracts.

Tolerances (issue 28). The comparisons with torch's AdamW run the two arms in lockstep (:func:`train_pair`): before
every step the reference's weights are set to ours, so both see bit-identical gradients (the same ops on the same
values and shapes, in one process), and what is compared is one step of optimizer arithmetic. Ours is torch's
single-tensor AdamW op for op (``adamw_chunk``), elementwise; the only difference a CPU can make is where a
vectorised kernel's scalar tail falls (it depends on the vector width, i.e. ``ATEN_CPU_CAPABILITY``, and on our
chunk boundaries), and a vector lane and a scalar tail may round one op differently (a fused multiply-add against
a multiply and an add: at most 1 ulp, u = 2**-24 relative, per op). One step is 7 such ops, and the moments, EMAs
of bit-identical gradients, carry at most (1 - beta)^-1 of those roundings forward -- for the <= 10 steps here,
below 10 x 2u relative for m and v. So a step's update (|update| <= ~3 lr) differs by at most ~ (7 + 10 + 5) u x 3 lr
~ 4e-8 at lr 1e-2, and the moments by ~20u ~ 1.2e-6 relative: inside assert_close's float32 defaults (atol 1e-5
for the weights; rtol 1.3e-6 ~ 22u for the moments). Without lockstep no bound exists: one ulp of a weight changes
the next gradients, and Adam divides a cancelling gradient element's rounding noise by sqrt(v) ~ the same noise,
turning it into an update of ~lr whatever its sign (test_loss explains it) -- which is why the weights after
several steps were never the thing to compare. Comparisons of ours with ours (same code, same chunks) are exact.
"""

from __future__ import annotations

import copy
import functools
import io
import random

import pytest
import torch
from torch import nn

from grass_ft.method.offload import LayerwiseOffloadAdamW, block_key

transformers = pytest.importorskip("transformers")

N_LAYERS = 4
BLOCKS = [f"model.layers.{i}" for i in range(N_LAYERS)]
# (active blocks, embeddings trainable) per step: blocks drop out and come back, one step has a single block
SWITCHING = [({0, 1}, True), ({2, 3}, False), ({1, 2}, True), ({0, 3}, False), ({3}, True)]
ALL_ACTIVE = [(set(range(N_LAYERS)), True)] * len(SWITCHING)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@functools.cache
def _tiny_llama(seed: int, tie: bool) -> nn.Module:
    torch.manual_seed(seed)
    # eager attention: deterministic backward on CUDA too, so both arms see bit-identical gradients
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      attn_implementation="eager", tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config)


def tiny_llama(seed: int = 0, tie: bool = False) -> nn.Module:
    """A fresh copy of a cached tiny Llama (building one takes seconds; copying it, milliseconds)."""
    return copy.deepcopy(_tiny_llama(seed, tie))


def set_active(model: nn.Module, blocks: set[int], embeddings: bool = True) -> None:
    for i, layer in enumerate(model.model.layers):
        layer.requires_grad_(i in blocks)
    model.model.embed_tokens.requires_grad_(embeddings)


def train(model, opt, schedule, *, accum=1, clip=False, seed=1, scheduler=None):
    """Runs the schedule; both arms of a comparison call this with the same seed, so they see the same batches."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for blocks, embeddings in schedule:
        set_active(model, blocks, embeddings)
        for _ in range(accum):
            ids = torch.randint(0, 128, (2, 8), generator=gen).to(device)
            (model(input_ids=ids, labels=ids).loss / accum).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()


def train_pair(model, opt, ref, ref_opt, schedule, *, accum=1, clip=False, seed=1, schedulers=()):
    """:func:`train` on both arms in lockstep: before each step the reference gets our weights (so both compute
    bit-identical gradients), after it the weights are compared (the module docstring's bound). Returns the number
    of steps compared."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    steps = 0
    for blocks, embeddings in schedule:
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref.parameters()):
                q.copy_(p)
        batches = [torch.randint(0, 128, (2, 8), generator=gen).to(device) for _ in range(accum)]
        for m, o in ((model, opt), (ref, ref_opt)):
            set_active(m, blocks, embeddings)
            for ids in batches:
                (m(input_ids=ids, labels=ids).loss / accum).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            o.step()
            o.zero_grad(set_to_none=True)
        for sched in schedulers:
            sched.step()
        assert_same_params(model, ref)
        steps += 1
    return steps


def assert_same_params(model, ref, exact: bool = False):
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        tol = {"rtol": 0, "atol": 0} if exact else {}  # exact: ours against ours, the same ops on the same chunks
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}", **tol)


def assert_same_state(opt, ref_opt, ref_model):
    names = {p: n for n, p in ref_model.named_parameters()}
    ours = opt.state_dict()["state"]
    theirs = {names[p]: s for p, s in ref_opt.state.items()}
    assert ours.keys() == theirs.keys()
    for name, s in theirs.items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[name][k], s[k].cpu(), msg=lambda m, name=name, k=k: f"{name}.{k}: {m}")


def block_state_bytes(model) -> int:
    """Moments (2 x fp32) plus one fp32 step per parameter of one decoder block."""
    params = list(model.model.layers[0].parameters())
    return sum(8 * p.numel() + 4 for p in params)


def test_block_key():
    assert block_key("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert block_key("0.weight") == "0"
    assert block_key("model.norm.weight") == "model.norm.weight"
    assert block_key("lm_head.weight") == "lm_head.weight"


def test_one_group_per_block_with_names():
    model = tiny_llama()
    opt = LayerwiseOffloadAdamW(model.named_parameters())
    assert [g["name"] for g in opt.param_groups] == ["model.embed_tokens.weight", *BLOCKS, "model.norm.weight",
                                                     "lm_head.weight"]
    assert opt.param_groups[1]["param_names"][0] == "model.layers.0.self_attn.q_proj.weight"
    assert all(len(g["params"]) == len(g["param_names"]) for g in opt.param_groups)
    one = LayerwiseOffloadAdamW(model.named_parameters(), group_fn=lambda name: "all")
    assert [g["name"] for g in one.param_groups] == ["all"]
    assert one.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]


def test_bad_hyperparameters_are_all_reported():
    with pytest.raises(ValueError, match=r"`lr` must be >= 0, got -1.*`betas\[1\]` must be in \[0, 1\), got 1.5"):
        LayerwiseOffloadAdamW(nn.Linear(2, 2).named_parameters(), lr=-1, betas=(0.9, 1.5))


def state_bytes(model, masters: bool = False) -> int:
    """Host slab of a model, computed independently: exp_avg + exp_avg_sq (+ master) in fp32 per element."""
    return sum((12 if masters else 8) * p.numel() for p in model.parameters())


# 1000 elements: every 64x64 projection is 5 chunks, the 128x64 embedding 9, a block 37+ (several per param, per block)
CHUNKS = [None, 1000]


@pytest.mark.parametrize("chunk_size", CHUNKS, ids=["one-chunk", "chunks-of-1000"])
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
@pytest.mark.parametrize("accum,clip", [(1, False), (2, True)], ids=["plain", "accum2-clip"])
@pytest.mark.parametrize("schedule", [ALL_ACTIVE, SWITCHING], ids=["all-active", "switching"])
def test_matches_adamw(schedule, accum, clip, offload, chunk_size):
    model = tiny_llama()
    ref = copy.deepcopy(model)
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, offload=offload, **extra)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    before = copy.deepcopy(model.state_dict())
    # lockstep, weights compared after every step; the moments at the end (module docstring: the bounds)
    assert train_pair(model, opt, ref, ref_opt, schedule, accum=accum, clip=clip) == len(schedule)
    assert_same_state(opt, ref_opt, ref)
    # every block was active at some point, so every block moved (ANCHORS: the new block's weights move)
    for name in BLOCKS:
        assert not torch.equal(model.state_dict()[f"{name}.mlp.up_proj.weight"], before[f"{name}.mlp.up_proj.weight"])
    report = opt.memory_report()
    if offload:
        assert report["device_state_bytes"] == 0
        assert report["host_state_bytes"] == state_bytes(model)  # fp32 parameters: no masters, no extra bytes
    else:
        assert report["host_state_bytes"] == 0
        assert report["device_state_bytes"] == state_bytes(model)  # every group has stepped


def test_device_state_flat_over_100_switches():
    model = tiny_llama()
    opt = LayerwiseOffloadAdamW(model.named_parameters(), offload=True)
    slab = opt._slabs[0].data_ptr()
    per_block, rng = block_state_bytes(model), random.Random(0)
    peaks = []
    for _ in range(100):
        active = rng.sample(range(N_LAYERS), 2)
        for i in active:  # synthetic gradients: this test is about the optimizer, not the model
            for p in model.model.layers[i].parameters():
                p.grad = torch.randn_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        report = opt.memory_report()
        assert report["device_state_bytes"] == 0
        peaks.append(report["peak_device_state_bytes"])
    # a ring of 3 records of the largest chunk (fp32: exp_avg + exp_avg_sq) plus the denominator buffer, every
    # step the same, and below the two active blocks' moments
    largest = max(p.numel() for p in model.model.layers[0].parameters())
    assert peaks == [3 * 2 * 4 * largest + 4 * largest] * 100
    assert peaks[0] < 2 * (per_block - 4 * len(list(model.model.layers[0].parameters())))
    # one slab, allocated in the constructor, never reallocated
    assert len(opt._slabs) == 1 and opt._slabs[0].data_ptr() == slab
    assert opt.memory_report()["host_state_bytes"] == state_bytes(model)


def test_no_offload_keeps_state_on_device():
    model = tiny_llama()
    opt = LayerwiseOffloadAdamW(model.named_parameters(), offload=False)
    train(model, opt, [({0}, False)])
    report = opt.memory_report()
    assert report["host_state_bytes"] == 0
    # created per group on its first step: block 0, the final norm and the head (embeddings frozen)
    stepped = [*model.model.layers[0].parameters(), model.model.norm.weight, model.lm_head.weight]
    assert report["device_state_bytes"] == sum(8 * p.numel() for p in stepped)
    train(model, opt, [({1, 2, 3}, True)])
    assert opt.memory_report()["device_state_bytes"] == state_bytes(model)


@pytest.mark.parametrize("src_offload,dst_offload", [(True, True), (False, False), (True, False)])
def test_state_dict_round_trip_resumes_exactly(src_offload, dst_offload):
    model = tiny_llama()
    ref = copy.deepcopy(model)
    ref_opt = LayerwiseOffloadAdamW(ref.named_parameters(), lr=1e-2, offload=src_offload)
    train(ref, ref_opt, SWITCHING + SWITCHING[:3])

    opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-2, offload=src_offload)
    train(model, opt, SWITCHING)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = tiny_llama(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = LayerwiseOffloadAdamW(resumed.named_parameters(), lr=5.0, offload=dst_offload)
    resumed_opt.load_state_dict(checkpoint["optim"])
    assert resumed_opt.param_groups[0]["lr"] == 1e-2
    # the resumed half must see the batches the uninterrupted run saw after SWITCHING; the same optimizer code on
    # the same chunks (chunking does not depend on offload) and the same model ops: bit-identical, not close
    train_tail(resumed, resumed_opt, SWITCHING + SWITCHING[:3], start=len(SWITCHING), seed=1)
    assert_same_params(resumed, ref, exact=True)


def train_tail(model, opt, schedule, *, start, seed):
    """Like :func:`train` but skips the first ``start`` steps' batches, to resume a run mid-way."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(start):
        torch.randint(0, 128, (2, 8), generator=gen)
    for blocks, embeddings in schedule[start:]:
        set_active(model, blocks, embeddings)
        ids = torch.randint(0, 128, (2, 8), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_load_reports_missing_name():
    model = tiny_llama()
    opt = LayerwiseOffloadAdamW(model.named_parameters())
    train(model, opt, SWITCHING[:1])
    state = opt.state_dict()
    name = "model.layers.1.mlp.up_proj.weight"
    state["state"].pop(name)
    for group in state["param_groups"]:
        if name in group["param_names"]:
            group["param_names"].remove(name)
    with pytest.raises(ValueError, match=r"missing names.*'model\.layers\.1\.mlp\.up_proj\.weight'"):
        LayerwiseOffloadAdamW(tiny_llama().named_parameters()).load_state_dict(state)


def test_load_reports_unexpected_name():
    model = tiny_llama()
    opt = LayerwiseOffloadAdamW(model.named_parameters())
    state = opt.state_dict()
    state["param_groups"][1]["param_names"].append("model.layers.9.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"unexpected names.*'model\.layers\.9\.mlp\.up_proj\.weight'"):
        opt.load_state_dict(state)


@pytest.mark.parametrize("key", ["model.layers.0", "model.layers.0.mlp.up_proj.weight"], ids=["block", "param"])
def test_reset_state_behaves_as_fresh(key):
    model = tiny_llama()
    opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-2)
    train(model, opt, [({0}, False)] * 3)
    opt.reset_state(key)
    assert key not in opt.state_dict()["state"]
    # from here on only the reset parameters train, against a fresh AdamW that holds just them
    ref = copy.deepcopy(model)
    for m in (model, ref):
        m.requires_grad_(False)
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith(key))
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):  # in lockstep (module docstring): equal weights before each step, compared after it
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref.parameters()):
                q.copy_(p)
        ids = torch.randint(0, 128, (2, 8), generator=gen)
        for m, o in ((model, opt), (ref, ref_opt)):
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
        assert_same_params(model, ref)
    state = opt.state_dict()["state"]
    for name, _ in model.model.layers[0].named_parameters(prefix="model.layers.0"):
        # reset parameters restarted (3 fresh steps); the rest of the block kept its 3 steps
        assert state[name]["step"].item() == 3.0
    with pytest.raises(ValueError, match=r"unknown group keys or parameter names: \['nope'\]"):
        opt.reset_state(["nope"])


def test_lr_scheduler_matches_adamw():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    ref_schedule = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda step: 1.0 / (1 + step))
    train_pair(model, opt, ref, ref_opt, SWITCHING, schedulers=(schedule, ref_schedule))
    # LambdaLR computes base_lr x factor in float64: a few ulps of 2**-53, far inside approx's default rel 1e-6
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2 / (1 + len(SWITCHING)))


def test_tied_parameters_count_once():
    model = tiny_llama(tie=True)
    ref = copy.deepcopy(model)
    named = list(model.named_parameters(remove_duplicate=False))
    opt = LayerwiseOffloadAdamW(named, lr=1e-2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters())) < len(named)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    train_pair(model, opt, ref, ref_opt, SWITCHING[:3])


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_step_runs_on_fake_tensors(offload):
    """The memory estimate runs step() under FakeTensorMode: a fake tensor has no value, so an .item(), a host
    sync or a Python branch on a tensor value in step() would raise here."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = nn.Sequential(nn.Linear(64, 64, dtype=torch.bfloat16), nn.Linear(64, 64))
        opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-3, chunk_size=1000, offload=offload)
        for _ in range(2):
            model[1](model[0](torch.randn(4, 64, dtype=torch.bfloat16)).float()).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    report = opt.memory_report()
    # offload: 3 ring slots of a bf16 record (3 x 1000) + denominator + up-cast gradient; without: the stores
    # (4160 elements per layer: 3 floats each for the bf16 layer, 2 for the fp32 one) + the same two buffers
    assert report["peak_device_state_bytes"] == (4 * (3 * 3000 + 1000 + 1000) if offload else
                                                 4 * (3 * 4160 + 2 * 4160) + 4 * (1000 + 1000))


@pytest.mark.parametrize("chunk_size", CHUNKS, ids=["one-chunk", "chunks-of-1000"])
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_matches_adamw(offload, chunk_size):
    model = tiny_llama().cuda()
    ref = copy.deepcopy(model)
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, offload=offload, **extra)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)  # foreach on CUDA: same ops, fused
    # lockstep (module docstring); on CUDA eager attention makes the backward deterministic, so equal weights give
    # bit-identical gradients here too, and foreach kernels round each op as the single-tensor ones (<= 1 ulp/op)
    train_pair(model, opt, ref, ref_opt, SWITCHING, accum=2, clip=True)
    assert_same_state(opt, ref_opt, ref)
    report = opt.memory_report()
    if offload:
        assert report["device_state_bytes"] == 0 and report["host_pinned"]
        assert all(t.is_pinned() for t in opt._slabs)  # registered in place, at its exact size
    else:
        assert report["host_state_bytes"] == 0


class Stack(nn.Module):
    """Large blocks named like decoder layers (``layers.i``), so that copies take long enough for a race to show."""

    def __init__(self, n: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))


@pytest.mark.parametrize("chunk_size", [None, 1 << 20], ids=["one-chunk", "4-chunks-per-weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-masters"])
@pytest.mark.parametrize("delay_compute", [False, True], ids=["plain", "slow-compute"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_large_blocks_many_steps_no_race(delay_compute, dtype, chunk_size):
    torch.manual_seed(0)
    ref = Stack(8, 2048).cuda()  # 4M parameters, 32 MiB of moments per block
    model = copy.deepcopy(ref).to(dtype)
    if dtype != torch.float32:  # the fp32 reference starts from the same bf16-representable weights
        ref = copy.deepcopy(model).float()
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-3, **extra)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    gen, rng = torch.Generator(device="cuda").manual_seed(0), random.Random(0)
    for _ in range(40):
        active = rng.sample(range(8), rng.randint(1, 8))
        for i in active:
            for p, q in zip(model.layers[i].parameters(), ref.layers[i].parameters()):
                p.grad = torch.randn(p.shape, device="cuda", generator=gen).to(dtype)
                q.grad = p.grad.float()
        # plain: a 32 MiB H2D copy outlasts the update, so an update that did not wait for its fetch reads a
        # partial record. slow-compute: a long kernel delays the updates, so a write-back that did not wait for
        # the update copies stale moments, a ring slot refilled before its D2H copy read it corrupts the host
        # store, and a next step whose H2D did not wait for the last D2H copies reads stale host state
        if delay_compute:
            torch.cuda._sleep(50_000_000)
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        assert opt.memory_report()["device_state_bytes"] == 0
    # state_dict waits on the last copies' events itself: no synchronize here on purpose
    state = opt.state_dict()["state"]
    # synthetic gradients, the same values in both arms (q.grad = p.grad): no weight feeds back into a gradient,
    # so only the per-op rounding of the module docstring accumulates: <= 40 steps x ~20u x |update| on the
    # weights (< 1e-6 absolute at lr 1e-3) and ~20u relative on the moments (EMAs: older roundings decay) --
    # inside the float32 defaults (rtol 1.3e-6, atol 1e-5)
    for name, q in ref.named_parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[name][k], ref_opt.state[q][k].cpu())
        if dtype == torch.float32:
            torch.testing.assert_close(dict(model.named_parameters())[name], q)
        else:  # the master follows fp32 AdamW; the parameter is its rounding
            torch.testing.assert_close(state[name]["master"], q.detach().cpu())
            assert torch.equal(dict(model.named_parameters())[name].cpu(), state[name]["master"].to(dtype))


@pytest.mark.gpu
@needs_cuda
def test_cuda_step_peak_is_bounded_by_the_chunk():
    torch.manual_seed(0)
    chunk = 1 << 18
    model = Stack(4, 2048).cuda().to(torch.bfloat16)  # 4M-element weights: 16 chunks each
    opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-3, chunk_size=chunk)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for _ in range(3):
        torch.cuda.synchronize()  # only to read the allocator's statistics at a quiet point
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        grown = torch.cuda.max_memory_allocated() - base
        report = opt.memory_report()
        # ring 3 x [exp_avg | exp_avg_sq | master] + denominator + up-cast gradient, each chunk-long fp32
        assert report["peak_device_state_bytes"] == (3 * 3 + 1 + 1) * 4 * chunk
        assert grown <= report["peak_device_state_bytes"] + 4 * 512  # the allocator rounds blocks to 512 B
        assert torch.cuda.memory_allocated() == base and report["device_state_bytes"] == 0
