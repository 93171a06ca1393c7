"""Block importance: per-block gradient RMS, mean-gradient-norm (MGN) windows.

For block l with N_l parameters and gradient g_l at step t, ``r_l(t) = sqrt(||g_l(t)||² / N_l)``; dividing by
N_l makes blocks of different size comparable. The MGN over a window of steps is the mean of r_l(t) over the
steps of the window in which block l had a gradient (GRASS, Sec. "Importance").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.fsdp import local


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


def finite_observation(rms: dict[int, float]) -> dict[int, float]:
    """The one importance policy for a non-finite gradient: an observation (one step's or one micro-batch's
    r_l of every block that had a gradient) with any non-finite value is dropped whole.

    Why whole: a non-finite gradient says nothing about any block's importance (the step is skipped, or under
    ``transformers.Trainer`` the model is already ruined), and a single inf/NaN kept in the MGN window would turn
    ``normalize_mgn`` (a division by the mean) into NaN probabilities that the EMA keeps for good.
    """
    return rms if all(math.isfinite(r) for r in rms.values()) else {}


def _rms_of(ids: Sequence[int], squares: Sequence[torch.Tensor], numel: Sequence[int],
            scale: float = 1.0) -> dict[int, float]:
    if not ids:
        return {}
    values = torch.stack(list(squares)).tolist()  # the one device->host sync of the bookkeeping
    return {b: grad_rms(v * scale * scale, numel[b]) for b, v in zip(ids, values)}


def block_rms(block_params: Sequence[Sequence[nn.Parameter]], blocks: Iterable[int],
              numel: Sequence[int], scale: float = 1.0) -> dict[int, float]:
    """r_l for each listed block from the ``.grad`` its parameters hold now (after accumulation/all-reduce).

    A block none of whose parameters has a gradient is left out. One host sync for all blocks. Raw values:
    :class:`GradNormRecorder` applies :func:`finite_observation`.
    """
    ids, sq = [], []
    for b in blocks:
        grads = [p.grad for p in block_params[b] if p.grad is not None]
        if not grads:
            continue
        if any(g.dtype == torch.float16 for g in grads):  # loss-scaled fp16: its own norm may pass 65504
            sq.append(torch.stack([squared_norm(g) for g in grads]).sum())
        else:
            norms = torch._foreach_norm(grads, 2)
            sq.append(torch.stack([n.float() for n in norms]).pow(2).sum())
        ids.append(b)
    return _rms_of(ids, sq, numel, scale)


NORM_CHUNK = 1 << 21  # elements: an 8 MiB fp32 temporary per chunk


def sharded_block_rms(block_params: Sequence[Sequence[nn.Parameter]], blocks: Iterable[int],
                      numel: Sequence[int], scale: float = 1.0) -> tuple[dict[int, float], int]:
    """r_l of each listed block from the sharded (reduce-scattered, rank-averaged) gradients.

    Each rank sums the squares of its own rows; one ``all_reduce`` (sum) of the per-block sums gives the full
    gradient's squared norm on every rank, bit-identical everywhere (the same reduction), so the draws that
    follow agree. A block whose parameters do not require grad is left out (the same set on every rank).
    ``scale`` multiplies the gradient first (``grad_accum`` during the probe). Returns the RMS per block and the
    bytes all-reduced.
    """
    ids = [b for b in blocks if any(p.requires_grad for p in block_params[b])]
    if not ids:
        return {}, 0
    sq = []
    for b in ids:
        grads = [local(p.grad) for p in block_params[b] if p.grad is not None]
        grads = [g for g in grads if g.numel() > 0]  # an uneven split can leave a rank no rows of a parameter
        if grads:
            sq.append(torch.stack([n.float() for n in torch._foreach_norm(grads, 2)]).pow(2).sum())
        else:
            sq.append(torch.zeros((), dtype=torch.float32, device=block_params[b][0].device))
    vec = torch.stack(sq).double()
    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    values = vec.tolist()  # the one device->host sync of the bookkeeping
    return ({b: grad_rms(v * scale * scale, numel[b]) for b, v in zip(ids, values)},
            vec.numel() * vec.element_size())


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


class GradNormRecorder:
    """The one recorder of block gradient RMS, for the native loop (:mod:`grass_ft.method.step`) and the
    ``transformers.Trainer`` callback (:mod:`grass_ft.frontends.hf`); every observation it returns has passed
    :func:`finite_observation`.

    Three ways to read, one policy:

    - ``attach("probe")``: hooks read each block parameter's squared gradient norm as soon as it is accumulated,
      then free the gradient, so no full set of gradients ever exists at once and the probe's peak memory stays
      below the training phase's (the "optimizer step in backward" pattern, without the step). :meth:`flush`
      after each backward turns the squared norms into one observation.
    - ``attach("last")``: hooks keep, per parameter, the squared norm of its gradient as last accumulated (the
      step's accumulated gradient after the last backward) and leave the gradient alone. The Trainer needs this:
      it clips between the last backward and the first event after it, and post-clip RMS of blocks seen at
      different steps would not be comparable. :meth:`flush` after the step's last backward.
    - :meth:`read`: the native loop reads ``.grad`` after its all-reduce and before it clips.
    """

    MODES = ("probe", "last")

    def __init__(self, block_params: Sequence[Sequence[nn.Parameter]], numel: Sequence[int],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.block_params = block_params
        self.reduce = reduce  # multi-process probe: average each gradient over ranks before reading its norm
        self.numel = list(numel)
        self.mode: str | None = None
        self._probe_sq: list[torch.Tensor | None] = [None] * len(block_params)
        self._last_sq: dict[int, tuple[int, torch.Tensor]] = {}
        self._handles: list = []
        self._hooked: set[int] = set()
        self.dropped = 0  # observations left out by the non-finite policy

    def attach(self, mode: str = "probe") -> None:
        if mode not in self.MODES:
            raise ValueError(f"recorder mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if self.mode != mode:
            self._clear()
        self.mode = mode
        for b, params in enumerate(self.block_params):
            for p in params:
                # torch refuses a hook on a frozen tensor: hook what trains now, the rest when it first trains
                if p.requires_grad and id(p) not in self._hooked:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook(b)))
                    self._hooked.add(id(p))

    def _hook(self, b: int):
        def hook(p: torch.Tensor) -> None:
            if self.mode == "probe":
                grad = p.grad.detach() if self.reduce is None else self.reduce(p.grad.detach())
                sq = squared_norm(grad)
                self._probe_sq[b] = sq if self._probe_sq[b] is None else self._probe_sq[b] + sq
                p.grad = None  # free at once: the probe updates nothing
            elif self.mode == "last":
                # .grad holds the sum so far; each micro-batch overwrites, so the last one is the step's
                self._last_sq[id(p)] = (b, squared_norm(p.grad.detach()))

        return hook

    def flush(self, scale: float = 1.0) -> dict[int, float]:
        """r_l of the gradients seen by the hooks since the last flush, the gradient multiplied by ``scale``
        first (probe: ``grad_accum``, so a micro-batch's gradient is measured at the scale of a full step's)."""
        if self.mode == "last":
            per_block: dict[int, torch.Tensor] = {}
            for b, sq in self._last_sq.values():
                per_block[b] = sq if b not in per_block else per_block[b] + sq
            ids = sorted(per_block)
            squares = [per_block[b] for b in ids]
        else:
            ids = [b for b, s in enumerate(self._probe_sq) if s is not None]
            squares = [self._probe_sq[b] for b in ids]
        self._clear()
        return self.accept(_rms_of(ids, squares, self.numel, scale))

    def read(self, blocks: Iterable[int], scale: float = 1.0) -> dict[int, float]:
        """r_l of ``blocks`` from the ``.grad`` they hold now (see :func:`block_rms`), multiplied by ``scale``
        (1 / the loss scale of a float16 run)."""
        return self.accept(block_rms(self.block_params, blocks, self.numel, scale))

    def accept(self, rms: dict[int, float]) -> dict[int, float]:
        """``rms`` after the one non-finite policy (:func:`finite_observation`), counting what it drops; for
        readings made elsewhere (FSDP2's sharded norms)."""
        kept = finite_observation(rms)
        self.dropped += bool(rms) and not kept
        return kept

    def _clear(self) -> None:
        self._probe_sq = [None] * len(self.block_params)
        self._last_sq = {}

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._hooked = set()
        self.mode = None
        self._clear()
