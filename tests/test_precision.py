"""bf16 parameters with fp32 master weights (issue 12): against an fp32 AdamW run, against pure-bf16 AdamW, through
a checkpoint, and the bounded step's memory counted by an independent allocation tracker."""

from __future__ import annotations

import copy
import io
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from grass_ft.method.offload import LayerwiseOffloadAdamW

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype: torch.dtype = torch.bfloat16, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   attn_implementation="eager", initializer_range=0.02)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def lm_steps(models: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer], steps: int, seed: int = 1,
             skip: int = 0) -> None:
    """The same batches for every arm; ``skip`` batches are drawn and dropped first (to resume mid-run)."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(skip + steps):
        ids = torch.randint(0, 128, (4, 16), generator=gen)
        if t < skip:
            continue
        for k, model in models.items():
            model(input_ids=ids, labels=ids).loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)


def masters(opt: LayerwiseOffloadAdamW) -> dict[str, torch.Tensor]:
    return {n: s["master"] for n, s in opt.state_dict()["state"].items() if "master" in s}


@pytest.mark.parametrize("chunk_size", [None, 100], ids=["one-chunk", "chunks-of-100"])
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_master_is_fp32_adamw_and_param_its_rounding(offload, chunk_size):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(24, 24), nn.Linear(24, 8)).to(torch.bfloat16)
    ref = copy.deepcopy(layer).float()  # fp32 from the same (bf16-representable) init
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    opt = LayerwiseOffloadAdamW(layer.named_parameters(), lr=1e-3, weight_decay=0.1, offload=offload, **extra)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(6):
        for p, q in zip(layer.parameters(), ref.parameters()):
            p.grad = torch.randn(p.shape).to(torch.bfloat16)
            q.grad = p.grad.float()  # both arms update from the same gradient values
        opt.step()
        ref_opt.step()
    state = opt.state_dict()["state"]
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        # the master update is torch's fp32 AdamW arithmetic on the same fp32 values, op for op, with synthetic
        # gradients (no weight feeds back into a gradient): per step <= 1 ulp per op where a vector lane and a
        # scalar tail round differently, ~20u of an update <= 3 lr, so after 6 steps <= 6 x 20u x 3e-3 ~ 2e-8
        # absolute on the weights and ~20u ~ 1.2e-6 relative on the moments: inside the float32 defaults
        torch.testing.assert_close(state[name]["master"], q.detach())
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[name][k], ref_opt.state[q][k])
        # the parameter is the master rounded once to bf16: bit-exact
        assert torch.equal(p.detach(), state[name]["master"].to(torch.bfloat16)), name


def test_lr_1e5_bf16_with_masters_tracks_fp32_while_pure_bf16_drifts():
    base = tiny_llama(torch.bfloat16)
    models = {"fp32": copy.deepcopy(base).float(), "master": copy.deepcopy(base), "pure": copy.deepcopy(base)}
    init = {n: p.detach().float().clone() for n, p in models["fp32"].named_parameters()}
    opts = {"fp32": torch.optim.AdamW(models["fp32"].parameters(), lr=1e-5, weight_decay=0.0),
            "master": LayerwiseOffloadAdamW(models["master"].named_parameters(), lr=1e-5, weight_decay=0.0),
            "pure": torch.optim.AdamW(models["pure"].parameters(), lr=1e-5, weight_decay=0.0)}
    lm_steps(models, opts, steps=8)
    fp32 = dict(models["fp32"].named_parameters())
    pure = dict(models["pure"].named_parameters())
    master = masters(opts["master"])
    for name, p in models["master"].named_parameters():
        if p.dim() < 2:  # norms are initialised to 1.0, where bf16's ulp is large: the matrices carry the test
            continue
        moved = fp32[name].detach() - init[name]
        rel = lambda delta: ((delta - moved).norm() / moved.norm()).item()  # noqa: E731
        # the arms' gradients differ only by the bf16 forward's rounding (2^-9 relative per op, a few percent
        # through the model); Adam's update is scale-free, so the masters' movement is off by about that much
        assert rel(master[name] - init[name]) < 0.1, name
        assert torch.equal(p.detach(), master[name].to(torch.bfloat16)), name
        # pure bf16: Adam's first step moves every weight by lr = 1e-5, which rounds to nothing wherever half a
        # bf16 ulp exceeds it, i.e. |w| >= 2^-8 (ulp 2^-15); later steps round back the same way
        unchanged = (pure[name].detach().float() == init[name]).float().mean().item()
        predicted = (init[name].abs() >= 2 ** -8).float().mean().item()
        assert predicted > 0.5 and unchanged >= 0.8 * predicted, (name, unchanged, predicted)
        assert rel(pure[name].detach().float() - init[name]) > 0.5, name
        assert (moved != 0).float().mean().item() > 0.95  # while the fp32 run moved (almost) every weight


def test_make_adamw_gives_bf16_methods_masters_unless_turned_off():
    from grass_ft.config import TrainConfig
    from grass_ft.method.methods import prepare

    for method in ("fft", "lisa", "grass"):
        p = prepare(tiny_llama(torch.bfloat16), TrainConfig(method=method, gamma=1, probe_steps=1))
        assert isinstance(p.optimizer, LayerwiseOffloadAdamW), method
        assert p.optimizer._master_weights and p.offload == (method == "grass")
    # master_weights=false: LISA/FFT as shipped (torch AdamW on bf16), GRASS without masters
    for method in ("fft", "lisa"):
        p = prepare(tiny_llama(torch.bfloat16), TrainConfig(method=method, gamma=1, master_weights=False))
        assert type(p.optimizer) is torch.optim.AdamW, method
    p = prepare(tiny_llama(torch.bfloat16), TrainConfig(method="grass", gamma=1, probe_steps=1,
                                                        master_weights=False))
    assert not p.optimizer._master_weights
    # fp32 needs no master: stock torch AdamW for FFT/LISA, as before
    assert type(prepare(tiny_llama(torch.float32), TrainConfig(method="fft")).optimizer) is torch.optim.AdamW


def test_torch_adamw_is_fused_on_cuda_and_the_per_tensor_loop_on_the_cpu():
    """Stock torch AdamW (fp32, or master_weights=false) takes transformers' CUDA default, the fused kernel, on
    CUDA; on the CPU torch's own default, as every recorded CPU figure."""
    from grass_ft.config import TrainConfig
    from grass_ft.method.methods import prepare

    p = prepare(tiny_llama(torch.float32), TrainConfig(method="fft"))
    assert type(p.optimizer) is torch.optim.AdamW and not p.optimizer.defaults["fused"]
    if not torch.cuda.is_available():
        pytest.skip("the CUDA half needs a CUDA device")
    for method, dtype, keys in (("fft", torch.float32, {}), ("lisa", torch.bfloat16, {"master_weights": False})):
        p = prepare(tiny_llama(dtype).cuda(), TrainConfig(method=method, gamma=1, **keys))
        assert type(p.optimizer) is torch.optim.AdamW and p.optimizer.defaults["fused"] is True, method


