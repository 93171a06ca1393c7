"""Supervised-only loss vs the full forward: s/step and peak RSS of every method of the native loop.

Each arm is one ``grass-ft train`` run in its own subprocess (so its peak RSS is its own), on the same ``gsm-mix``
examples, seed and batches; an arm is a method with ``supervised_only_loss=false`` (the full forward, logits at
every position) or ``true`` (LM head and cross-entropy at labelled positions only, in chunks). The two arms of a
method run back to back, in alternating order from method to method, so slow drift of a shared machine falls on
both alike. s/step is the mean of the steps after ``--warmup`` (GRASS's probe steps are the warm-up there); peak
RSS is ``ru_maxrss`` at the last training step (from ``metrics.jsonl``, so the final save is not in it). Usage:

    python benchmarks/loss_speed.py --steps 5 --out docs/loss_speed.md   # ~15 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the shared harness, however this runs
from harness import cpu_name, write_lines  # noqa: E402

METHODS = ("fft", "lora", "dora", "lisa", "grass", "grass-static")


def run_arm(method: str, supervised_only: bool, args, root: Path) -> dict:
    out = root / f"{method}-{'sup' if supervised_only else 'full'}"
    keys = [f"model={args.model}", "data=gsm-mix", f"method={method}", f"batch_size={args.batch}",
            f"max_seq_len={args.seq}", f"max_steps={args.steps}", f"train_samples={args.batch * args.steps}",
            "eval_samples=0", "eval_before=false", f"probe_steps={args.warmup}", f"seed={args.seed}",
            f"supervised_only_loss={str(supervised_only).lower()}", f"output_dir={out}"]
    if method in ("grass", "grass-static"):
        # the paper's probe, whose steps are the warm-up: the default when this was designed (now probe_mode=train)
        keys.append("probe_mode=measure")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "grass_ft.cli", "train", "--quiet", *keys],
                       capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if r.returncode != 0:
        raise SystemExit(f"{method} supervised_only_loss={supervised_only} failed:\n{r.stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [x["s_per_step"] for x in lines if x["step"] >= args.warmup]
    row = {"method": method, "supervised_only_loss": supervised_only, "s_per_step": sum(timed) / len(timed),
           "timed_steps": len(timed), "peak_rss_bytes": lines[-1]["peak_memory_bytes"],
           "losses": [x["loss"] for x in lines], "wall_s": time.perf_counter() - t0}
    print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    return row


def labelled_share(args) -> float:
    """Share of the batches' positions (padding included) whose next-token label is scored."""
    from transformers import AutoTokenizer

    from grass_ft import data as data_mod
    from grass_ft.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    if tok.pad_token_id is None:  # as load_model_and_tokenizer does
        tok.pad_token = tok.eos_token
    train = data_mod.generate_examples("gsm-mix", args.batch * args.steps, args.seed)
    feats = [data_mod.tokenize_example(tok, ex, args.seq) for ex in train]
    stream = data_mod.BatchStream(feats, args.batch, tok.pad_token_id, seed=args.seed)
    scored = total = 0
    for _ in range(args.steps):
        labels = stream.next_batch()["labels"]
        scored += int((labels[:, 1:] != data_mod.IGNORE_INDEX).sum())
        total += labels.numel()
    return scored / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="training steps per arm, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (GRASS: the probe)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=None, help="markdown file to write")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loss_speed_") as tmp:
        for i, method in enumerate(methods):
            for supervised_only in ((False, True) if i % 2 == 0 else (True, False)):
                rows.append(run_arm(method, supervised_only, args, Path(tmp)))
    share = labelled_share(args)
    if args.out:
        write_markdown(Path(args.out), rows, share, args, time.perf_counter() - t0)


def write_markdown(path: Path, rows: list[dict], share: float, args, wall_s: float) -> None:
    by = {(r["method"], r["supervised_only_loss"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmd = (f"python benchmarks/loss_speed.py --methods {','.join(methods)} --batch {args.batch} --seq {args.seq} "
           f"--steps {args.steps} --warmup {args.warmup} --seed {args.seed} --out {args.out}")
    lines = [
        "# Supervised-only loss: s/step and peak RSS, before and after (SmolLM2-135M-Instruct, gsm-mix)",
        "",
        f"Command: `{cmd}` ({wall_s / 60:.1f} min)",
        "",
        f"Model {args.model}; `gsm-mix` examples, batch {args.batch}, max_seq_len {args.seq}, fp32, seed "
        f"{args.seed}; {args.steps - args.warmup} timed steps per arm after {args.warmup} untimed (GRASS: the "
        f"probe); torch {torch.__version__}, {cpu_name()}, {os.cpu_count()} CPUs "
        f"(a shared machine: compare the two arms of a method, which ran back to back). Of the batches' positions "
        f"(padding included), {share:.0%} are scored, which is all the supervised-only loss projects through the "
        f"LM head. Measured {time.strftime('%Y-%m-%d')}.",
        "",
        "| method | s/step, full | s/step, supervised-only | ratio | peak RSS, full (GiB) | peak RSS, supervised-only "
        "(GiB) | saved (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        f, s = by[(m, False)], by[(m, True)]
        lines.append(f"| {m} | {f['s_per_step']:.2f} | {s['s_per_step']:.2f} | {s['s_per_step'] / f['s_per_step']:.2f} "
                     f"| {f['peak_rss_bytes'] / 2**30:.2f} | {s['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{(f['peak_rss_bytes'] - s['peak_rss_bytes']) / 2**20:.0f} |")
    worst = max(abs(a - b) / abs(a) for m in methods
                for a, b in zip(by[(m, False)]["losses"], by[(m, True)]["losses"]) if a == a and a != 0)
    lines += [
        "",
        f"Train losses of the two arms agree step by step within a relative {worst:.1e} (the same batches; fp32 "
        f"sums in another order), so the arms trained the same way.",
        "",
        "Peak RSS is the process's high-water mark up to the last training step, so it includes the model as loaded "
        "(~0.5 GiB of fp32 weights) and the optimizer state; the difference between the arms is the logits "
        "(batch x sequence x 49,152 fp32 values, with their log-softmax and gradient) that the full forward keeps.",
    ]
    write_lines(path, lines)


if __name__ == "__main__":
    main()
