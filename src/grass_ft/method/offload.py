"""AdamW whose state lives in host memory, one bounded chunk at a time on the device (GRASS, "Layer-wise
optimizer-state offloading"), with fp32 master weights for bf16/fp16 parameters.

Every parameter is cut into chunks of at most ``chunk_size`` elements. A chunk's state is one contiguous fp32
record ``[exp_avg | exp_avg_sq | master]`` (``master`` only for a low-precision parameter); the records of all
parameters live in one host slab, allocated (and pinned, with CUDA) once, in the constructor. At ``step()`` the
chunks that have a gradient stream through a ring of three device slots: chunk i+1's record is copied in on a
side stream while chunk i updates on the compute stream and chunk i-1 is copied back on another side stream.
Nothing waits on the host: the next step's (or ``state_dict``'s) read of the slab waits on the write-backs'
events. Between steps no optimizer state is on the device. Everything is keyed by parameter name (ANCHORS.md).

The update is torch.optim.AdamW's single-tensor arithmetic, op for op, on one chunk; a low-precision parameter
updates its fp32 master and receives the master rounded once to its dtype (mixed-precision training as in
apex/DeepSpeed; BAdam keeps fp32 masters of the active block only). See docs/OFFLOAD.md.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5: no public DTensor, hence no FSDP2 parameters (isinstance(x, ()) is False)
    DTensor = ()

_BLOCK_INDEX = re.compile(r"^\d+$")
LOW_PRECISION = (torch.bfloat16, torch.float16)
DEFAULT_CHUNK_SIZE = 1 << 22  # elements: 16 MiB per fp32 buffer, 48 MiB per record with a master
RING_SLOTS = 3  # chunk i-1 going back, chunk i updating, chunk i+1 arriving


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor parameter or gradient (FSDP2; a view, so updating it updates the
    parameter), else the tensor itself: the optimizer keeps and offloads state for the local shard only."""
    return t.to_local() if isinstance(t, DTensor) else t


def block_key(name: str) -> str:
    """The default group key: the name up to its first integer component, else the name itself.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``model.layers.3``; ``model.norm.weight`` -> itself.
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if _BLOCK_INDEX.match(part):
            return ".".join(parts[: i + 1])
    return name


def adamw_chunk(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, denom: Tensor, *, step: int,
                lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update of fp32 tensors in place: ``torch.optim.AdamW``'s single-tensor path, op for op.

    ``denom`` is a caller-owned buffer of the same size, so the update allocates nothing (torch's own
    ``exp_avg_sq.sqrt() / c`` makes two temporaries); the ops, their order and their scalars are torch's, so on
    the same device the result equals ``torch.optim.AdamW``'s up to the vectorisation of each elementwise kernel.
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    torch.sqrt(exp_avg_sq, out=denom)
    denom.div_(bias_correction2 ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


@dataclass(frozen=True)
class _Chunk:
    """Elements ``[start, start + length)`` of a flattened parameter; its record sits at ``offset`` in the group
    store: ``[exp_avg | exp_avg_sq | master]``, ``width`` = 2 or 3 times ``length``."""

    name: str
    start: int
    length: int
    offset: int
    master: bool

    @property
    def width(self) -> int:
        return (3 if self.master else 2) * self.length


@dataclass
class _Work:
    chunk: _Chunk
    param: Tensor
    group: dict[str, Any]
    step: int
    fresh: bool  # first step (or first after reset_state): the moments start at zero
    init_master: bool  # the master takes the parameter's value before its first update


def _register_pinned(t: Tensor) -> bool:
    """Page-locks ``t``'s memory in place (cudaHostRegister), as torch.distributed.checkpoint's stager does.

    ``torch.empty(..., pin_memory=True)`` goes through the caching host allocator, which rounds every request
    up to a power of two (80 GB of LLaMA-2-7B state would pin 128 GiB); registering an exact-size allocation
    does not. Returns False (and the caller falls back) where registration fails.
    """
    ptr = t.untyped_storage().data_ptr()
    if int(torch.cuda.cudart().cudaHostRegister(ptr, t.untyped_storage().nbytes(), 0)) != 0:
        _clear_last_cuda_error()
        return False

    def unregister(ptr: int = ptr) -> None:
        # a D2H copy may still be writing into the slab when the optimizer is dropped
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaHostUnregister(ptr)

    # unpin when the slab is freed (the optimizer holds it for its lifetime), never after the CUDA context is gone
    # (as torch's stager does); a tensor's Python object lives as long as its TensorImpl
    weakref.finalize(t, unregister).atexit = False
    return True


def _clear_last_cuda_error() -> None:
    """Resets this thread's CUDA "last error" after a runtime call that failed and was handled.

    A failed ``cudaHostRegister`` leaves its error there, and torch's check after the next kernel launch
    (``cudaGetLastError``) would report it as that kernel's, far from its cause (issue 29). torch binds no
    ``cudaGetLastError``; a one-element launch runs that check, which reads and resets the error and raises it.
    """
    try:
        torch.empty(1, device=torch.device("cuda", torch.cuda.current_device())).fill_(1.0)
    except RuntimeError:  # the stale error, read (and so reset) by the launch check
        pass


_fallback_warned = False  # the pinned-memory fallback is said once per process, not once per slab


def _pinned_empty(numel: int) -> Tensor:
    """fp32 host memory from torch's caching pinned allocator (rounded up to a power of two)."""
    return torch.empty(numel, dtype=torch.float32, pin_memory=True)


