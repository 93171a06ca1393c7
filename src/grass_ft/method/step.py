"""The one training step shared by the CLI, the native loop and the Hugging Face callback:
choose blocks -> forward/backward -> record MGN -> optimizer step.

Front ends that run their own forward/backward (``transformers.Trainer``) call the pieces —
:meth:`StepRunner.begin_step`, :meth:`StepRunner.after_backward`, :meth:`StepRunner.finish_step` — and the
native loop calls :meth:`StepRunner.train_step`, which is those pieces around a forward/backward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..base.errors import DivergenceError
from .importance import GradNormRecorder, sharded_block_rms
from ..parallel.distributed import Distributed
from ..parallel.fsdp import grad_norm_value
from .loss import has_supervised_token
from .methods import Prepared


class NonFiniteError(DivergenceError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def lr_factor(update: int, warmup_steps: int, total_updates: int, schedule: str) -> float:
    """Learning-rate multiplier after ``update`` optimizer updates (a pure function of the count)."""
    if warmup_steps > 0 and update < warmup_steps:
        return (update + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (update - warmup_steps) / max(1, total_updates - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"`lr_schedule` must be constant, linear or cosine, got {schedule!r}")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Optimizer-state bytes on the compute device and on the host.

    Our offloading optimizer reports its own; for a plain torch optimizer every state tensor counts where it
    lives (CPU tensors count as device state on a CPU-only run, since that is where compute happens).
    """
    if hasattr(optimizer, "memory_report"):
        r = optimizer.memory_report()
        return {"device": int(r["device_state_bytes"]), "host": int(r["host_state_bytes"]),
                "peak_device": int(r.get("peak_device_state_bytes", r["device_state_bytes"]))}
    total = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return {"device": total, "host": 0, "peak_device": total}


@dataclass
class StepResult:
    step: int
    loss: float  # mean over the step's micro-batches on every rank; NaN when any of them was non-finite
    grad_norm: float | None
    tokens: int  # every rank's
    seconds: float
    probe: bool
    skipped: bool
    active: list[int]
    events: list[dict] = field(default_factory=list)
    bookkeeping_s: float = 0.0
    wall_s: float | None = None  # the host's wall time of the call; None: ``seconds`` (see StepClock)
    overflow: bool = False  # float16: the scaled gradients overflowed, the step was skipped and the scale halved
    loss_scale: float | None = None  # float16: the scale this step's loss was multiplied by

    def __post_init__(self) -> None:
        if self.wall_s is None:
            self.wall_s = self.seconds


class StepClock:
    """Times :meth:`StepRunner.train_step`: on the host clock, and on CUDA on the compute stream's own timeline.

    On a GPU the step returns once its last kernels are queued: the offloaded optimizer step is still running,
    so the host clock would log its launch time (issue 29). A timed step records CUDA events around itself and
    waits for the closing one (one synchronisation, where a figure is recorded); its ``seconds`` is the events'
    span, exact even when the previous step's kernels were still running at its start. An untimed step adds no
    synchronisation and reports the host time. ``wall`` is always the host time, sync included, so that the sum
    over a run's steps is its wall time.
    """

    def __init__(self, device: torch.device | None):
        self.cuda = device is not None and device.type == "cuda"
        self._t0 = 0.0
        self._start = None

    def start(self) -> None:
        self._t0 = time.perf_counter()
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def stop(self, timed: bool) -> tuple[float, float]:
        """``(seconds, wall)`` of the step begun by :meth:`start`."""
        if not (self.cuda and timed):
            wall = time.perf_counter() - self._t0
            return wall, wall
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        # the figure is recorded now: wait for the step's queued kernels (the optimizer's update) so that they count
        end.synchronize()
        return self._start.elapsed_time(end) / 1e3, time.perf_counter() - self._t0


