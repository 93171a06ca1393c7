"""Dynamic loss scaling for float16 parameters trained against fp32 masters (``dtype=float16``).

fp16 keeps 5 exponent bits: a gradient below 2^-24 is zero and one above 65504 is inf. The loss is multiplied by
a scale before backward so that small gradients survive; the scaled fp16 gradients are divided by it again when
:class:`~grass_ft.method.offload.LayerwiseOffloadAdamW` up-casts them into fp32, chunk by chunk, so no fp16 gradient is
ever unscaled in place (which is why ``torch.amp.GradScaler.unscale_`` refuses fp16 gradients). A step whose
gradients overflowed is skipped and counted; the scale then halves. After ``growth_interval`` good steps in a row
it doubles. Those are ``torch.amp.GradScaler``'s semantics and defaults (init 2^16, growth 2, backoff 0.5, interval
2000), and the update is its own kernel, ``torch._amp_update_scale_``.

The optimizer side is torch's own protocol for optimizers that handle scaling (``_step_supports_amp_scaling``):
``optimizer.grad_scale`` is what the gradients are divided by and ``optimizer.found_inf`` skips the step; so
``torch.amp.GradScaler`` itself can drive :class:`~grass_ft.method.offload.LayerwiseOffloadAdamW` too (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def fp32_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of ``grads`` accumulated in fp32 (a scaled fp16 gradient's own norm may exceed 65504)."""
    from .importance import squared_norm

    squares = [squared_norm(g.detach()) for g in grads]
    if not squares:
        return torch.zeros(())
    return torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()


class LossScaler:
    """GradScaler's dynamic scale for the native loop (see the module docstring).

    Args:
        init_scale: the first scale (GradScaler's default 2^16).
        growth_factor: multiplies the scale after ``growth_interval`` steps without overflow.
        backoff_factor: multiplies the scale after an overflow.
        growth_interval: good steps in a row before the scale grows.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self._scale = torch.full((), float(init_scale), dtype=torch.float32)
        self._growth_tracker = torch.zeros((), dtype=torch.int32)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.overflow_steps = 0

    @property
    def scale(self) -> float:
        return float(self._scale)

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Unscale, clip and update after the step's backward (gradients scaled by :attr:`scale`).

        Returns the unscaled gradient norm; when it is not finite the gradients overflowed: nothing is updated,
        :attr:`overflow_steps` counts it and the scale backs off. Every rank of a data-parallel run holds the same
        all-reduced gradients, so every rank makes the same decision.
        """
        norm = float(fp32_norm([p.grad for p in params])) / self.scale
        found_inf = not math.isfinite(norm)
        if found_inf:
            self.overflow_steps += 1
        else:
            clip = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0  # clip_grad_norm_'s coefficient
            divide_by = self.scale / clip
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                # the optimizer divides each gradient by this as it up-casts it into fp32 (torch's protocol)
                optimizer.grad_scale = torch.full((), divide_by, dtype=torch.float32)
                optimizer.found_inf = torch.zeros((), dtype=torch.float32)
                try:
                    optimizer.step()
                finally:
                    del optimizer.grad_scale, optimizer.found_inf
            else:  # a torch optimizer over fp32 parameters (LoRA adapters): unscale in place, as GradScaler does
                if any(p.grad.dtype != torch.float32 for p in params):
                    raise TypeError("loss scaling of fp16 gradients needs LayerwiseOffloadAdamW (master_weights=true)")
                for p in params:
                    p.grad.div_(divide_by)
                optimizer.step()
        self.update(found_inf)
        return norm

    def update(self, found_inf: bool) -> None:
        """GradScaler.update's arithmetic, through the same kernel."""
        torch._amp_update_scale_(self._scale, self._growth_tracker, torch.full((), float(found_inf)),
                                 self.growth_factor, self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "growth_tracker": int(self._growth_tracker), "overflow_steps": self.overflow_steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self._scale.fill_(float(state["scale"]))
        self._growth_tracker.fill_(int(state["growth_tracker"]))
        self.overflow_steps = int(state.get("overflow_steps", 0))