def _pin(slab: Tensor) -> Tensor:
    """``slab`` page-locked in place; where registration fails, a fresh slab of torch's pinned allocator."""
    global _fallback_warned
    if _register_pinned(slab):
        return slab
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn("cudaHostRegister failed; the optimizer's host slab is pinned through torch's caching host "
                      "allocator instead (rounded up to a power of two)", stacklevel=4)
    return _pinned_empty(slab.numel())


def _check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                           chunk_size: int) -> None:
    """Every bad hyperparameter at once, as torch.optim.AdamW checks them (and ``chunk_size``)."""
    errors = []
    if not 0.0 <= lr:
        errors.append(f"`lr` must be >= 0, got {lr}")
    if not 0.0 <= eps:
        errors.append(f"`eps` must be >= 0, got {eps}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            errors.append(f"`betas[{i}]` must be in [0, 1), got {beta}")
    if not 0.0 <= weight_decay:
        errors.append(f"`weight_decay` must be >= 0, got {weight_decay}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        errors.append(f"`chunk_size` must be an int >= 1, got {chunk_size!r}")
    if errors:
        raise ValueError("; ".join(errors))


def _groups(named_parameters: Iterable[tuple[str, Tensor]], group_fn: Callable[[str], str]) -> dict[str, dict]:
    """The parameter groups, one per key of ``group_fn`` (a decoder block, the embeddings, ...), in order."""
    groups: dict[str, dict[str, Any]] = {}
    seen: dict[int, str] = {}
    for item in named_parameters:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], Tensor)):
            raise TypeError(f"`named_parameters` must yield (str, Tensor) pairs, got {type(item).__name__}")
        name, p = item
        if id(p) in seen:  # tied weights: the same tensor is optimised once, under its first name
            continue
        seen[id(p)] = name
        key = group_fn(name)
        if not isinstance(key, str):
            raise TypeError(f"`group_fn` must return a str, got {type(key).__name__} for {name!r}")
        group = groups.setdefault(key, {"params": [], "param_names": [], "name": key})
        group["params"].append(p)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("`named_parameters` is empty: the optimizer needs at least one parameter")
    return groups


