"""The collectives of :class:`grass_ft.distributed.Distributed`, in real gloo process groups (no model): every tensor
is handed to a collective on the group's device, and low-precision gradients are averaged without losing precision.

A CPU build has no second device with data for gloo to be wrong about, so the "accelerator" here is torch's lazy
tensor device (``lazy:0``, TorchScript backend, computes on the CPU): the test sets it as the group's device, and a
wrapper around ``torch.distributed``'s collectives records the device of every tensor it is handed, refuses none
(the wrapper runs the real gloo collective on a host copy and writes the result back, as a device backend would),
and the test then requires every recorded device to be the group's. A CPU tensor handed to a collective -- what
nccl rejects with "No backend type associated with device type cpu" -- fails it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from grass_ft.parallel.distributed import Distributed, reduce_dtype

pytestmark = pytest.mark.slow  # spawns gloo process groups (a few seconds each, mostly importing torch)

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_to_all_single", "reduce", "gather", "scatter")


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _spawn(fn, world: int, *args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        mp.spawn(fn, args=(world, init_file, tmp, *args), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]


def _record_devices(seen: list[tuple[str, str]]) -> None:
    """Wrap torch.distributed's collectives: record (name, device) of every tensor; run lazy ones on a host copy."""
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def wrapped(tensor, *args, _real=real, _name=name, **kwargs):
            tensors = tensor if isinstance(tensor, list) else [tensor]
            seen.extend((_name, str(t.device)) for t in tensors)
            if all(t.device.type == "lazy" for t in tensors) and not isinstance(tensor, list):
                host = tensor.cpu()
                work = _real(host, *args, **kwargs)
                tensor.copy_(host)
                return work
            return _real(tensor, *args, **kwargs)

        setattr(dist, name, wrapped)


def _device_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    _init(rank, world, init_file)
    seen: list[tuple[str, str]] = []
    _record_devices(seen)
    device = torch.device("lazy", 0)
    d = Distributed(rank=rank, world_size=world, group_device=device)
    d.begin_step()
    tokens = d.sum_floats([10 * (rank + 1), 0.5])  # a step's figures: summed exactly
    d.check_same_draw([0, 2], torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), step=3)  # sampler state: host
    params = [nn.Parameter(torch.zeros(3, 4, dtype=dt, device=device)) for dt in (torch.float32, torch.bfloat16)]
    for p in params:
        p.grad = torch.full(p.shape, float(rank + 1), dtype=p.dtype, device=device)
    d.all_reduce_grads(params)
    probe = d.average_(torch.full((5,), float(rank), device=device))
    torch.save({"seen": seen, "tokens": tokens, "grads": [p.grad.cpu() for p in params], "probe": probe.cpu()},
               Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_every_collective_gets_tensors_on_the_group_device():
    results = _spawn(_device_worker, 2)
    for r in results:
        names = {name for name, _ in r["seen"]}
        assert {"all_reduce", "broadcast"} <= names
        wrong = [(name, dev) for name, dev in r["seen"] if dev != "lazy:0"]
        assert not wrong, f"collectives handed tensors off the group's device lazy:0: {wrong}"
        # and the values went through: the wrapper's host round trip is the real gloo collective
        assert r["tokens"] == [30.0, 1.0]
        for g in r["grads"]:
            assert torch.equal(g.float(), torch.full((3, 4), 1.5))
        assert torch.equal(r["probe"], torch.full((5,), 0.5))


# ------------------------------------------------------------------------------------------ bf16 averaging

WORLD_BF16 = 4  # 2 ranks would not show it: fl(a + b) / 2 is already the correctly rounded mean of two
N_BF16 = 4096


def _bf16_grad(rank: int) -> torch.Tensor:
    # gradients that cancel across ranks (a common part of mixed sign plus per-rank noise), so the mean is small
    # against the partial sums: where summing in bf16 loses most
    common = torch.randn(N_BF16, generator=torch.Generator().manual_seed(100))
    noise = torch.randn(N_BF16, generator=torch.Generator().manual_seed(rank))
    return (common * (1 if rank % 2 else -1) + 0.05 * noise).bfloat16()


def _bf16_worker(rank: int, world: int, init_file: str, out: str) -> None:
    _init(rank, world, init_file)
    d = Distributed(rank=rank, world_size=world, group_device=torch.device("cpu"))
    d.begin_step()
    p = nn.Parameter(torch.zeros(N_BF16, dtype=torch.bfloat16))
    p.grad = _bf16_grad(rank)
    d.all_reduce_grads([p])
    probe_in = _bf16_grad(rank)
    probe = d.average_(probe_in)
    torch.save({"grad": p.grad, "probe": probe, "probe_written": probe_in, "bytes": d.allreduce_bytes},
               Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_bf16_gradients_are_averaged_to_within_one_rounding():
    results = _spawn(_bf16_worker, WORLD_BF16)
    inputs = torch.stack([_bf16_grad(r).double() for r in range(WORLD_BF16)])
    exact = inputs.mean(0)  # fp64: exact for 4 bf16 values (8 significant bits each, sum needs < 53)
    # The reduction sums in fp32: each of the N - 1 additions errs by at most 2**-24 of a partial sum, so before the
    # division the sum is off by at most delta * N, delta = (N - 1) * 2**-24 * sum|g_i| / N after it. Rounding that
    # into the bf16 gradient (8 significant bits, round to nearest) adds at most 2**-8 of the value: the result is
    # within 2**-8 * (|mean| + delta) + delta of the exact mean. Summing in bf16 errs by up to 2**-8 of each
    # partial sum instead, which for cancelling gradients is many times 2**-8 |mean| (today's bug; the mean is
    # ~0.025 here against partial sums ~1).
    delta = (WORLD_BF16 - 1) * 2.0**-24 * inputs.abs().sum(0) / WORLD_BF16
    bound = 2.0**-8 * (exact.abs() + delta) + delta
    for r in results:
        assert r["grad"].dtype == torch.bfloat16
        err = (r["grad"].double() - exact).abs()
        assert (err <= bound).all(), f"max error {float((err / bound).max()):.1f}x the bound"
        # the probe's mean is returned before any rounding to bf16 (its norm feeds MGN): within delta
        assert r["probe"].dtype == torch.float32
        assert ((r["probe"].double() - exact).abs() <= delta).all()
        assert ((r["probe_written"].double() - exact).abs() <= bound).all()
        assert r["bytes"] == 2 * N_BF16 * 4  # both reduced as fp32


def test_reduce_dtype_is_at_least_fp32():
    assert reduce_dtype(torch.bfloat16) == torch.float32
    assert reduce_dtype(torch.float16) == torch.float32
    assert reduce_dtype(torch.float32) == torch.float32
    assert reduce_dtype(torch.float64) == torch.float64


def test_one_process_needs_no_group():
    d = Distributed()
    t = torch.ones(3, dtype=torch.bfloat16)
    assert d.sum_floats([7, 0.5]) == [7.0, 0.5] and d.average_(t) is t and d.allreduce_bytes == 0
