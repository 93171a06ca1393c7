"""CPU speed benchmark on SmolLM2-135M-Instruct: s/step of FFT, LISA-as-shipped and GRASS variants side by side.

Measures, in one process with the arms interleaved round by round (the machine is shared and noisy, so every
arm sees the same conditions):
- the layer-wise default (grass-uniform: uniform draws, embeddings and head trained, offloaded state);
- GRASS with and without optimizer-state offload (the offload overhead ratio);
- GRASS with embeddings and head frozen vs trained (backward stops below the lowest active block when frozen);
- GRASS vs FFT and LISA (step-time ratio at the default γ);
- MGN bookkeeping as a fraction of step time;
- optimizer-state bytes on the device over the steps (LISA-as-shipped grows, GRASS stays at zero).

Every arm trains on the same fixed-length random-token batches with the same seed, so the GRASS arms draw the
same blocks. Usage:

    python benchmarks/cpu_speed.py --steps 8 --rounds 2 --out docs/cpu_speed.md
"""

from __future__ import annotations

import sys
import argparse
import json
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the shared harness, however this runs
from harness import cpu_name, use_checkout, write_lines  # noqa: E402

use_checkout()
from grass_ft.config import PAPER_PROBE, TrainConfig
from grass_ft.methods import prepare
from grass_ft.models import PACKAGED_NOTE, load_model_and_tokenizer
from grass_ft.step import StepRunner, optimizer_state_bytes

# The paper's probe (here the two untimed steps): the default when these arms were designed, no longer.
MEASURE = PAPER_PROBE
ARMS = {
    "fft": {"method": "fft"},
    "lisa (as shipped)": {"method": "lisa"},
    "grass-uniform (layer-wise default)": {"method": "grass-uniform"},
    "grass, offload": {"method": "grass", "train_embeddings": False, "train_head": False, **MEASURE},
    "grass, no offload": {"method": "grass", "offload": False, "train_embeddings": False, "train_head": False,
                          **MEASURE},
    "grass, emb+head trained": {"method": "grass", **MEASURE},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="measured steps per arm per round (after the probe)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sample-interval", type=int, default=2)
    ap.add_argument("--out", default=None, help="markdown file to write")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    arms = {}
    for name, keys in ARMS.items():
        model, tok = load_model_and_tokenizer(args.model)
        cfg = TrainConfig(gamma=args.gamma, probe_steps=2, sample_interval=args.sample_interval,
                          update_interval=2 * args.sample_interval, lr=1e-5, **keys)
        prepared = prepare(model, cfg)
        arms[name] = {"runner": StepRunner(prepared, max_grad_norm=1.0), "step": 0, "times": [], "book": [],
                      "state": []}
    vocab = model.config.vocab_size
    batches = []
    for _ in range(2 + args.steps * args.rounds):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})

    # probe (GRASS) / warm-up (others): two steps each, not timed
    for arm in arms.values():
        for _ in range(2):
            arm["runner"].train_step(arm["step"], [batches[arm["step"]]])
            arm["step"] += 1
    for r in range(args.rounds):
        for name, arm in arms.items():
            for _ in range(args.steps):
                res = arm["runner"].train_step(arm["step"], [batches[arm["step"]]])
                arm["step"] += 1
                arm["times"].append(res.seconds)
                arm["book"].append(res.bookkeeping_s)
                arm["state"].append(optimizer_state_bytes(arm["runner"].p.optimizer))
            print(json.dumps({"round": r, "arm": name, "s_per_step": sum(arm["times"][-args.steps:]) / args.steps}),
                  flush=True)

    fft_s = sum(arms["fft"]["times"]) / len(arms["fft"]["times"])
    rows = []
    for name, arm in arms.items():
        s = sum(arm["times"]) / len(arm["times"])
        rows.append({"arm": name, "s_per_step": s, "ratio_to_fft": s / fft_s,
                     "tokens_per_s": args.batch * args.seq / s,
                     "bookkeeping_fraction": sum(arm["book"]) / sum(arm["times"]),
                     "state_device_first_MiB": arm["state"][0]["device"] / 2**20,
                     "state_device_last_MiB": arm["state"][-1]["device"] / 2**20,
                     "state_host_last_MiB": arm["state"][-1]["host"] / 2**20})
    for row in rows:
        print(json.dumps(row))
    if args.out:
        write_markdown(Path(args.out), rows, arms, args)