def test_float16_without_master_weights_is_one_line(capsys):
    from grass_ft.frontends.cli import main

    assert main(["validate", "dtype=float16", "master_weights=false"]) == 2
    err = capsys.readouterr().err
    assert "`master_weights` must be true with dtype=float16" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main(["validate", "dtype=float16"]) == 0  # with masters (the default) float16 is accepted now


def fp16_arms(loss_factor: float, steps: int = 8, init_scale: float = 2.0 ** 16):
    """fp32 torch AdamW, and fp16 with masters through the loss scaler (and unscaled, ``init_scale=1``), on the
    same batches; the loss multiplied by ``loss_factor`` (Adam's update does not depend on it in exact arithmetic)."""
    from grass_ft.method.loss_scale import LossScaler

    base = tiny_llama(torch.float16)
    models = {"fp32": copy.deepcopy(base).float(), "fp16": copy.deepcopy(base)}
    init = {n: p.detach().float().clone() for n, p in models["fp32"].named_parameters()}
    ref = torch.optim.AdamW(models["fp32"].parameters(), lr=1e-5, weight_decay=0.0)
    opt = LayerwiseOffloadAdamW(models["fp16"].named_parameters(), lr=1e-5, weight_decay=0.0)
    scaler = LossScaler(init_scale=init_scale)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 128, (4, 16), generator=gen)
        (models["fp32"](input_ids=ids, labels=ids).loss * loss_factor).backward()
        ref.step()
        ref.zero_grad(set_to_none=True)
        (models["fp16"](input_ids=ids, labels=ids).loss * loss_factor * scaler.scale).backward()
        scaler.step(opt, list(models["fp16"].parameters()), max_norm=0.0)
        opt.zero_grad(set_to_none=True)
    return models, opt, scaler, init


def _rel_to_fp32(models, opt, init) -> dict[str, float]:
    fp32 = dict(models["fp32"].named_parameters())
    out = {}
    for name, m in masters(opt).items():
        if m.dim() < 2:  # norms start at 1.0 (see the bf16 test): the matrices carry the comparison
            continue
        moved = fp32[name].detach() - init[name]
        out[name] = ((m - init[name] - moved).norm() / moved.norm()).item()
    return out


