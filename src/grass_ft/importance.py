"""Block importance: per-block gradient RMS, mean-gradient-norm (MGN) windows.

For block l with N_l parameters and gradient g_l at step t, ``r_l(t) = sqrt(||g_l(t)||² / N_l)``; dividing by
N_l makes blocks of different size comparable. The MGN over a window of steps is the mean of r_l(t) over the
steps of the window in which block l had a gradient (GRASS, Sec. "Importance").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn


def grad_rms(sq_norm: float, numel: int) -> float:
    """Gradient RMS of a block from the sum of its squared gradient entries."""
    return math.sqrt(sq_norm / numel)


class MGNWindow:
    """Running sums of r_l(t) and counts of observations per block, for one window of steps."""

    def __init__(self, num_blocks: int):
        self.sum = torch.zeros(num_blocks, dtype=torch.float64)
        self.count = torch.zeros(num_blocks, dtype=torch.long)

    def add(self, rms: dict[int, float]) -> None:
        for b, r in rms.items():
            self.sum[b] += r
            self.count[b] += 1

    def observed(self) -> torch.Tensor:
        """Boolean mask of blocks with at least one observation in this window."""
        return self.count > 0

    def mean(self) -> torch.Tensor:
        """Window MGN per block; 0 where unobserved (use :meth:`observed` to tell them apart)."""
        return torch.where(self.count > 0, self.sum / self.count.clamp(min=1), torch.zeros_like(self.sum))

    def reset(self) -> None:
        self.sum.zero_()
        self.count.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sum.copy_(state["sum"])
        self.count.copy_(state["count"])


def block_rms(block_params: Sequence[Sequence[nn.Parameter]], blocks: Iterable[int],
              numel: Sequence[int]) -> dict[int, float]:
    """r_l for each listed block from the ``.grad`` its parameters hold now (after accumulation/all-reduce).

    A block none of whose parameters has a gradient is left out. One host sync for all blocks.
    """
    ids, sq = [], []
    for b in blocks:
        grads = [p.grad for p in block_params[b] if p.grad is not None]
        if not grads:
            continue
        norms = torch._foreach_norm(grads, 2)
        sq.append(torch.stack([n.float() for n in norms]).pow(2).sum())
        ids.append(b)
    if not ids:
        return {}
    values = torch.stack(sq).tolist()  # the one device->host sync of the bookkeeping
    return {b: grad_rms(v, numel[b]) for b, v in zip(ids, values)}


NORM_CHUNK = 1 << 21  # elements: an 8 MiB fp32 temporary per chunk


def squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """The fp32 sum of squares of ``grad``, up-cast a chunk of :data:`NORM_CHUNK` elements at a time.

    A whole-tensor ``grad.float().pow(2).sum()`` makes two fp32 copies of a bf16 gradient (360 MB for one of
    LLaMA-2-7B's MLP matrices), which lifted the probe's peak above the training step's (docs/gpu_memory.md).
    """
    flat = grad.reshape(-1)
    sq = None
    for start in range(0, flat.numel(), NORM_CHUNK):
        chunk = flat[start:start + NORM_CHUNK].float()
        part = torch.dot(chunk, chunk)
        sq = part if sq is None else sq + part
        del chunk  # before the next chunk's copy exists
    return sq if sq is not None else flat.new_zeros((), dtype=torch.float32)


class ProbeRecorder:
    """Reads each block parameter's squared gradient norm as soon as its gradient is accumulated, then frees it.

    Used during the probe phase, so no full set of gradients ever exists at once and the probe's peak memory
    stays below the training phase's (the "optimizer step in backward" pattern, without the step).
    Call :meth:`flush` after each backward to turn the accumulated squared norms into one observation.
    """

    def __init__(self, block_params: Sequence[Sequence[nn.Parameter]], numel: Sequence[int],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.block_params = block_params
        self.reduce = reduce  # multi-process: average each gradient over ranks before reading its norm
        self.numel = list(numel)
        self._sq: list[torch.Tensor | None] = [None] * len(block_params)
        self._handles: list = []

    def attach(self) -> None:
        if self._handles:
            return
        for b, params in enumerate(self.block_params):
            for p in params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(b)))

    def _hook(self, b: int):
        def hook(p: torch.Tensor) -> None:
            grad = p.grad.detach() if self.reduce is None else self.reduce(p.grad.detach())
            sq = squared_norm(grad)
            self._sq[b] = sq if self._sq[b] is None else self._sq[b] + sq
            p.grad = None  # free at once: the probe updates nothing

        return hook

    def flush(self, scale: float = 1.0) -> dict[int, float]:
        """r_l of the gradients seen since the last flush, the gradient multiplied by ``scale`` first
        (``grad_accum``, so a micro-batch's gradient is measured at the scale of a full step's)."""
        ids = [b for b, s in enumerate(self._sq) if s is not None]
        if not ids:
            return {}
        values = torch.stack([self._sq[b] for b in ids]).tolist()  # one device->host sync per backward
        self._sq = [None] * len(self.block_params)
        return {b: grad_rms(v * scale * scale, self.numel[b]) for b, v in zip(ids, values)}

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._sq = [None] * len(self.block_params)
