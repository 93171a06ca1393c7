"""Running grass-ft's real training step on fake tensors: what the FakeTensor estimator
(benchmarks/memory_estimate.py) and ``grass-ft plan exact=true`` share.

Under ``torch._subclasses.fake_tensor.FakeTensorMode`` tensors carry shapes, dtypes and storage sizes but no memory
and no values. The step still reads scalars (the loss, the gradient norm, the blocks' gradient RMS) and draws blocks
from real random numbers, and the CPU build of torch picks CPU kernels; the helpers below make the step run as it
would on a GPU, with placeholders where a value is needed.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def placeholder_scalars():
    """Scalar reads of fake tensors (``float(loss)``, ``.tolist()``, ``bool(isfinite(x))``) return 1 / True.

    A fake tensor has no value, so the step's bookkeeping (loss logging, the gradient-norm check, GRASS's
    gradient RMS) could not run otherwise. Only FakeTensor is patched, and only inside this context.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    import torch

    def one(self):
        if self.dtype == torch.bool:
            return True
        return 1.0 if self.is_floating_point() else 1

    def tolist(self):
        def build(shape):
            return one(self) if not shape else [build(shape[1:]) for _ in range(shape[0])]
        return build(list(self.shape))

    patch = {"item": one, "tolist": tolist, "__float__": lambda s: float(one(s)),
             "__int__": lambda s: int(one(s)), "__bool__": lambda s: bool(one(s)), "__index__": lambda s: int(one(s))}
    saved = {k: FakeTensor.__dict__.get(k) for k in patch}
    for k, v in patch.items():
        setattr(FakeTensor, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                delattr(FakeTensor, k)
            else:
                setattr(FakeTensor, k, v)


class _RealSampler:
    """Wraps a :class:`~grass_ft.method.sampler.LayerSampler` built from real tensors; its methods run with the fake
    mode suspended, so draws and MGN bookkeeping are real computations on real (tiny) tensors."""

    def __init__(self, sampler, forced: list[list[int]] | None = None):
        object.__setattr__(self, "_s", sampler)
        object.__setattr__(self, "_forced", list(forced or []))

    def begin_step(self, step: int) -> list[dict]:
        """The sampler's own step; a draw is then replaced by the next forced one, if any (see
        :func:`worst_case_draws`)."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            events = self._s.begin_step(step)
        if self._forced and any(e["event"] == "draw" for e in events):
            self._s.active = self._forced.pop(0)
            for e in events:
                if e["event"] == "draw" and "active" in e:
                    e["active"] = list(self._s.active)
        return events

    def __getattr__(self, name):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        attr = getattr(self._s, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with unset_fake_temporarily():
                return attr(*args, **kwargs)

        return call

    def __setattr__(self, name, value):
        setattr(self._s, name, value)


@contextlib.contextmanager
def cuda_kernel_choices():
    """Functional AdamW calls that leave foreach/fused to torch get CUDA's default (foreach: the update of a whole
    tensor list at once, with list-sized temporaries), not the per-tensor loop torch picks for CPU tensors."""
    import torch.optim.adam as adam_mod

    saved = adam_mod._default_to_fused_or_foreach

    def cuda_default(params, differentiable, use_fused=False):
        return False, not differentiable

    adam_mod._default_to_fused_or_foreach = cuda_default
    try:
        yield
    finally:
        adam_mod._default_to_fused_or_foreach = saved


@contextlib.contextmanager
def noop_module_to():
    """``nn.Module.to`` that would change nothing returns the module untouched. Under FakeTensorMode it otherwise
    swaps every tensor for itself and fails ("Couldn't swap"); peft calls it on each new adapter layer."""
    import torch
    from torch import nn

    saved = nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = list(self.parameters()) + list(self.buffers())
        same = all((device is None or t.device == device or (device.index is None and t.device.type == device.type))
                   and (dtype is None or not (t.is_floating_point() or t.is_complex()) or t.dtype == dtype)
                   for t in tensors)
        return self if same else saved(self, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = saved


def worst_case_draws(num_blocks: int, gamma: int, n_draws: int) -> list[list[int]]:
    """Draws that make a short run show the peak a long one meets: distinct blocks at every draw (LISA's state
    grows the most) and block 0 in the last (backward runs all the way down: every block's checkpointed input is
    kept, as in the probe). The k-th of n draws takes blocks ``(n-1-k)*gamma ...`` (modulo the block count)."""
    return [sorted({((n_draws - 1 - k) * gamma + j) % num_blocks for j in range(gamma)}) for k in range(n_draws)]


@contextlib.contextmanager
def real_samplers(forced: list[list[int]] | None = None):
    """``methods.prepare`` builds its sampler from real tensors (see :class:`_RealSampler`), its draws replaced by
    ``forced`` ones in order."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from ..method import methods as methods_mod

    saved = methods_mod.LayerSampler

    def factory(*args, **kwargs):
        with unset_fake_temporarily():
            return _RealSampler(saved(*args, **kwargs), forced)

    methods_mod.LayerSampler = factory
    try:
        yield
    finally:
        methods_mod.LayerSampler = saved


def fused_adamw(prepared) -> bool:
    """Replaces a plain ``torch.optim.AdamW`` (before its first step) with ``fused=True`` over the same parameters
    and hyperparameters — transformers' default optimizer on CUDA; returns whether the optimizer is now fused. On
    CUDA ``methods.make_adamw`` already made it fused (kept as is); fake CPU tensors need the swap."""
    import torch

    opt = prepared.optimizer
    if type(opt) is not torch.optim.AdamW or opt.state:
        return False
    if opt.defaults.get("fused"):
        return True
    g = opt.param_groups[0]
    prepared.optimizer = torch.optim.AdamW([p for group in opt.param_groups for p in group["params"]], lr=g["lr"],
                                           betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"],
                                           fused=True)
    return True