class LayerwiseOffloadAdamW(torch.optim.Optimizer):
    """AdamW (same numerics as ``torch.optim.AdamW``) with state offloaded to host memory, updated in chunks.

    There is one param group per block group, carrying ``"name"`` (the key) and ``"param_names"``, so LR
    schedulers work as usual. ``self.state`` stays empty: state is held by name in a host store.

    Args:
        named_parameters: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``; give every candidate
            parameter, frozen or not. A tensor listed under two names (tied weights) is kept once, first name.
            Parameters must be contiguous float32, bfloat16 or float16 tensors.
        lr: Learning rate.
        betas: Coefficients of the running averages of the gradient and its square.
        eps: Term added to the denominator for numerical stability.
        weight_decay: Decoupled weight decay coefficient.
        group_fn: Maps a parameter name to its group key; defaults to :func:`block_key`.
        offload: If False, state (and masters) stay on the parameters' device, created per group on its first
            step; the update is the same, in place, without copies; the API is unchanged.
        master_weights: Keep an fp32 master copy of every bfloat16/float16 parameter next to its moments and
            update that (the parameter receives it rounded). False reproduces pure low-precision AdamW, which
            loses every update smaller than half a unit in the last place of the weight.
        chunk_size: Most elements of one parameter updated at once; bounds the step's device memory.
        host_lean: With ``offload``, a group's host records exist only while the group trains: allocated at its
            first step, and at :meth:`release` its moments are dropped and only its fp32 masters kept (4 bytes a
            parameter instead of 12; nothing with ``master_weights=False``). For layer-wise training that restarts
            the moments of a re-drawn block anyway (``reset_state_on_switch``, BAdam's practice), so nothing the
            update reads is lost.
    """

    # torch's protocol for optimizers that unscale themselves (torch.amp.GradScaler.step sets ``grad_scale``, what
    # every gradient is divided by, and ``found_inf``, which skips the step): fp16 gradients are unscaled as they are
    # up-cast into fp32, a chunk at a time, never in place (grass_ft.method.loss_scale)
    _step_supports_amp_scaling = True

    def __init__(self, named_parameters: Iterable[tuple[str, Tensor]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 group_fn: Callable[[str], str] | None = None, offload: bool = True, master_weights: bool = True,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, host_lean: bool = False):
        _check_hyperparameters(lr, betas, eps, weight_decay, chunk_size)
        groups = _groups(named_parameters, group_fn or block_key)
        self._offload = offload
        self._master_weights = master_weights
        self._chunk_size = chunk_size
        # pinned host memory makes the copies truly async; only for parameters on a GPU: a CPU model on a machine
        # with one must not page-lock its whole state nor create a CUDA context (issue 29)
        self._pin = offload and any(_local(p).is_cuda for g in groups.values() for p in g["params"])
        self._pinned = False
        self._size: dict[str, int] = {}  # group key -> elements of its store (all its chunks' records)
        self._chunks: dict[str, list[_Chunk]] = {}  # param name -> its chunks
        self._group_of: dict[str, str] = {}  # param name -> group key
        self._by_name: dict[str, Tensor] = {}
        self._store: dict[str, Tensor] = {}  # group key -> its records: a view of a host slab, or a device tensor
        self._slabs: list[Tensor] = []  # host memory, allocated outside step(): once here, once per later group
        self._lean = host_lean and offload
        self._parked: dict[str, Tensor] = {}  # host_lean: group key -> the fp32 masters of a released group
        self._steps: dict[str, int] = {}  # param name -> AdamW step count (a Python int: no tensor, no sync)
        self._master_set: set[str] = set()  # names whose master holds the weights (set at the first update)
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self._last_h2d: dict[torch.device, torch.cuda.Event] = {}  # last copy out of the host store, per device
        self._last_d2h: dict[torch.device, torch.cuda.Event] = {}  # last copy into the host store, per device
        self._peak_bytes = 0
        self._inv_scale: float | None = None  # 1 / grad_scale during a step driven by a loss scaler
        self._deferred: list[str] | None = []  # group keys waiting for the constructor's single slab
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(list(groups.values()), defaults)
        deferred, self._deferred = self._deferred, None
        self._allocate_host(deferred)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group; it must carry a new ``"name"`` and one ``"param_names"`` entry per parameter."""
        names = list(param_group.get("param_names", []))
        if "name" not in param_group or len(names) != len(list(param_group.get("params", []))):
            raise ValueError("a param group needs a 'name' and one 'param_names' entry per parameter")
        if param_group["name"] in self._size or any(n in self._chunks for n in names):
            raise ValueError(f"param group {param_group['name']!r} repeats an existing group or parameter name")
        for name, p in zip(names, param_group["params"]):
            if p.dtype not in (torch.float32, *LOW_PRECISION):
                raise ValueError(f"parameter {name!r} has dtype {p.dtype}; allowed: float32, bfloat16, float16")
            if not _local(p).is_contiguous():
                raise ValueError(f"parameter {name!r} is not contiguous")
        super().add_param_group(param_group)
        key, offset = param_group["name"], 0
        for name, p in zip(names, param_group["params"]):
            master = self._master_weights and p.dtype in LOW_PRECISION
            chunks, numel = [], _local(p).numel()
            for start in range(0, numel, self._chunk_size):
                chunks.append(_Chunk(name, start, min(self._chunk_size, numel - start), offset, master))
                offset += chunks[-1].width
            self._chunks[name], self._group_of[name], self._by_name[name] = chunks, key, p
        self._size[key] = offset
        if self._deferred is not None:  # in the constructor: one slab for all groups, allocated at its end
            self._deferred.append(key)
        else:
            self._allocate_host([key])

    def _allocate_host(self, keys: list[str], lean_ok: bool = False) -> None:
        """One host slab for these groups' records; each group's store is a view into it. No-op without offload.

        Allocated with ``torch.empty``: a record is only read after it was written (moments are zeroed and the
        master filled on the device at a parameter's first step), so untouched pages cost no resident memory on
        the CPU; with CUDA the slab is page-locked in one call, at its exact size.
        """
        if not self._offload or (self._lean and not lean_ok):  # host_lean: a group's records come at its first step
            return
        slab = torch.empty(sum(self._size[k] for k in keys), dtype=torch.float32)
        from torch._subclasses.fake_tensor import FakeTensor

        # a fake slab (a memory estimate under FakeTensorMode) has no memory to pin
        if self._pin and not isinstance(slab, FakeTensor) and slab.numel() > 0:
            slab = _pin(slab)
            self._pinned = True
        self._slabs.append(slab)
        offset = 0
        for k in keys:
            self._store[k] = slab[offset:offset + self._size[k]]
            offset += self._size[k]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Updates every parameter that has a gradient; parameters without one keep their state untouched."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0:
            return loss  # the scaled gradients overflowed: no state changes, the scaler backs off
        grad_scale = getattr(self, "grad_scale", None)
        self._inv_scale = None if grad_scale is None else 1.0 / float(grad_scale)
        by_device: dict[torch.device, list[_Work]] = {}
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"LayerwiseOffloadAdamW does not support sparse gradients: {name!r}")
                if not _local(p.grad).is_contiguous():
                    raise RuntimeError(f"the gradient of {name!r} is not contiguous")
                fresh = name not in self._steps
                self._steps[name] = self._steps.get(name, 0) + 1
                init_master = name not in self._master_set
                for chunk in self._chunks[name]:
                    by_device.setdefault(p.device, []).append(
                        _Work(chunk, p, group, self._steps[name], fresh, chunk.master and init_master))
                if self._chunks[name] and self._chunks[name][0].master:
                    self._master_set.add(name)
        self._peak_bytes = 0 if self._offload else self._device_store_bytes()
        if self._lean:
            self._claim_host({self._group_of[w.chunk.name] for work in by_device.values() for w in work})
        for device, work in by_device.items():
            if self._offload:
                peak = self._run_offloaded(device, work)
            else:
                peak = self._run_in_place(device, work)
            self._peak_bytes = max(self._peak_bytes, peak)
        return loss

    def _temporaries(self, work: list[_Work], device: torch.device) -> dict[str, Tensor]:
        """The step's compute buffers, one chunk long: ``denom`` always; ``grad32`` if a gradient is not fp32
        (it is up-cast into it, one chunk at a time); ``param32`` if a low-precision parameter has no master."""
        length = max(w.chunk.length for w in work)
        temps = {"denom": torch.empty(length, dtype=torch.float32, device=device)}
        if self._inv_scale is not None or any(w.param.grad.dtype != torch.float32 for w in work):
            temps["grad32"] = torch.empty(length, dtype=torch.float32, device=device)
        if any(w.param.dtype != torch.float32 and not w.chunk.master for w in work):
            temps["param32"] = torch.empty(length, dtype=torch.float32, device=device)
        return temps

    def _update(self, work: _Work, record: Tensor, temps: dict[str, Tensor]) -> None:
        """Updates one chunk whose record ``[exp_avg | exp_avg_sq | master]`` is ``record`` (on the device)."""
        c, p = work.chunk, _local(work.param)
        n = c.length
        param = p.view(-1)[c.start:c.start + n]
        grad = _local(work.param.grad).view(-1)[c.start:c.start + n]
        if work.fresh:  # a fresh torch.optim.AdamW starts its moments at zero
            record[:2 * n].zero_()
        if c.master:
            weights = record[2 * n:3 * n]
            if work.init_master:  # exact: every bf16/fp16 value is an fp32 value
                weights.copy_(param)
        elif p.dtype == torch.float32:
            weights = param
        else:  # master_weights=False: fp32 math on an up-cast copy, rounded back (pure low-precision AdamW)
            weights = temps["param32"][:n].copy_(param)
        if grad.dtype != torch.float32 or self._inv_scale is not None:
            grad = temps["grad32"][:n].copy_(grad)
            if self._inv_scale is not None:
                grad.mul_(self._inv_scale)  # unscaled in fp32, where the fp16 gradient's range is no limit
        beta1, beta2 = work.group["betas"]
        adamw_chunk(weights, grad, record[:n], record[n:2 * n], temps["denom"][:n], step=work.step,
                    lr=work.group["lr"], beta1=beta1, beta2=beta2, eps=work.group["eps"],
                    weight_decay=work.group["weight_decay"])
        if weights is not param:
            param.copy_(weights)  # the one rounding to the parameter's dtype

    def _run_in_place(self, device: torch.device, work: list[_Work]) -> int:
        """offload=False: the group stores live on the device and are updated in place. Returns peak bytes."""
        for key in dict.fromkeys(self._group_of[w.chunk.name] for w in work):
            store = self._store.get(key)
            if store is None:  # state is created per group on its first step, as torch.optim.AdamW does
                self._store[key] = torch.empty(self._size[key], dtype=torch.float32, device=device)
            elif store.device != device:  # the model was moved since the last step
                self._store[key] = store.to(device)
        temps = self._temporaries(work, device)
        for w in work:
            store = self._store[self._group_of[w.chunk.name]]
            self._update(w, store[w.chunk.offset:w.chunk.offset + w.chunk.width], temps)
        return self._device_store_bytes() + sum(t.nbytes for t in temps.values())

    def _cuda_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _run_offloaded(self, device: torch.device, work: list[_Work]) -> int:
        """Streams the chunks' records through a ring of device slots. Returns the bytes it allocated.

        With CUDA: chunk i+1's H2D copy is issued (on the H2D stream) before chunk i's update (compute stream)
        and chunk i's D2H copy (D2H stream) runs during chunk i+1's update. Elsewhere the same sequence runs
        synchronously, host and device both the CPU, still through distinct working copies.
        """
        n_slots = min(RING_SLOTS, len(work))
        width = (3 if any(w.chunk.master for w in work) else 2) * max(w.chunk.length for w in work)
        ring = torch.empty(n_slots, width, dtype=torch.float32, device=device)
        temps = self._temporaries(work, device)
        cuda = device.type == "cuda"
        if cuda:
            compute = torch.cuda.current_stream(device)
            h2d, d2h = self._cuda_streams(device)
            # the ring's memory may be a block the compute stream freed with kernels still queued that use it;
            # the caching allocator only guarantees that in compute-stream order, so H2D starts after them
            h2d.wait_stream(compute)
            if device in self._last_d2h:
                # the host store must hold the last step's write-backs before anything is copied out of it
                h2d.wait_event(self._last_d2h[device])
        arrived: list[torch.cuda.Event | None] = [None] * len(work)
        written: list[torch.cuda.Event | None] = [None] * len(work)

        def host(w: _Work) -> Tensor:
            return self._store[self._group_of[w.chunk.name]][w.chunk.offset:w.chunk.offset + w.chunk.width]

        def fetch(i: int) -> None:
            slot = ring[i % n_slots, :work[i].chunk.width]
            if not cuda:
                slot.copy_(host(work[i]))
                return
            with torch.cuda.stream(h2d):
                if i >= n_slots:
                    # the slot still holds chunk i-3 until its D2H copy (which waited for its update) read it
                    h2d.wait_event(written[i - n_slots])
                # non_blocking: the slab is pinned, so the copy overlaps the update of chunk i-1
                slot.copy_(host(work[i]), non_blocking=True)
                arrived[i] = h2d.record_event()  # the update of chunk i waits on this

        fetch(0)
        for i, w in enumerate(work):
            if i + 1 < len(work):
                fetch(i + 1)  # issued before the update of chunk i, so that the two overlap
            slot = ring[i % n_slots, :w.chunk.width]
            if cuda:
                # the update reads the record that the H2D copy on the side stream is writing
                compute.wait_event(arrived[i])
            self._update(w, slot, temps)
            if not cuda:
                host(w).copy_(slot)
                continue
            done = compute.record_event()  # the end of chunk i's update on the compute stream
            with torch.cuda.stream(d2h):
                # the copy must read the record only after the update has written it
                d2h.wait_event(done)
                # non_blocking: runs during the next chunk's update; the next step's H2D waits on its event
                host(w).copy_(slot, non_blocking=True)
                written[i] = d2h.record_event()
        if cuda:
            # freeing the ring hands its block back to the compute stream at once; the last write-backs may still
            # read it, so the allocator must not reuse it before the D2H stream passes this point (H2D copies need
            # no such record: the compute stream waited for every one of them)
            ring.record_stream(d2h)
            self._last_h2d[device], self._last_d2h[device] = arrived[-1], written[-1]
        return ring.nbytes + sum(t.nbytes for t in temps.values())

    def _claim_host(self, keys: set[str]) -> None:
        """host_lean: host records for the groups about to step that have none, their masters put back from
        where :meth:`release` parked them (the moments start at zero: their step counts were dropped)."""
        new = sorted(k for k in keys if k not in self._store)
        if not new:
            return
        self._allocate_lean(new)
        for key in new:
            parked = self._parked.pop(key, None)
            if parked is None:
                continue
            names, offset = [n for n, g in self._group_of.items() if g == key], 0
            for name in names:
                numel = _local(self._by_name[name]).numel()
                self._scatter(name, 2, parked[offset:offset + numel])
                offset += numel

    def _allocate_lean(self, keys: list[str]) -> None:
        """One host tensor per group (pinned with CUDA), so that a released group's memory is returned."""
        for key in keys:
            self._allocate_host([key], lean_ok=True)

    def release(self, keys: str | Iterable[str]) -> None:
        """host_lean: the groups ``keys`` leave the active set: their moments and step counts are dropped, their
        fp32 masters kept (parked, 4 bytes a parameter); the next step of a group starts its moments at zero.
        Without host_lean, only the moments restart (as :meth:`reset_state`), nothing is freed."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        if not self._lean:
            self.reset_state(keys)
            return
        self._wait_host()
        for key in keys:
            if key not in self._size:
                raise ValueError(f"release: unknown group key {key!r}")
            store = self._store.pop(key, None)
            names = [n for n, g in self._group_of.items() if g == key]
            if store is None:
                continue
            if any(n in self._master_set for n in names):
                parts = [store[c.offset + 2 * c.length:c.offset + 3 * c.length] for n in names
                         for c in self._chunks[n]]
                self._parked[key] = torch.cat(parts) if parts else torch.empty(0)
            for n in names:
                self._steps.pop(n, None)
            self._slabs = [t for t in self._slabs if t.untyped_storage().data_ptr()
                           != store.untyped_storage().data_ptr()]

    def _wait_host(self) -> None:
        """Blocks until no copy into or out of the host store is in flight, before the host touches it."""
        for event in [*self._last_h2d.values(), *self._last_d2h.values()]:
            # a pending D2H copy still writes the store, a pending H2D copy still reads it
            event.synchronize()
        self._last_h2d.clear()
        self._last_d2h.clear()

    def _device_store_bytes(self) -> int:
        return 0 if self._offload else sum(t.nbytes for t in self._store.values())

    def reset_state(self, keys: str | Iterable[str]) -> None:
        """Restarts the moments and step counts of the given group keys or parameter names (a fresh AdamW).

        Master weights are kept: they are the weights, not statistics. Nothing is copied or freed: the moments
        are zeroed on the device at the parameter's next step.

        Raises:
            ValueError: If a key is neither a group key nor a parameter name; nothing is reset then.
        """
        keys = [keys] if isinstance(keys, str) else list(keys)
        unknown = [k for k in keys if k not in self._size and k not in self._chunks]
        if unknown:
            raise ValueError(f"reset_state: unknown group keys or parameter names: {unknown}")
        for key in keys:
            names = [n for n, g in self._group_of.items() if g == key] if key in self._size else [key]
            for name in names:
                self._steps.pop(name, None)

    def memory_report(self) -> dict[str, int | bool]:
        """Optimizer bytes (moments and masters): on the device now, peak on the device during the last step
        (ring slots, compute buffers, and without offload the stores), in host memory, and whether that is pinned.
        """
        host = sum(t.nbytes for t in self._slabs) + sum(t.nbytes for t in self._parked.values())
        return {"device_state_bytes": self._device_store_bytes(), "peak_device_state_bytes": self._peak_bytes,
                "host_state_bytes": host, "host_pinned": self._pinned}

    def _gather(self, name: str, part: int) -> Tensor:
        """Part 0/1/2 (exp_avg, exp_avg_sq, master) of a parameter's chunk records, as one CPU tensor."""
        key = self._group_of[name]
        p = _local(self._by_name[name])
        if key not in self._store and part == 2 and key in self._parked:  # a released group's master
            offset = 0
            for n in (n for n, g in self._group_of.items() if g == key):
                if n == name:
                    return self._parked[key][offset:offset + p.numel()].clone().view(p.shape)
                offset += _local(self._by_name[n]).numel()
        store = self._store[key]
        out = torch.empty(p.numel(), dtype=torch.float32)
        for c in self._chunks[name]:
            out[c.start:c.start + c.length].copy_(store[c.offset + part * c.length:c.offset + (part + 1) * c.length])
        return out.view(p.shape)

    def _scatter(self, name: str, part: int, value: Tensor) -> None:
        store = self._store[self._group_of[name]]
        flat = value.detach().reshape(-1).to(dtype=torch.float32)
        for c in self._chunks[name]:
            store[c.offset + part * c.length:c.offset + (part + 1) * c.length].copy_(flat[c.start:c.start + c.length])

    def state_dict(self) -> dict[str, Any]:
        """State keyed by parameter name, as CPU copies; loads with ``torch.load(weights_only=True)``.

        Returns:
            ``{"state": {name: {"step", "exp_avg", "exp_avg_sq"[, "master"]}}, "param_groups": [{hyper-
            parameters..., "name": key, "param_names": [...]}]}``; parameters that have taken a step have an entry,
            and a parameter whose moments were reset keeps an entry with its ``"master"`` only.
        """
        self._wait_host()
        state: dict[str, dict[str, Tensor]] = {}
        for name in self._chunks:
            entry = {}
            if name in self._steps:
                entry = {"step": torch.tensor(float(self._steps[name]), dtype=torch.float32),
                         "exp_avg": self._gather(name, 0), "exp_avg_sq": self._gather(name, 1)}
            if name in self._master_set:
                entry["master"] = self._gather(name, 2)
            if entry:
                state[name] = entry
        groups = []
        for group in self.param_groups:
            entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            entry["param_names"] = list(group["param_names"])
            groups.append(entry)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replaces all state and hyperparameters with those of ``state_dict`` (as made by :meth:`state_dict`).

        A ``"master"`` is loaded where the parameter keeps one and ignored elsewhere; a low-precision parameter
        without a loaded master takes its master from its weights at its next step.

        Raises:
            ValueError: If names are missing from or unexpected in ``state_dict`` (all are listed), or a tensor
                has the wrong shape; the optimizer is unchanged then.
        """
        loaded_groups = state_dict["param_groups"]
        loaded_state = state_dict["state"]
        group_of = {n: g for g in loaded_groups for n in g["param_names"]}
        missing = [n for n in self._chunks if n not in group_of]
        unexpected = sorted((set(group_of) | set(loaded_state)) - set(self._chunks))
        if missing or unexpected:
            raise ValueError("optimizer state dict does not match the optimizer's parameters: "
                             f"missing names (in the optimizer, not in the state dict): {missing}; "
                             f"unexpected names (in the state dict, not in the optimizer): {unexpected}")
        bad = [f"{n}.{k}: expected shape {tuple(_local(self._by_name[n]).shape)}, got {tuple(s[k].shape)}"
               for n, s in loaded_state.items() for k in ("exp_avg", "exp_avg_sq", "master")
               if k in s and tuple(s[k].shape) != tuple(_local(self._by_name[n]).shape)]
        bad += [f"{n}: has 'step' without 'exp_avg'/'exp_avg_sq'" for n, s in loaded_state.items()
                if "step" in s and not ("exp_avg" in s and "exp_avg_sq" in s)]
        if bad:
            raise ValueError(f"optimizer state dict has tensors of the wrong shape: {bad}")
        for group in (g for g in self.param_groups if g["param_names"]):
            source = group_of[group["param_names"][0]]
            for k, v in source.items():
                if k not in ("params", "param_names", "name"):
                    group[k] = tuple(v) if k == "betas" else v
        self._wait_host()
        self._steps.clear()
        self._master_set.clear()
        if self._lean:  # the loaded groups' records exist again; the others have none until their next step
            self._store.clear()
            self._slabs.clear()
            self._parked.clear()
            self._allocate_lean(sorted({self._group_of[n] for n in loaded_state}))
        for name, s in loaded_state.items():
            key = self._group_of[name]
            if key not in self._store:  # offload=False: the group's device store, as its first step makes it
                self._store[key] = torch.empty(self._size[key], dtype=torch.float32, device=self._by_name[name].device)
            if "step" in s:
                self._scatter(name, 0, s["exp_avg"])
                self._scatter(name, 1, s["exp_avg_sq"])
                self._steps[name] = int(torch.as_tensor(s["step"]).item())
            has_master = bool(self._chunks[name]) and self._chunks[name][0].master
            if has_master and "master" in s:
                self._scatter(name, 2, s["master"])
                self._master_set.add(name)
        if self._lean:  # a group saved with its masters only (released when saved) is parked again
            idle = {self._group_of[n] for n in loaded_state} - {self._group_of[n] for n in self._steps}
            self.release(sorted(idle))