def test_float16_with_loss_scaling_tracks_fp32_as_bf16_does():
    # The loss is scaled down by 2^-16 (a small loss, as a tiny learning signal is): its gradients, ~1e-3 x 2^-16 ~
    # 1.5e-8, lie below fp16's smallest subnormal (2^-24 ~ 6e-8), so unscaled they flush to zero, while the loss
    # scaler's 2^16 brings them back into fp16's normal range. Scaled, the masters track fp32 with the bound of the
    # bf16 test (0.1 of the movement): the arms differ only by the fp16 forward's rounding, 2^-11 relative per op,
    # finer than bf16's 2^-8, and Adam is scale-free. Unscaled, most gradients are zero: off by more than half.
    models, opt, scaler, init = fp16_arms(2.0 ** -16)
    rel = _rel_to_fp32(models, opt, init)
    assert rel and max(rel.values()) < 0.1, rel
    assert scaler.overflow_steps == 0 and scaler.scale == 2.0 ** 16
    for name, p in models["fp16"].named_parameters():  # the weights are the masters rounded once to fp16
        assert torch.equal(p.detach(), masters(opt)[name].to(torch.float16)), name
    models, opt, _, init = fp16_arms(2.0 ** -16, init_scale=1.0)
    assert max(_rel_to_fp32(models, opt, init).values()) > 0.5


def test_float16_overflow_steps_are_skipped_counted_and_back_off_the_scale():
    # At 2^30 the loss's gradient at the fp16 logits alone, scale / 64 tokens ~ 2^24, is far beyond fp16's 65504:
    # the first steps overflow; each halves the scale (GradScaler's backoff 0.5) and updates nothing, until the
    # scaled gradients fit (measured: 12 halvings, to 2^18); then no step overflows again within 20
    models, opt, scaler, init = fp16_arms(1.0, steps=20, init_scale=2.0 ** 30)
    k = scaler.overflow_steps
    assert 1 <= k < 20 and scaler.scale == 2.0 ** (30 - k)
    steps = {n: s["step"].item() for n, s in opt.state_dict()["state"].items()}
    assert set(steps.values()) == {20.0 - k}  # only the good steps reached the optimizer
    assert all(torch.isfinite(p).all() for p in models["fp16"].parameters())