class StepRunner:
    """Applies a :class:`~grass_ft.method.methods.Prepared` method step by step.

    Args:
        prepared: model, optimizer, layout and sampler of the method.
        scheduler: LR scheduler stepped once per real update (``None``: constant LR).
        grad_accum: micro-batches per step (the loss of each is divided by it).
        max_grad_norm: global-norm clipping over the parameters that train this step (0: no clipping,
            the norm is still measured and reported).
        max_bad_steps: consecutive non-finite steps tolerated before :class:`NonFiniteError`.
        dist: the process group of a multi-process run (gradients of the trainable parameters are averaged
            after the last backward, the probe's per parameter; draws are checked equal); ``None``: one process.
        sharded: the model is FSDP2-sharded (``fsdp=true``): FSDP2 reduce-scatters the gradients itself, and the
            per-block norms are summed over the shards (:func:`grass_ft.method.importance.sharded_block_rms`).
        timed: which steps' ``seconds`` must include their device work (on CUDA, one synchronisation each: see
            :class:`StepClock`); ``None``: every step. The native loop times the steps it logs.
        loss_scaler: float16 parameters: the dynamic loss scale (:class:`grass_ft.method.loss_scale.LossScaler`); the
            loss is multiplied by it before backward and the gradients are unscaled into fp32 by the optimizer.
    """

    def __init__(self, prepared: Prepared, scheduler=None, grad_accum: int = 1, max_grad_norm: float = 0.0,
                 max_bad_steps: int = 5, dist: Distributed | None = None, sharded: bool = False,
                 timed: Callable[[int], bool] | None = None, loss_scaler=None):
        self.p = prepared
        self.scaler = loss_scaler
        self._overflow = False
        self.scheduler = scheduler
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        self.max_bad_steps = max_bad_steps
        self.dist = dist if dist is not None else Distributed()
        self.sharded = sharded
        self.params = dict(prepared.model.named_parameters())
        self.timed = timed
        self.clock = StepClock(next((p.device for p in self.params.values() if p.is_cuda), None))
        self.bad_in_a_row = 0
        self.skipped_steps = 0
        self._ever_active: set[int] = set()
        self._recorder: GradNormRecorder | None = None
        self._block_params: list[list[nn.Parameter]] = []
        if prepared.layout is not None and prepared.sampler is not None:
            self._block_params = [[self.params[n] for n in names] for names in prepared.layout.blocks]
            reduce = self.dist.average_ if self.dist.enabled else None
            self._recorder = GradNormRecorder(self._block_params, prepared.layout.numel, reduce=reduce)

    # ------------------------------------------------------------------------------------------ pieces

    @property
    def sampler(self):
        return self.p.sampler

    def is_probe(self, step: int) -> bool:
        return self.sampler is not None and self.sampler.in_probe(step)

    def begin_step(self, step: int) -> list[dict]:
        """Advance the sampler and set ``requires_grad`` for this step; returns the sampler's events."""
        self.dist.begin_step()
        if self.sampler is None:
            return []
        previous = set(self.sampler.active)
        events = self.sampler.begin_step(step)
        if any(e["event"] == "draw" for e in events):
            self.dist.check_same_draw(self.sampler.active, self.sampler.mgn, step)
        probe = self.sampler.in_probe(step)
        if probe:
            trainable = {n for names in self.p.layout.blocks for n in names}
        else:
            trainable = set(self.p.trainable_names())
        for name, param in self.params.items():
            param.requires_grad_(name in trainable)
        if probe and not self.sharded:  # FSDP2 sets .grad after autograd: no hook would fire, the shards are read
            self._recorder.attach("probe")
        else:
            if self._recorder.mode == "probe":
                self._recorder.detach()
            new_blocks = set(self.sampler.active) - previous
            left = previous - set(self.sampler.active)
            if self.p.reset_state_on_switch and left and hasattr(self.p.optimizer, "release"):
                # their moments will restart when they are drawn again: the host-lean layout frees them now
                self.p.optimizer.release([self.p.layout.group_key(self.p.layout.blocks[b][0]) for b in sorted(left)])
            if self.p.reset_state_on_switch and new_blocks & self._ever_active:
                self._reset_state(sorted(new_blocks & self._ever_active))
            self._ever_active |= set(self.sampler.active)
        return events

    def _reset_state(self, blocks: list[int]) -> None:
        names = [n for b in blocks for n in self.p.layout.blocks[b]]
        opt = self.p.optimizer
        if hasattr(opt, "reset_state"):
            opt.reset_state(names)
        else:
            for n in names:
                opt.state.pop(self.params[n], None)

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.params.values() if p.requires_grad]

    def after_micro_backward(self, step: int) -> None:
        """During the probe, turn the squared norms read in the hooks into one observation per micro-batch."""
        if self.is_probe(step) and self.sharded:
            rms, nbytes = sharded_block_rms(self._block_params, range(len(self._block_params)), self.p.layout.numel,
                                            scale=float(self.grad_accum))
            self.dist.allreduce_bytes += nbytes
            self.sampler.observe(self._recorder.accept(rms))  # the recorder's one non-finite policy
            self.p.optimizer.zero_grad(set_to_none=True)  # the probe updates nothing; the next micro-batch starts anew
        elif self.is_probe(step):
            self.sampler.observe(self._recorder.flush(scale=float(self.grad_accum) / self._loss_scale()))

    def _loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def after_backward(self, step: int) -> float:
        """After the last backward of a step: all-reduce, then record the active blocks' gradient RMS.

        Returns the seconds spent on MGN bookkeeping.
        """
        if self.dist.enabled and not self.is_probe(step) and not self.sharded:  # FSDP2 has reduce-scattered them
            self.dist.all_reduce_grads(self.trainable_params())
        if self.sampler is None or self.is_probe(step) or not self.sampler.records(step):
            return 0.0
        t0 = time.perf_counter()
        if self.sharded:
            rms, nbytes = sharded_block_rms(self._block_params, self.sampler.active, self.p.layout.numel)
            self.dist.allreduce_bytes += nbytes
            self.sampler.observe(self._recorder.accept(rms))  # the recorder's one non-finite policy
        else:
            self.sampler.observe(self._recorder.read(self.sampler.active, scale=1.0 / self._loss_scale()))
        return time.perf_counter() - t0

    def finish_step(self, step: int, loss_finite: bool = True) -> tuple[float | None, bool]:
        """Clip, check finiteness and update (nothing is updated during the probe); zero the grads.

        Returns ``(grad_norm, skipped)``.
        """
        grad_norm = None
        skipped = False
        self._overflow = False
        if not self.is_probe(step) and self.scaler is not None and loss_finite:
            # float16: the scaler unscales (and clips) inside the optimizer's fp32 up-cast, or skips an overflow
            params = [p for p in self.trainable_params() if p.grad is not None]
            scale = self.scaler.scale
            grad_norm = self.scaler.step(self.p.optimizer, params, self.max_grad_norm) if params else None
            if grad_norm is not None and not math.isfinite(grad_norm):
                skipped, self._overflow = True, True
                self.skipped_steps += 1
                # an overflow is routine while the scale settles; one that no scale below 1 cures is a bad step
                self.bad_in_a_row = self.bad_in_a_row + 1 if scale < 1 else 0
                grad_norm = None
            else:
                if self.scheduler is not None:
                    self.scheduler.step()
                self.bad_in_a_row = 0
        elif not self.is_probe(step):
            params = [p for p in self.trainable_params() if p.grad is not None]
            if params:
                max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
                grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
            finite = loss_finite and (grad_norm is None or math.isfinite(grad_norm))
            if finite:
                self.p.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.bad_in_a_row = 0
            else:
                skipped = True
                self.skipped_steps += 1
                self.bad_in_a_row += 1
                if self.scaler is not None:
                    self.scaler.update(True)  # as GradScaler, which finds the inf in the gradients it leaves
        self.p.optimizer.zero_grad(set_to_none=True)
        if self.bad_in_a_row >= self.max_bad_steps:
            raise NonFiniteError(f"{self.bad_in_a_row} consecutive steps had a non-finite loss or gradient norm "
                                 f"(last at step {step}); lower `lr`, keep `max_grad_norm` > 0, or check the data "
                                 f"for empty targets")
        return grad_norm, skipped

    # ------------------------------------------------------------------------------------- whole step

    def train_step(self, step: int, micro_batches: Sequence[dict[str, torch.Tensor]],
                   forward: Callable[[nn.Module, dict], torch.Tensor] | None = None) -> StepResult:
        """One optimizer step over ``micro_batches`` (``grad_accum`` of them).

        ``forward(model, micro_batch) -> loss`` defaults to ``model(**micro_batch).loss``; the native loop passes
        :func:`grass_ft.method.loss.loss_forward` (supervised positions only, unless ``supervised_only_loss=false``).
        A step none of whose micro-batches has a supervised token is skipped like a non-finite one (no update).
        """
        self.clock.start()
        events = self.begin_step(step)
        model = self.p.model
        model.train()
        loss_sum, n_finite, n_bad, n_supervised, tokens = 0.0, 0, 0, 0, 0
        factor = self._loss_scale() / self.grad_accum  # float16: the loss scale; always 1/grad_accum
        for mb in micro_batches:
            n_tokens = mb.get("num_tokens")  # packed rows: the real tokens (padding and row ends left out)
            mb = {k: v for k, v in mb.items() if k != "num_tokens"}
            n_supervised += has_supervised_token(mb)
            loss = forward(model, mb) if forward is not None else model(**mb).loss
            finite = bool(torch.isfinite(loss))
            # A non-finite loss is back-propagated too: under several processes every rank must join the same
            # collectives (FSDP2's reduce-scatters, the gradient all-reduce), or the others wait forever. The
            # non-finite gradients it leaves are never applied: the step is skipped below, on every rank.
            if loss.requires_grad:
                (loss * factor).backward()
            if finite:
                loss_sum, n_finite = loss_sum + float(loss.detach()), n_finite + 1
            else:
                n_bad += 1
            if n_tokens is not None:
                tokens += int(n_tokens)
            else:
                tokens += int(mb["attention_mask"].sum()) if "attention_mask" in mb else mb["input_ids"].numel()
            self.after_micro_backward(step)
        scale_used = self._loss_scale()  # before finish_step updates it
        bookkeeping = self.after_backward(step)
        # One decision for all ranks (a rank-local one would let the ranks' weights part): the step is skipped
        # when any rank's loss was non-finite, or when no rank had a supervised token (every label -100: the full
        # forward's loss is NaN (0/0), the supervised-only one 0 with zero gradients; either way nothing is to be
        # learnt, and an AdamW step on zero gradients would still move the weights). Loss and tokens are the
        # whole step's, over all ranks.
        loss_sum, n_finite, n_bad, n_supervised, tokens = self.dist.sum_floats(
            [loss_sum, n_finite, n_bad, n_supervised, tokens])
        grad_norm, skipped = self.finish_step(step, n_bad == 0 and n_supervised > 0)
        active = [] if self.sampler is None else list(self.sampler.active)
        loss = loss_sum / n_finite if n_bad == 0 and n_finite else float("nan")
        seconds, wall = self.clock.stop(self.timed is None or self.timed(step))
        return StepResult(step=step, loss=loss, grad_norm=grad_norm, tokens=int(tokens),
                          seconds=seconds, probe=self.is_probe(step), skipped=skipped,
                          active=active, events=events, bookkeeping_s=bookkeeping, wall_s=wall,
                          overflow=self._overflow, loss_scale=None if self.scaler is None else scale_used)

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict() if self.sampler is not None else None,
                "ever_active": sorted(self._ever_active), "skipped_steps": self.skipped_steps,
                "bad_in_a_row": self.bad_in_a_row,
                **({"loss_scaler": self.scaler.state_dict()} if self.scaler is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        self._ever_active = set(state.get("ever_active", []))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