def write_markdown(path: Path, rows, arms, args) -> None:
    by = {r["arm"]: r for r in rows}
    lines = [
        "# CPU speed: FFT, LISA and GRASS side by side (SmolLM2-135M-Instruct)",
        "",
        f"Command: `python benchmarks/cpu_speed.py --steps {args.steps} --rounds {args.rounds} "
        f"--gamma {args.gamma} --batch {args.batch} --seq {args.seq}"
        + (f" --out {args.out}`" if args.out else "`"),
        "",
        f"Model: {args.model} ({PACKAGED_NOTE.get(args.model, 'as given')}); random-token batches "
        f"{args.batch}×{args.seq}; fp32; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{cpu_name()}; γ={args.gamma} of 30 blocks, re-drawn every "
        f"{args.sample_interval} steps; {args.steps * args.rounds} timed steps per arm, arms interleaved in "
        f"{args.rounds} rounds after 2 untimed probe/warm-up steps. Measured {time.strftime('%Y-%m-%d')}.",
        "",
        "| arm | s/step | × FFT | tokens/s | MGN bookkeeping, % of step | optimizer state on device, MiB (first → last timed step) | on host, MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['s_per_step']:.2f} | {r['ratio_to_fft']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{100 * r['bookkeeping_fraction']:.2f} | {r['state_device_first_MiB']:.0f} → "
                     f"{r['state_device_last_MiB']:.0f} | {r['state_host_last_MiB']:.0f} |")
    off, no_off = by["grass, offload"], by["grass, no offload"]
    frozen, trained = by["grass, offload"], by["grass, emb+head trained"]
    default = by["grass-uniform (layer-wise default)"]
    lines += [
        "",
        "Ratios from this run:",
        f"- offload overhead on CPU: GRASS with offload / without = "
        f"{off['s_per_step'] / no_off['s_per_step']:.2f}× step time. This ratio of whole steps is noise, not the "
        f"offload's cost: on a CPU host and device are the same memory, so offloading costs only the extra copies, "
        f"which `benchmarks/offload_step_cpu.py` times alone (under 1 % of a step; its figures and earlier runs of "
        f"this command in docs/RESULTS.md), while forward and backward vary more than that between runs.",
        f"- frozen embeddings and head: GRASS with them trained / frozen = "
        f"{trained['s_per_step'] / frozen['s_per_step']:.2f}× step time (frozen, backward stops below the lowest "
        f"active block and the 28M-parameter embedding gets no gradient).",
        f"- GRASS / FFT step time = {off['ratio_to_fft']:.2f}; LISA (as shipped) / FFT = "
        f"{by['lisa (as shipped)']['ratio_to_fft']:.2f}; the layer-wise default (grass-uniform, embeddings and head "
        f"trained) / FFT = {default['ratio_to_fft']:.2f}, / LISA = "
        f"{default['s_per_step'] / by['lisa (as shipped)']['s_per_step']:.2f}.",
        f"- LISA-as-shipped device state grew from {by['lisa (as shipped)']['state_device_first_MiB']:.0f} to "
        f"{by['lisa (as shipped)']['state_device_last_MiB']:.0f} MiB as new blocks were drawn; GRASS with offload "
        f"kept 0 MiB on the device between steps.",
        "",
        "Step times depend on which blocks are drawn (backward runs down to the lowest active block); the three "
        "`grass` arms use the same seed and so the same draws; grass-uniform and LISA draw uniformly, from the same "
        "seed as each other. 12 timed steps per arm: a guide, not a fine ranking — repeated runs of this command on "
        "this machine moved single ratios by up to ~15 % (docs/RESULTS.md).",
    ]
    write_lines(path, lines)


if __name__ == "__main__":
    main()
