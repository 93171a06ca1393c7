"""Multi-process training (torchrun / accelerate launch): process group, bucketed gradient all-reduce of only
the parameters that train this step, and a check that every rank trains the same blocks.

We do not wrap the model in ``DistributedDataParallel``: DDP registers every parameter once and then expects a
gradient for each at every step, which is exactly what layer sampling violates ("Expected to have finished
reduction… unused parameters", axolotl #1474, LMFlow #774); its workaround ``find_unused_parameters=True``
traverses the autograd graph every step. Instead, after the last backward of a step the gradients of the
parameters that train *this* step are flattened into buckets and averaged with ``all_reduce``. Every rank draws
the same blocks (one seeded generator, checked against rank 0 at each draw), so the buckets line up.

Every tensor handed to a collective lives on the process group's device (:meth:`Distributed.device`: the rank's
GPU under nccl, the CPU under gloo): nccl takes no CPU tensor ("No backend type associated with device type
cpu"), so small host values (a token count, the drawn blocks) are copied to the device first. We use one backend
rather than a ``cpu:gloo,cuda:nccl`` group: the values are tiny, and one group means one rendezvous and one
failure mode. Low-precision gradients are summed in fp32 (see :func:`reduce_dtype`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 25 * 2**20  # as DDP's default bucket_cap_mb


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    allreduce_bytes: int = 0  # bytes all-reduced in the current step (probe averaging included)
    group_device: torch.device | None = None  # where the group's collectives run; None: device()'s default

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """The device of the model and of every tensor handed to a collective."""
        if self.group_device is not None:
            return self.group_device
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def begin_step(self) -> None:
        """Start counting a new step's communicated bytes (called at the start of every step, probe included)."""
        self.allreduce_bytes = 0

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Average the ``.grad`` of ``params`` over ranks, in buckets of at most ``BUCKET_BYTES`` (counted in the
        reduction dtype), summed in :func:`reduce_dtype` and rounded once into each gradient's own dtype."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        for bucket in _buckets(grads):
            flat = self._mean(_flatten(bucket, reduce_dtype(bucket[0].dtype), self.device()))
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))  # one rounding into g's dtype
                offset += g.numel()

    def average_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of one tensor (the probe's per-parameter gradients), written back into ``tensor``.

        Returns the mean in :func:`reduce_dtype` (fp32 for a bf16 gradient), so a caller reading a norm from it
        sees no second rounding.
        """
        if not self.enabled:
            return tensor
        if tensor.dtype == reduce_dtype(tensor.dtype) and tensor.device == self.device() and tensor.is_contiguous():
            return self._mean(tensor.view(-1)).view_as(tensor)  # in place, no copy
        mean = self._mean(_flatten([tensor], reduce_dtype(tensor.dtype), self.device())).view_as(tensor)
        tensor.copy_(mean)
        return mean

    def _mean(self, flat: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world_size)
        self.allreduce_bytes += flat.numel() * flat.element_size()
        return flat

    def check_same_draw(self, active: list[int], mgn: torch.Tensor, step: int) -> None:
        """Raise if this rank's drawn blocks or MGN differ from rank 0's.

        Draws come from one seeded generator and MGN from all-reduced gradients, so they agree unless a rank
        was started differently (another seed or config); failing loudly beats training different blocks.
        """
        if not self.enabled:
            return
        mine = torch.cat([torch.tensor(active, dtype=torch.float64), mgn.detach().double().cpu()]).to(self.device())
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        if not torch.equal(mine, ref):
            ref = ref.cpu()
            raise RuntimeError(f"rank {self.rank} drew blocks {active} at step {step} but rank 0 drew "
                               f"{[int(x) for x in ref[:len(active)]]} (or their MGN differ); every rank must "
                               f"run the same config and seed")

    def sum_floats(self, values: list[float]) -> list[float]:
        """Sums over ranks of a few step figures (loss sums, counts, tokens), in one float64 all-reduce.

        float64 holds integers exactly up to 2^53, so counts and token totals come back exact.
        """
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device())
        dist.all_reduce(t)
        return t.tolist()  # host sync: the caller needs the numbers now (one per step, before the update)

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (a small picklable value, e.g. a verdict) on every rank; a collective, so also a
        barrier."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device())
        return box[0]

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients of ``dtype`` are summed in across ranks: at least fp32.

    Summing bf16 in bf16 rounds every partial sum to 8 significant bits: a ring or tree of N ranks rounds up to
    N - 1 times, each error up to 2**-8 of the partial sum, which with cancelling gradients can be many ulps of the
    mean. In fp32 the partial sums' errors are 2**-16 of a bf16 ulp, so the mean rounds once, into the gradient's
    bf16, to within half a bf16 ulp (+ N * 2**-24 of the partial sums). Pre-dividing by N in bf16 would not help
    (it rounds for N not a power of two and leaves the partial sums in bf16). The cost: bf16 gradients travel as
    fp32, twice the bytes (``allreduce_bytes`` counts them), as FSDP's ``reduce_dtype=float32``.
    """
    return torch.promote_types(dtype, torch.float32)


def _flatten(tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One contiguous buffer on ``device`` in ``dtype`` holding ``tensors`` one after another."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    offset = 0
    for t in tensors:
        flat[offset:offset + t.numel()].copy_(t.reshape(-1))
        offset += t.numel()
    return flat


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * reduce_dtype(g.dtype).itemsize
        if not out or size + nbytes > BUCKET_BYTES or out[-1][0].dtype != g.dtype:
            out.append([])
            size = 0
        out[-1].append(g)
        size += nbytes
    return out


def gpu_per_process(world: int) -> bool:
    """Whether every process on this machine has a GPU of its own (nccl needs one each). With fewer GPUs than
    processes (``LOCAL_WORLD_SIZE``, as torchrun sets it), every process trains on the CPU over gloo instead, and
    local rank 0 says so in one line (issue 29: torchrun's 2 processes on a 1-GPU machine)."""
    if not torch.cuda.is_available():
        return False
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    gpus = torch.cuda.device_count()
    if gpus >= local_world:
        return True
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"grass-ft: warning: {local_world} processes on this machine but {gpus} CUDA device(s): every "
              f"process trains on the CPU (gloo); start at most {gpus} per machine to train on the GPUs",
              file=sys.stderr, flush=True)
    return False


def init_distributed() -> Distributed:
    """Join the process group torchrun / accelerate launch describe in the environment (nccl on GPUs, gloo on
    CPU); a plain single process when ``WORLD_SIZE`` is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if gpu_per_process(world) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    return Distributed(rank=rank, world_size=world, local_rank=local, group_device=device)
