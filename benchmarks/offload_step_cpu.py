"""The optimizer step alone, offloaded against in place, on the CPU: what offloading itself costs per step.

``LayerwiseOffloadAdamW(offload=True)`` streams each block's fp32 records through a ring of working slots (a copy
in and a copy out per chunk); ``offload=False`` updates the same records in place. On a CPU host and device are the
same memory, so the difference is the copies' cost. Whole-step timings (``benchmarks/cpu_speed.py``) cannot show
it: forward and backward are ~98 % of a step and vary more than that from run to run.

SmolLM2-135M, 4 of 30 decoder blocks hold random gradients per step (4 block sets), the two arms interleaved (their
order alternates per repetition). Repetition 0 is every set's first step (the in-place arm allocates those blocks'
stores inside the step; the offloaded arm touches its up-front slab's pages for the first time); repetitions 1+
repeat the sets.

    python benchmarks/offload_step_cpu.py [--reps 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the shared harness, however this runs
from harness import use_checkout  # noqa: E402

use_checkout()
from grass_ft.models import block_layout, load_model_and_tokenizer
from grass_ft.offload import LayerwiseOffloadAdamW

SETS = [[3, 9, 17, 25], [1, 2, 28, 29], [5, 11, 12, 20], [0, 7, 14, 21]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(args.model)
    layout = block_layout(model, None)
    named = list(model.named_parameters())
    opts = {o: LayerwiseOffloadAdamW(named, lr=1e-5, group_fn=layout.group_key, offload=o) for o in (True, False)}
    times: dict[tuple[bool, int], list[float]] = {(o, r): [] for o in (True, False) for r in range(args.reps)}
    for rep in range(args.reps):
        for active in SETS:
            for o in ((True, False) if rep % 2 == 0 else (False, True)):
                for n, p in named:
                    p.grad = torch.randn_like(p) * 1e-3 if layout.block_of(n) in active else None
                t = time.perf_counter()
                opts[o].step()
                times[(o, rep)].append(time.perf_counter() - t)
    print(f"{args.model}, 4 blocks per step, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"optimizer.step() seconds, median of {len(SETS)} steps")
    for rep in range(args.reps):
        off, inp = statistics.median(times[(True, rep)]), statistics.median(times[(False, rep)])
        print(f"rep {rep}{' (first step of each set)' if rep == 0 else ''}: offload {off:.4f}, in place {inp:.4f}, "
              f"difference {1000 * (off - inp):+.1f} ms")


if __name__ == "__main__":
    main()
