"""Tokens per second with ``packing=true`` against padded batches, side by side in one process (docs/RECIPE.md).

    python benchmarks/packing_speed.py --steps 6 --rounds 2 --batch 4 --seq 256 --out docs/results/packing_speed.json

Both arms train the same model (SmolLM2-135M-Instruct, fp32, the layer-wise default grass-uniform at gamma 4, the
supervised-only loss) on the same tokenised examples of the default data (gsm-mix: GSM-style chains of thought mixed
with short arithmetic, whose lengths differ a lot): one arm pads each batch of ``--batch`` examples to its longest
(grouped by length, as the native loop does), the other packs them into rows of ``--seq`` tokens (best-fit
decreasing, position ids restarting per example). A step of each arm runs in turn, ``--steps`` per arm per round, so
that load on the machine falls on both alike; tokens are the real ones (no padding), time is each step's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from grass_ft import data as data_mod  # noqa: E402
from grass_ft.config import TrainConfig  # noqa: E402
from grass_ft.loss import supervised_loss  # noqa: E402
from grass_ft.methods import prepare  # noqa: E402
from grass_ft.models import load_model, load_tokenizer  # noqa: E402
from grass_ft.step import StepRunner  # noqa: E402


def arms(features, tokenizer, batch: int, seq: int, seed: int) -> dict[str, data_mod.BatchStream]:
    packed = data_mod.pack_features(features, seq)
    return {"padded": data_mod.BatchStream(features, batch, tokenizer.pad_token_id, seed=seed),
            "packed": data_mod.BatchStream(packed, batch, tokenizer.pad_token_id, seed=seed)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = TrainConfig(model=a.model, method="grass-uniform", gamma=4, batch_size=a.batch, max_seq_len=a.seq,
                      dtype="float32")
    tok = load_tokenizer(a.model)
    rows = data_mod.generate_examples("gsm-mix", a.examples, seed=0)
    features = [data_mod.tokenize_example(tok, r, a.seq) for r in rows]
    streams = arms(features, tok, a.batch, a.seq, seed=0)
    runners = {}
    for name in streams:
        model = load_model(a.model, "float32")
        runners[name] = StepRunner(prepare(model, cfg), grad_accum=1, max_grad_norm=1.0)
    figures = {name: {"tokens": 0, "seconds": 0.0, "steps": 0} for name in streams}
    step = 0
    for _ in range(a.rounds):
        for name in streams:  # the arms alternate, a block of steps each, so that load falls on both alike
            for _ in range(a.steps):
                batch = streams[name].next_batch()
                t0 = time.perf_counter()
                res = runners[name].train_step(step, [batch], forward=supervised_loss)
                figures[name]["seconds"] += time.perf_counter() - t0
                figures[name]["tokens"] += res.tokens
                figures[name]["steps"] += 1
            step += 1
    out = {name: {**f, "tokens_per_s": f["tokens"] / f["seconds"], "s_per_step": f["seconds"] / f["steps"],
                  "tokens_per_step": f["tokens"] / f["steps"]} for name, f in figures.items()}
    out["gain"] = out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"]
    out["rows"] = {"examples": len(features), "packed_rows": len(data_mod.pack_features(features, a.seq))}
    out["setup"] = {**vars(a), "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "machine": platform.processor() or platform.machine(), "loadavg_at_end": os.getloadavg()}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
