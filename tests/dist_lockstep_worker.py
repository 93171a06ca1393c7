"""Two processes against one, in lockstep, for tests/test_distributed.py and tests/test_fsdp.py (issue 28).

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_lockstep_worker.py OUT METHOD [fsdp]
        [accum=2] [checkpointing]

Every rank trains the tiny Llama with :class:`~grass_ft.step.StepRunner` on its half of each global batch (all-
reduced, or FSDP2's reduce-scatter with ``fsdp``), and beside it, without any collective, a one-process reference
runner on the whole global batch. Before every step the reference gets the distributed model's weights, so both
start the step equal; each captures the gradients its optimizer is about to apply (after clipping), and they must
agree to the bound below, at every update step -- as must the drawn blocks. Comparing the weights after several
AdamW steps instead has no bound (Adam turns a cancelling element's rounding noise into an update of ~lr whatever
its sign; tests/test_loss.py explains it), which is why the weights are not what is compared.

The bound (RTOL, ATOL): in exact arithmetic the two gradients are equal (every row has the same token count, so
the mean of the ranks' mean losses is the global mean). In fp32 (u = 2**-24) they differ by reordering: a weight's
gradient is a sum over the n = 4 x 24 = 96 positions of the global batch (one GEMM) against two sums of 48 and
their average (exact division by 2), <= n u ~ 6e-6 of the terms' magnitude; the upstream gradients it sums are
themselves computed in row blocks of another batch shape, which may reduce along the hidden size in another order
(K <= 64, through <= 4 blocks of ~4 matmuls): first order 16 x 64 u ~ 6e-5. So RTOL 1e-4 of an element, and ATOL
1e-6 for elements whose terms cancel (gradient terms <= ~1e-2 here after clipping at 1, times 1e-4). What the
comparison guards -- a missed all-reduce, a rank on the wrong shard of the batch, a bucket unflattened into the
wrong parameters, a wrong averaging divisor, a reduce-scatter that keeps its own half -- changes gradients by O(1).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from grass_ft.config import TrainConfig  # noqa: E402
from grass_ft.parallel.distributed import init_distributed  # noqa: E402
from grass_ft.method.methods import prepare  # noqa: E402
from grass_ft.method.step import StepRunner  # noqa: E402
from tiny import tiny_llama  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6
STEPS, GLOBAL_BATCH, SEQ = 10, 4, 24


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter or gradient; a collective for a DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def capture(runner: StepRunner) -> tuple[dict, object]:
    """The gradients ``runner``'s optimizer is about to apply (clipped), by parameter name."""
    grads: dict[str, torch.Tensor] = {}

    def hook(_opt, _args, _kwargs):
        for n, p in runner.params.items():
            if p.grad is not None:
                grads[n] = full(p.grad).detach().clone()

    return grads, runner.p.optimizer.register_step_pre_hook(hook)


def main(out: Path, method: str, fsdp: bool, accum: int = 1, checkpointing: bool = False) -> None:
    dist = init_distributed()
    cfg = TrainConfig(method=method, gamma=2, probe_steps=2, probe_mode="measure", sample_interval=2,
                      update_interval=4, max_steps=STEPS, lr=1e-2, seed=5, fsdp=fsdp, grad_accum=accum)
    model = tiny_llama(layers=4)
    ref_model = copy.deepcopy(model)  # the one-process run: no collective ever touches it
    if checkpointing:  # recomputation inside FSDP2's units
        from grass_ft.model import enable_checkpointing

        enable_checkpointing(model)
        enable_checkpointing(ref_model)
    if fsdp:
        from grass_ft.parallel.fsdp import shard_model

        shard_model(model, cfg.layers_attribute)
    runner = StepRunner(prepare(model, cfg), grad_accum=accum, max_grad_norm=1.0, dist=dist, sharded=fsdp)
    reference = StepRunner(prepare(ref_model, dataclasses.replace(cfg, fsdp=False)), grad_accum=accum,
                           max_grad_norm=1.0)
    gen = torch.Generator().manual_seed(0)
    compared, draws = 0, []
    for t in range(STEPS):
        ids = torch.randint(3, 100, (GLOBAL_BATCH, SEQ), generator=gen)  # equal lengths: equal token counts
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        # this rank's half of the global batch in `accum` micro-batches; the reference's `accum` micro-batches of
        # the whole batch (equal token counts: every grouping has the same mean in exact arithmetic)
        half, per = GLOBAL_BATCH // dist.world_size, GLOBAL_BATCH // dist.world_size // accum
        mine = [{k: v[dist.rank * half + i * per:dist.rank * half + (i + 1) * per] for k, v in batch.items()}
                for i in range(accum)]
        whole = [{k: v[i::accum] for k, v in batch.items()} for i in range(accum)]
        with torch.no_grad():  # both start the step from the same weights
            for n, p in ref_model.named_parameters():
                p.copy_(full(dict(model.named_parameters())[n]))
        (g_dist, h_dist), (g_ref, h_ref) = capture(runner), capture(reference)
        a = runner.train_step(t, mine)
        b = reference.train_step(t, whole)
        h_dist.remove(), h_ref.remove()
        assert (a.probe, a.active, a.skipped) == (b.probe, b.active, b.skipped), (t, a.active, b.active)
        draws.append(a.active)
        if a.probe:
            assert not g_dist and not g_ref, t
            continue
        assert g_dist.keys() == g_ref.keys() and g_dist, t
        for n, g in g_ref.items():
            torch.testing.assert_close(g_dist[n], g, rtol=RTOL, atol=ATOL, msg=f"step {t}: {n}")
        compared += 1
    if dist.rank == 0:
        (out / "lockstep.json").write_text(json.dumps({"compared": compared, "draws": draws}))
    dist.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    flags = sys.argv[3:]
    accum = int(next((f.split("=")[1] for f in flags if f.startswith("accum=")), 1))
    main(Path(sys.argv[1]), sys.argv[2], "fsdp" in flags, accum, "checkpointing" in flags)