def test_torch_grad_scaler_drives_our_optimizer_exactly_as_the_loss_scaler():
    """Our optimizer speaks torch's scaling protocol (``_step_supports_amp_scaling``): torch.amp.GradScaler itself
    scales, checks for inf and steps it, and the result is bit-equal to the native loop's scaler (both divide the
    gradients by the same fp32 scale as they up-cast them, then run the same update)."""
    from grass_ft.method.loss_scale import LossScaler

    results = []
    for drive in ("ours", "torch"):
        model = tiny_llama(torch.float16)
        opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.0)
        ours, theirs = LossScaler(), torch.amp.GradScaler("cpu")
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            ids = torch.randint(0, 128, (4, 16), generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            if drive == "ours":
                (loss * ours.scale).backward()
                ours.step(opt, list(model.parameters()), max_norm=0.0)
            else:
                theirs.scale(loss).backward()
                theirs.step(opt)
                theirs.update()
            opt.zero_grad(set_to_none=True)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
        assert (ours.scale if drive == "ours" else theirs.get_scale()) == 2.0 ** 16
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n


def test_loss_scale_travels_in_the_runner_state():
    from grass_ft.config import TrainConfig
    from grass_ft.method.loss_scale import LossScaler
    from grass_ft.method.methods import prepare
    from grass_ft.method.step import StepRunner

    runner = StepRunner(prepare(tiny_llama(torch.float16), TrainConfig(method="fft")), loss_scaler=LossScaler())
    runner.scaler.update(True)
    runner.scaler.overflow_steps = 1
    state = runner.state_dict()["loss_scaler"]
    assert state == {"scale": 2.0 ** 15, "growth_tracker": 0, "overflow_steps": 1}
    fresh = StepRunner(prepare(tiny_llama(torch.float16), TrainConfig(method="fft")), loss_scaler=LossScaler())
    fresh.load_state_dict(runner.state_dict())
    assert fresh.scaler.state_dict() == state


def test_other_dtypes_are_refused_by_the_optimizer():
    with pytest.raises(ValueError, match=r"parameter '0.weight' has dtype torch.float64; allowed: float32"):
        LayerwiseOffloadAdamW(nn.Sequential(nn.Linear(2, 2)).double().named_parameters())


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_bf16_checkpoint_resumes_bit_exactly_with_masters(offload):
    def opt_for(model):
        return LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-4, weight_decay=0.1, offload=offload,
                                     chunk_size=1000)

    ref = tiny_llama(torch.bfloat16)
    ref_opt = opt_for(ref)
    lm_steps({"r": ref}, {"r": ref_opt}, steps=6)
    model = tiny_llama(torch.bfloat16)
    opt = opt_for(model)
    lm_steps({"m": model}, {"m": opt}, steps=3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)

    def resume(drop_masters: bool):
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=True)
        if drop_masters:
            for s in checkpoint["optim"]["state"].values():
                s.pop("master")
        resumed = tiny_llama(torch.bfloat16)
        resumed.load_state_dict(checkpoint["model"])
        resumed_opt = opt_for(resumed)
        resumed_opt.load_state_dict(checkpoint["optim"])
        lm_steps({"x": resumed}, {"x": resumed_opt}, steps=3, skip=3)
        return resumed, resumed_opt

    resumed, resumed_opt = resume(drop_masters=False)
    # the same arithmetic on the same values in the same order: bit-exact
    for (name, p), q in zip(resumed.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    ours, theirs = masters(resumed_opt), masters(ref_opt)
    assert ours.keys() == theirs.keys() == {n for n, _ in ref.named_parameters()}
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    # without the masters the resumed run restarts them from the bf16 weights: the sub-bf16 progress is lost
    _, lossy = resume(drop_masters=True)
    assert not all(torch.equal(masters(lossy)[n], theirs[n]) for n in theirs)


def test_reset_state_keeps_the_master_and_restarts_the_moments():
    layer = nn.Linear(16, 16).to(torch.bfloat16)
    opt = LayerwiseOffloadAdamW(layer.named_parameters(), lr=1e-3, weight_decay=0.0)
    torch.manual_seed(1)
    grads = [torch.randn(6, 16, 16).to(torch.bfloat16), torch.randn(6, 16).to(torch.bfloat16)]
    for t in range(3):
        layer.weight.grad, layer.bias.grad = grads[0][t], grads[1][t]
        opt.step()
    opt.reset_state("weight")
    state = opt.state_dict()["state"]
    assert set(state["weight"]) == {"master"} and "step" in state["bias"]
    # from here on the weight is a fresh fp32 AdamW started at the master
    ref = nn.Parameter(state["weight"]["master"].clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.0)
    for t in range(3, 6):
        layer.weight.grad, layer.bias.grad = grads[0][t], grads[1][t]
        ref.grad = grads[0][t].float()
        opt.step()
        ref_opt.step()
    state = opt.state_dict()["state"]
    assert state["weight"]["step"].item() == 3.0 and state["bias"]["step"].item() == 6.0
    # fresh fp32 AdamW against ours, same given gradients, 3 steps: the bound above (~1e-8 absolute)
    torch.testing.assert_close(state["weight"]["master"], ref.detach())
    assert torch.equal(layer.weight.detach(), ref.detach().to(torch.bfloat16))


class Allocations(TorchDispatchMode):
    """Every new tensor storage an op creates while the mode is on, and the peak of those still alive: an
    allocation count independent of the optimizer's own bookkeeping. (Python-scalar arguments are wrapped below
    the dispatcher, as host scalars even on CUDA, and do not show here.)"""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []
        self.live = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                nbytes = t.untyped_storage().nbytes()
                self.sizes.append(nbytes)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, nbytes)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-masters"])
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_peak_device_bytes_counts_every_buffer_of_the_bounded_step(dtype, offload):
    chunk = 1000  # below every 64x128 / 128x64 matrix (8192 elements): several chunks per parameter
    model = tiny_llama(dtype)
    opt = LayerwiseOffloadAdamW(model.named_parameters(), lr=1e-3, offload=offload, chunk_size=chunk)
    slab = [t.data_ptr() for t in opt._slabs]
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        with Allocations() as seen:
            opt.step()
        report = opt.memory_report()
        # the bound, from the chunk size alone: 3 ring slots of one record [exp_avg | exp_avg_sq (| master)],
        # a chunk-long denominator, and for bf16 a chunk-long up-cast gradient (the master needs no up-cast copy)
        f32, record = 4, (3 if dtype == torch.bfloat16 else 2) * chunk
        buffers = [chunk * f32] + ([chunk * f32] if dtype == torch.bfloat16 else [])
        if offload:
            expected = [3 * record * f32, *buffers]
        else:  # the group stores, made on the first step and kept on the device, plus the same buffers
            stores = [4 * opt._size[k] for k in opt._store]
            expected = ([*stores] if step == 0 else []) + buffers
        assert sorted(seen.sizes) == sorted(expected)  # nothing else is allocated in step(): no host slab either
        assert report["peak_device_state_bytes"] == (sum(expected) if offload else sum(stores) + sum(buffers))
        assert seen.peak == sum(expected)
        assert report["device_state_bytes"] == (0 if offload else sum(stores))
        # the host slab: allocated once, in the constructor, at exactly the records' size
        assert [t.data_ptr() for t in opt._slabs] == slab
        assert report["host_state_bytes"] == (sum(p.numel() * (12 if dtype == torch.bfloat16 else 8)
                                                   for p in model.parameters()) if offload else 0)
