"""tests/test_fsdp.py's loading check, under torchrun with 2 processes (gloo, CPU):

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_load_worker.py OUT MODEL_DIR [MODEL_DIR ...]

Each rank runs the recipe's ``_load_model`` with ``fsdp=true`` on each model in turn and writes ``OUT/rankN.json``,
one entry per model: which model sources it read weights from (``load_model`` calls), how many elements of the
parameters it holds (its shards), its buffers, and the error it stopped with, if any. Rank 0 also writes each
model gathered back (``OUT/fullI.pt``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from grass_ft.config import TrainConfig
from grass_ft.parallel.distributed import init_distributed
from grass_ft.run import train


def main() -> None:
    out, model_dirs = Path(sys.argv[1]), sys.argv[2:]
    dist = init_distributed()
    reads: list[str] = []
    real = train.load_model

    def counted(spec, *args, **kw):
        reads.append(str(spec))
        return real(spec, *args, **kw)

    train.load_model = counted
    results = []
    for i, model_dir in enumerate(model_dirs):
        reads.clear()
        result: dict = {"rank": dist.rank}
        try:
            cfg = TrainConfig(model=model_dir, method="grass", gamma=2, fsdp=True, dtype="float32")
            model, _, _ = train._load_model(cfg, dist)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            result["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
            result["buffers"] = {n: b.tolist() for n, b in model.named_buffers()}
            if dist.is_main:
                torch.save(full, out / f"full{i}.pt")
        except Exception as e:  # noqa: BLE001 - the test reads what each rank stopped with
            result["error"] = f"{type(e).__name__}: {e}"
        results.append({**result, "reads": list(reads)})
    (out / f"rank{dist.rank}.json").write_text(json.dumps(results))
    dist.close()


if __name__ == "__main__":
    main()
