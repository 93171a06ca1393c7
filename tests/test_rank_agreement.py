"""Several processes take one decision per step: a non-finite loss or an unsupervised batch on one rank only.

Two gloo processes run :class:`grass_ft.step.StepRunner` directly (no CLI), so that the test can make one rank's
loss non-finite at one step. Before, that rank skipped its backward: the other rank waited in the gradient
all-reduce (or FSDP2's reduce-scatter) forever, and the ranks' weights parted. A short process-group timeout turns
such a hang into a failure.
"""

import datetime
import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grass_ft.config import TrainConfig
from grass_ft.parallel.distributed import Distributed
from grass_ft.method.methods import prepare
from grass_ft.method.step import StepRunner

from tiny import tiny_llama

pytestmark = pytest.mark.slow

BAD_STEP = 4  # after the probe (2 steps), in the first draw's window
STEPS = 7


def _batch(step: int, rank: int, unsupervised: bool = False) -> dict:
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(3, 100, (2, 12), generator=g)
    labels = torch.full_like(ids, -100) if unsupervised else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _worker(rank: int, init: str, out: str, fsdp: bool, kind: str) -> None:
    from grass_ft.method.loss import loss_forward

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = tiny_llama(layers=4)
        if fsdp:
            from grass_ft.parallel.fsdp import shard_model

            shard_model(model)
        cfg = TrainConfig(method="grass", gamma=2, probe_steps=2, sample_interval=2, update_interval=4,
                          max_steps=STEPS, lr=1e-2, fsdp=fsdp)
        runner = StepRunner(prepare(model, cfg), max_grad_norm=1.0, sharded=fsdp,
                            dist=Distributed(rank=rank, world_size=2, group_device=torch.device("cpu")))
        supervised_only = loss_forward(True)  # an unsupervised batch: loss 0 with zero gradients
        now = {"step": -1}

        def forward(m, mb):
            if kind == "unsupervised":
                return supervised_only(m, mb)
            loss = m(**mb).loss
            return loss * float("nan") if rank == 1 and now["step"] == BAD_STEP else loss

        rows = []
        for step in range(STEPS):
            now["step"] = step
            mb = _batch(step, rank, unsupervised=kind == "unsupervised" and rank == 1 and step == BAD_STEP)
            res = runner.train_step(step, [mb], forward=forward)
            rows.append((res.skipped, res.loss, res.tokens))
        state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                 for n, p in model.named_parameters()}
        torch.save({"rows": rows, "state": state}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fsdp,kind", [(False, "nan"), (True, "nan"), (False, "unsupervised")],
                         ids=["allreduce-nan", "fsdp2-nan", "allreduce-unsupervised"])
def test_one_rank_bad_step_is_one_decision_for_all_ranks(tmp_path, fsdp, kind):
    if fsdp:
        from grass_ft.parallel.fsdp import fsdp_unavailable

        if fsdp_unavailable():
            pytest.skip(fsdp_unavailable())
    ctx = mp.start_processes(_worker, args=(f"file://{tmp_path / 'pg'}", str(tmp_path), fsdp, kind), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 240  # the 60 s process-group timeout should have ended a hang long before
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):  # True once both ranks exited cleanly
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish: a collective is waiting for a rank that left it")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # one decision: the same skip flags, loss and tokens on both ranks (the loss is all-reduced, so equal bits)
    assert [row[0] for row in r0["rows"]] == [row[0] for row in r1["rows"]]
    for (s0, l0, t0), (s1, l1, t1) in zip(r0["rows"], r1["rows"]):
        assert (math.isnan(l0) and math.isnan(l1)) or l0 == l1
        assert t0 == t1 == 2 * 2 * 12  # both ranks' tokens
    skipped = [row[0] for row in r0["rows"]]
    if kind == "nan":  # one rank's non-finite loss poisons the averaged gradient: every rank skips that step only
        assert skipped == [step == BAD_STEP for step in range(STEPS)]
        assert math.isnan(r0["rows"][BAD_STEP][1])
    else:  # rank 0 had supervised tokens: every rank takes the step (rank 1 contributes zero gradients)
        assert not any(skipped)
    # the same updates on both ranks: equal weights, bit for bit (identical all-reduced gradients, identical
    # arithmetic); under FSDP2 the gathered tensors are compared, which checks the gather and that nothing hung
    for name, w in r0["state"].items():
        assert torch.equal(w, r1["state"][name]), name
