"""Multi-process training (torchrun / accelerate launch): process group, bucketed gradient all-reduce of only
the parameters that train this step, and a check that every rank trains the same blocks.

We do not wrap the model in ``DistributedDataParallel``: DDP registers every parameter once and then expects a
gradient for each at every step, which is exactly what layer sampling violates ("Expected to have finished
reduction… unused parameters", axolotl #1474, LMFlow #774); its workaround ``find_unused_parameters=True``
traverses the autograd graph every step. Instead, after the last backward of a step the gradients of the
parameters that train *this* step are flattened into buckets and averaged with ``all_reduce``. Every rank draws
the same blocks (one seeded generator, checked against rank 0 at each draw), so the buckets line up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 25 * 2**20  # as DDP's default bucket_cap_mb


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    allreduce_bytes: int = 0  # bytes all-reduced in the current step (probe averaging included)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
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
        """Average the ``.grad`` of ``params`` over ranks, in buckets of at most ``BUCKET_BYTES``."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        for bucket in _buckets(grads):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(synced)
            self.allreduce_bytes += flat.numel() * flat.element_size()

    def average_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place mean over ranks of one tensor (the probe's per-parameter gradients)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)
            self.allreduce_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def check_same_draw(self, active: list[int], mgn: torch.Tensor, step: int) -> None:
        """Raise if this rank's drawn blocks or MGN differ from rank 0's.

        Draws come from one seeded generator and MGN from all-reduced gradients, so they agree unless a rank
        was started differently (another seed or config); failing loudly beats training different blocks.
        """
        if not self.enabled:
            return
        mine = torch.cat([torch.tensor(active, dtype=torch.float64), mgn.double().cpu()])
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        if not torch.equal(mine, ref):
            raise RuntimeError(f"rank {self.rank} drew blocks {active} at step {step} but rank 0 drew "
                               f"{[int(x) for x in ref[:len(active)]]} (or their MGN differ); every rank must "
                               f"run the same config and seed")

    def sum_int(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t)
        return int(t.item())

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if not out or size + nbytes > BUCKET_BYTES or out[-1][0].dtype != g.dtype or out[-1][0].device != g.device:
            out.append([])
            size = 0
        out[-1].append(g)
        size += nbytes
    return out


def init_distributed() -> Distributed:
    """Join the process group torchrun / accelerate launch describe in the environment (nccl on GPUs, gloo on
    CPU); a plain single process when ``WORLD_SIZE`` is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Distributed(rank=rank, world_size=world, local_rank=local)
