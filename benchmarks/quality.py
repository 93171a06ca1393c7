"""Does importance sampling earn its place? The 200-update experiment of docs/RESULTS.md, run by a ledger.

Every finished run appends one JSON line to the ledger (``docs/results/quality_ledger.jsonl``, append-only): the
arm, seed, learning rate, the full resolved config, the git commit, and its figures (held-out GSM-style eval
loss on 256 problems, accuracy on 200 single-digit arithmetic problems, the eval-loss curve over updates and
process CPU-seconds, the probe's passes and CPU time). ``run`` skips every run already in the ledger, so the
experiment can be stopped at any point and continued in another session; ``report`` rebuilds every table and
plot from the ledger alone.

Protocol (fixed here; the same for every arm):

- model ``smollm2-135m`` (SmolLM2-135M-Instruct, weights through 4-bit quantisation), data ``gsm-mix`` (2,000
  problems generated from the run's seed: a quarter GSM-style chain of thought, three quarters single-digit
  arithmetic), batch 4, max_seq_len 256, constant lr, AdamW, clipping at 1.0, fp32, one thread per run;
- **200 optimizer updates for every arm** (``count_probe_steps=false``: the measuring probe's 4 forward/backward
  passes come on top of GRASS's 200 updates and their CPU time is reported separately);
- sampling arms: γ = 4 of 30 blocks, a draw every 10 steps, an importance refresh every 20 (the shipped
  defaults: 20 draws and 9 refreshes in a run), τ = 1, α = 0.5, probe 4;
- held-out: 256 ``gsm_symbolic`` problems scored by eval loss on their chain-of-thought answers (primary; a
  64-problem prefix of them gives the curve every 50 updates) and 200 single-digit ``+``/``*`` problems scored
  by greedy accuracy (16 new tokens), the task where accuracy moves at this size (docs/RESULTS.md: FFT +25
  points in 20 steps, while GSM-style accuracy stays at 0 % for every method). Fixed seeds, disjoint from
  training's; the same problems for every run.

Commands:

    python benchmarks/quality.py plan                # the queue, each item done / to run, and the CPU cost plan
    python benchmarks/quality.py measure             # s/step of every arm, side by side in one process
    python benchmarks/quality.py run                 # run the queue in order, skipping recorded runs
    python benchmarks/quality.py report              # docs/results/quality.md + plots, from the ledger alone
    python benchmarks/quality.py one --arm grass --seed 1 --lr 3e-4   # one run, printed, not recorded
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (DOCS, ROOT, append_record, claim_path, fmt_ci, git_commit, paired_ci,  # noqa: E402
                     read_jsonl, try_lock, use_checkout)

use_checkout()
from grass_ft.config import PAPER_LAYOUT, PAPER_PROBE  # noqa: E402

LEDGER = DOCS / "quality_ledger.jsonl"
WORK = ROOT / "runs" / "quality"

UPDATES = 200
CURVE_EVERY = 50
PROTOCOL: dict[str, Any] = {
    "model": "smollm2-135m", "data": "gsm-mix", "train_samples": 2000, "batch_size": 4, "grad_accum": 1,
    "max_seq_len": 256, "max_steps": UPDATES, "count_probe_steps": False, "lr_schedule": "constant",
    "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0, "dtype": "float32", "gamma": 4, "tau": 1.0,
    "alpha": 0.5, "probe_steps": 4, "sample_interval": 10, "update_interval": 20, "eval_samples": 0,
}
EVAL_SETS = {"gsm": ("gsm_symbolic", 256, 2_026_112_8), "arith": ("easy_arith", 200, 2_026_112_9)}
CURVE_SUBSET = 64  # the first 64 GSM-style problems: the curve's eval (a full 256 eval costs a minute of CPU)
MAX_NEW_TOKENS = 16
THREADS = 1

# The paper's layout and probe were the defaults when the experiment was designed; the defaults are now the
# results of the grass-head and grass-trainprobe arms, so the arms that mean the paper's GRASS say so.
FROZEN, MEASURE = PAPER_LAYOUT, PAPER_PROBE
# arm -> (method, extra keys). Every arm gets PROTOCOL and its lr.
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "grass": ("grass", {**FROZEN, **MEASURE}),
    "grass-uniform": ("grass-uniform", FROZEN),
    "grass-static": ("grass-static", {**FROZEN, **MEASURE}),
    "lisa": ("lisa", {}),
    "grass-trainprobe": ("grass", {**FROZEN, "probe_mode": "train"}),
    "grass-relative": ("grass", {**FROZEN, **MEASURE, "importance": "relative"}),
    # GRASS with the embeddings and the head trained at every step, as LISA does: added after LISA's seed-1 run
    # beat GRASS and the uniform control by 0.1 nats, to tell what LISA gains from its always-trained parameters
    # (LISA − control) from what importance sampling gains with them (this arm − LISA)
    "grass-head": ("grass", {"train_embeddings": True, "train_head": True, **MEASURE}),
    "fft": ("fft", {}),
    "lora": ("lora", {}),
}
LABELS = {"grass": "GRASS", "grass-uniform": "uniform control", "grass-static": "GRASS*", "lisa": "LISA (as shipped)",
          "grass-trainprobe": "GRASS, training probe", "grass-relative": "GRASS, relative importance",
          "grass-head": "GRASS + embeddings/head",
          "fft": "FFT", "lora": "LoRA r=32"}
COLORS = {"grass": "#2ca02c", "grass-uniform": "#7f7f7f", "grass-static": "#17becf", "lisa": "#ff7f0e",
          "grass-trainprobe": "#bcbd22", "grass-relative": "#d62728", "grass-head": "#9467bd", "fft": "#444444", "lora": "#1f77b4"}
# Learning-rate grids at seed 1. The GRASS variants (GRASS*, training probe, relative) train the same parameters
# with the same optimizer as GRASS and take GRASS's best rate (a grid each would double the cost).
GRID = {"grass": (1e-4, 3e-4), "grass-uniform": (1e-4, 3e-4), "lisa": (1e-4, 3e-4), "fft": (1e-5, 3e-5),
        "lora": (3e-4, 1e-3)}
# The edge rule (written 2026-11-29, before any rate beyond a grid was run): a grid whose best seed-1 rate is at one
# of its ends has not tuned that arm, so the next rate beyond that end (the grids' factor of ~3) is run at seed 1 too,
# once per end. As first written, an end was closed where the 20-step sweep had found the rate beyond it clearly
# worse (1e-3 for GRASS, the control and LISA; 3e-3 for LoRA), on the premise that a rate too high at 20 updates
# stays too high at 200. FFT's extension refuted that premise: 1e-4 was 0.015 nats behind 3e-5 at 20 steps and
# 0.11 ahead at 200 (0.6196 vs 0.7283, seed 1). So since 2026-11-30 00:20 -- before any other rate beyond a grid ran
# -- no end is closed: every arm gets one rate past each end its best reaches (FFT's one, 1e-4, is spent).
BEYOND: dict[str, tuple[float, float]] = {  # arm -> (below the grid, above it)
    "grass": (3e-5, 1e-3), "grass-uniform": (3e-5, 1e-3), "lisa": (3e-5, 1e-3), "fft": (3e-6, 1e-4),
    "lora": (1e-4, 3e-3),
}
# Phase G (written 2026-11-30 05:50 UTC, before any FFT run above 1e-4): the edge rule's one rate past each end put
# FFT's best at its extended grid's new top (1e-4). That cannot change the `method` decision -- a better FFT rate only
# widens its lead -- but if the method rule makes a baseline the default, the `lr` rule makes the default rate that
# baseline's best, and a best at an open end is not yet a best. So a baseline that may become the default method (it
# is in `deciding`) and whose extended grid's best sits at the extension gets one more rate past it at seed 1, read
# for the `lr` default only: `best_lr` ignores it, so its other seeds keep the rate they ran at.
LR_CHECK: dict[str, tuple[float, float]] = {"fft": (1e-6, 3e-4), "lora": (3e-5, 1e-2)}  # arm -> (below, above)
SHARES_LR = {"grass-static": "grass", "grass-trainprobe": "grass", "grass-relative": "grass", "grass-head": "grass"}
FIRST_LR = 3e-4  # the GRASS family's and LISA's best rate in the 20-step protocol: the core comparison runs at it
CORE = ("grass", "grass-uniform", "grass-static", "lisa", "grass-head")
VARIANTS = ("grass-trainprobe", "grass-relative")
BASELINES = ("fft", "lora")  # their seeds follow their own grids (phases C0, D)
CANDIDATES = ("grass", *VARIANTS, "grass-head")  # the GRASS arms that can become the default
# Phase A after three seeds (docs/RESULTS.md): the control no worse than GRASS, LISA and grass-head ahead of both by
# about 0.09 nats. The arms whose comparison decides a default get seeds 4-5 next, before the variants and grids.
DECIDING = ("grass", "grass-uniform", "grass-head", "lisa")


def protocol_id() -> str:
    """A short hash of everything that makes two runs comparable (protocol, eval sets, curve)."""
    blob = json.dumps({"p": PROTOCOL, "e": EVAL_SETS, "c": [CURVE_EVERY, CURVE_SUBSET, MAX_NEW_TOKENS]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_key(arm: str, seed: int, lr: float) -> str:
    return f"{arm}|seed={seed}|lr={lr:g}|protocol={protocol_id()}"


# ------------------------------------------------------------------------------------------------ ledger


def runs_of(records: list[dict]) -> dict[str, dict]:
    """The protocol's finished runs by key (the first record of a key wins)."""
    out: dict[str, dict] = {}
    for r in records:
        if r.get("record") == "run" and r.get("protocol_id") == protocol_id():
            out.setdefault(r["key"], r)
    return out


# ------------------------------------------------------------------------------------------------ queue


def _lowest_loss(arm: str, grid: tuple[float, ...], runs: dict[str, dict]) -> float | None:
    found = {lr: runs[run_key(arm, 1, lr)]["figures"]["gsm_eval_loss"] for lr in grid
             if run_key(arm, 1, lr) in runs}
    return min(grid, key=lambda lr: (found[lr], lr)) if len(found) == len(grid) else None


def beyond_edge(arm: str, runs: dict[str, dict]) -> float | None:
    """The rate the edge rule (:data:`BEYOND`) adds to ``arm``'s seed-1 grid: the next one past the end its
    recorded grid's best sits at, where that end is open; None while the grid is incomplete or its best is inside."""
    best = _lowest_loss(arm, GRID[arm], runs)
    below, above = BEYOND[arm]
    return below if best == min(GRID[arm]) else above if best == max(GRID[arm]) else None


def seed1_grid(arm: str, runs: dict[str, dict]) -> tuple[float, ...]:
    """``arm``'s seed-1 grid with the edge rule's rate, once the recorded runs call for it."""
    extra = beyond_edge(arm, runs)
    return tuple(sorted((*GRID[arm], extra))) if extra is not None else GRID[arm]


def best_lr(arm: str, runs: dict[str, dict]) -> float | None:
    """The arm's learning rate with the lowest GSM eval loss at seed 1, once its whole grid is recorded (with the
    edge rule's rate where its base grid's best sits at an open end)."""
    source = SHARES_LR.get(arm, arm)
    return _lowest_loss(source, seed1_grid(source, runs), runs)


def lr_check(arm: str, runs: dict[str, dict]) -> float | None:
    """Phase G's rate (:data:`LR_CHECK`) for a baseline whose extended seed-1 grid has its best at the edge rule's
    rate; None where the best is inside or the grid is incomplete."""
    extra, best = beyond_edge(arm, runs), best_lr(arm, runs)
    if arm not in LR_CHECK or extra is None or best != extra:
        return None
    below, above = LR_CHECK[arm]
    return below if best < min(GRID[arm]) else above


def default_rate(arm: str, runs: dict[str, dict]) -> float | None:
    """The rate the `lr` rule reads for ``arm``: its best at seed 1 over the extended grid and phase G's rate."""
    best, extra = best_lr(arm, runs), lr_check(arm, runs)
    if best is None or extra is None:
        return best
    return _lowest_loss(arm, (best, extra), runs)


def _first_three(arm: str, other: str, runs: dict[str, dict]) -> list[float] | None:
    """``arm`` − ``other`` GSM eval loss paired by seed over seeds 1-3, each at its best rate; None until all six
    runs are recorded."""
    lr_a, lr_o = best_lr(arm, runs), best_lr(other, runs)
    if lr_a is None or lr_o is None:
        return None
    pairs = [(runs.get(run_key(arm, s, lr_a)), runs.get(run_key(other, s, lr_o))) for s in (1, 2, 3)]
    if not all(a and b for a, b in pairs):
        return None
    return [a["figures"]["gsm_eval_loss"] - b["figures"]["gsm_eval_loss"] for a, b in pairs]


def _ahead(arm: str, other: str, runs: dict[str, dict]) -> bool:
    """Whether ``arm`` beats ``other`` on mean paired GSM eval loss over seeds 1-3, each at its best rate."""
    diffs = _first_three(arm, other, runs)
    return diffs is not None and statistics.fmean(diffs) < 0


def _ties(arm: str, other: str, runs: dict[str, dict]) -> bool:
    """Whether ``arm`` and ``other``'s paired 95 % interval on GSM eval loss over seeds 1-3, each at its best rate,
    includes 0 (no difference resolved)."""
    diffs = _first_three(arm, other, runs)
    if diffs is None:
        return False
    _, lo, hi = paired_ci(diffs)
    return lo <= 0 <= hi


# A variant whose default rule lets it win by tying GRASS (DEFAULTS.md, written 2026-11-29 14:08: `probe_mode=train`
# becomes the default "if it ties and saves the probe's 4 passes") may become the default without being ahead, so it
# needs five seeds too. Added 2026-11-30 06:10 UTC, after the training probe's seed 3 (a tie, +0.006 behind on the
# mean) and before any of its seeds 4-5: the seeds rule below had only counted variants ahead of GRASS.
WINS_BY_TYING = ("grass-trainprobe",)


def deciding(runs: dict[str, dict]) -> list[str]:
    """The arms that get seeds 4-5: GRASS and the uniform control (they decide `method`), each variant whose seeds
    1-3 beat GRASS on mean paired GSM eval loss (only a variant that may become the default needs five seeds; one
    that is behind after three decides nothing, unless its rule lets a tie win: :data:`WINS_BY_TYING`), and each
    baseline whose seeds 1-3 beat both sampling arms that train the embeddings/head (LISA, `grass-head`: the best so far): it may become the default `method`, the others
    have five seeds already. GRASS* is not a default candidate."""
    arms = ["grass", "grass-uniform"]
    arms += [v for v in CANDIDATES[1:]
             if _ahead(v, "grass", runs) or (v in WINS_BY_TYING and _ties(v, "grass", runs))]
    arms += [b for b in BASELINES if _ahead(b, "lisa", runs) and _ahead(b, "grass-head", runs)]
    return arms


def queue(runs: dict[str, dict]) -> list[tuple[str, str, int, float | None]]:
    """``(phase, arm, seed, lr)`` in priority order; ``lr`` None = waits for the arm's grid at seed 1."""
    q: list[tuple[str, str, int, float | None]] = []
    for seed in (1, 2, 3):  # A: does importance beat uniform draws? GRASS vs control vs GRASS* vs LISA
        q += [("A core @3e-4", arm, seed, FIRST_LR) for arm in CORE]
    for seed in (4, 5):  # A': seeds 4-5 for the arms that decide `method` and `train_embeddings`/`train_head`
        q += [("A' deciding seeds 4-5 @3e-4", arm, seed, FIRST_LR) for arm in DECIDING]
    # C0: the baselines' seed-1 grids before the variants: after phase A' they decide whether a baseline beats
    # every sampling arm (the `method` rule) and the FFT target
    q += [("C0 baselines' lr grid, seed 1", arm, 1, lr) for arm in BASELINES for lr in seed1_grid(arm, runs)]
    # D, then C, before the variants (reordered 2026-11-30): FFT's seed-1 grid (1e-4: 0.6196) came out ahead of
    # every sampling arm's seed 1, and whether a baseline beats them all -- each arm at its best rate -- decides
    # `method` (DEFAULTS.md); the variants decide keys of `method=grass` only, no longer the default method.
    for seed in (2, 3):  # D: the baselines at their best rate
        q += [("D baselines @best", arm, seed, best_lr(arm, runs)) for arm in BASELINES]
    for arm in ("lisa", *(a for a in GRID if a != "lisa")):  # C: the rest of each grid at seed 1 (with the edge
        # rule's rate); LISA's first: it is the default method at its defaults, whose rate decides `lr`
        q += [("C lr grid, seed 1", arm, 1, lr) for lr in seed1_grid(arm, runs) if not (arm in CORE and lr == FIRST_LR)]
    # Then, reordered 2026-11-30 before any E or F run, everything that decides `method` before the variants (which
    # decide keys of `method=grass` only): E for LISA and `grass-head` -- the sampling arms a baseline must beat --
    # then F for a baseline ahead of both after 3 seeds; then B, the other arms' E and F.
    method_arms = ("lisa", "grass-head")
    deciders = deciding(runs)

    def reruns(arms: tuple[str, ...]) -> list[tuple[str, str, int, float | None]]:  # E: not at phase A's rate
        return [("E best-lr reruns", arm, seed, lr) for seed in (1, 2, 3) for arm in arms
                if (lr := best_lr(arm, runs)) is None or lr != FIRST_LR]

    def more_seeds(arms: list[str]) -> list[tuple[str, str, int, float | None]]:  # F: five seeds for deciders
        return [("F seeds 4-5", arm, seed, best_lr(arm, runs)) for seed in (4, 5) for arm in arms]

    q += reruns(method_arms) + more_seeds([a for a in deciders if a in BASELINES])
    q += [("G default-rate check", arm, 1, lr) for arm in deciders if arm in BASELINES
          if (lr := lr_check(arm, runs)) is not None]
    for seed in (1, 2, 3):  # B: the two variants, same rate
        q += [("B variants @3e-4", arm, seed, FIRST_LR) for arm in VARIANTS]
    q += reruns(tuple(a for a in CORE + VARIANTS if a not in method_arms))
    q += more_seeds([a for a in deciders if a not in BASELINES])
    seen, out = set(), []
    for item in q:
        key = item[1:]
        if item[3] is not None and key in seen:
            continue
        seen.add(key)
        out.append(item)
    return out


# ------------------------------------------------------------------------------------------------ one run


def eval_sets() -> dict[str, list[dict]]:
    from grass_ft.data import generate_examples

    return {name: generate_examples(gen, n, seed) for name, (gen, n, seed) in EVAL_SETS.items()}


def arm_config(arm: str, seed: int, lr: float):
    from grass_ft.config import build_config
    from grass_ft.methods import method_names

    method, extra = ARMS[arm]
    keys = {**PROTOCOL, **extra, "method": method, "seed": seed, "lr": lr, "output_dir": str(WORK / "unused")}
    return build_config(overrides=keys, known_methods=method_names())


def by_length(examples: list[dict]) -> list[dict]:
    from grass_ft.data import format_prompt

    return sorted(examples, key=lambda ex: len(format_prompt(ex)) + len(ex["output"]))


def evaluate(model, tok, sets: dict[str, list[dict]], full: bool) -> dict[str, Any]:
    """GSM-style eval loss (all 256, or the curve's 64-problem prefix) and, when ``full``, arithmetic accuracy."""
    from grass_ft.evaluate import eval_loss, eval_loss_by_task, evaluate_examples

    # Batches of 16 problems of similar length (the figures are token-weighted sums, independent of the order):
    # chain-of-thought answers vary 2-3x in length, and padding to the longest would waste a third of the forward.
    if not full:
        return {"gsm_loss": eval_loss(model, tok, by_length(sets["gsm"][:CURVE_SUBSET]), PROTOCOL["max_seq_len"], 16)}
    # one pass over the 256 gives both figures: the curve's 64 are tagged as their own task
    tagged = [dict(ex, task="curve" if i < CURVE_SUBSET else "rest") for i, ex in enumerate(sets["gsm"])]
    overall, per_task = eval_loss_by_task(model, tok, by_length(tagged), PROTOCOL["max_seq_len"], 16)
    out: dict[str, Any] = {"gsm_loss": overall, "gsm_subset_loss": per_task["curve"]}
    if full:
        acc = evaluate_examples(model, tok, sets["arith"], "gsm8k", max_new_tokens=MAX_NEW_TOKENS, batch_size=16,
                                progress=False)
        out["arith_accuracy"] = acc["accuracy"]
        out["arith_n"] = acc["n"]
    return out


def one_run(arm: str, seed: int, lr: float, progress: bool = False) -> dict[str, Any]:
    """Train one arm for the protocol's 200 updates and evaluate it; returns the ledger record's figures."""
    import torch

    from grass_ft import data as data_mod
    from grass_ft.loss import loss_forward
    from grass_ft.methods import prepare, step_budget
    from grass_ft.models import load_model_and_tokenizer
    from grass_ft.step import StepRunner, lr_factor

    torch.set_num_threads(THREADS)
    cfg = arm_config(arm, seed, lr)
    torch.manual_seed(cfg.seed)
    train_ex = data_mod.generate_examples(cfg.data, cfg.train_samples, cfg.seed)  # the arms' data is a generator
    sets = eval_sets()
    model, tok = load_model_and_tokenizer(cfg.model, cfg.dtype)
    features = [data_mod.tokenize_example(tok, ex, cfg.max_seq_len, cfg.train_on_inputs) for ex in train_ex]
    stream = data_mod.BatchStream(features, cfg.batch_size, tok.pad_token_id, seed=cfg.seed)
    prepared = prepare(model, cfg)
    model = prepared.model
    n_steps, n_updates = step_budget(cfg, prepared.sampler)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        prepared.optimizer, lambda k: lr_factor(k, cfg.warmup_steps, n_updates, cfg.lr_schedule))
    runner = StepRunner(prepared, scheduler, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                        max_bad_steps=cfg.max_bad_steps)
    forward = loss_forward(cfg.supervised_only_loss)  # as the CLI's loop (supervised positions only, by default)
    curve, losses, active_sets = [], [], []
    cpu = wall = probe_cpu = probe_wall = eval_cpu = 0.0
    updates = probe_passes = 0
    for step in range(n_steps):
        batch = stream.next_batch()
        c0, w0 = time.process_time(), time.perf_counter()
        res = runner.train_step(step, [batch], forward=forward)
        dc, dw = time.process_time() - c0, time.perf_counter() - w0
        cpu, wall = cpu + dc, wall + dw
        if res.probe:
            probe_passes += 1
            probe_cpu, probe_wall = probe_cpu + dc, probe_wall + dw
            continue
        updates += 1
        losses.append(res.loss)
        active_sets.append(res.active)
        if progress:
            print(f"{arm} seed {seed} update {updates}: loss {res.loss:.4f} ({dw:.1f} s)", file=sys.stderr, flush=True)
        if updates % CURVE_EVERY == 0 and updates < n_updates:
            e0 = time.process_time()
            point = evaluate(model, tok, sets, full=False)
            eval_cpu += time.process_time() - e0
            curve.append({"update": updates, "train_cpu_s": cpu, "train_wall_s": wall,
                          "gsm_subset_loss": point["gsm_loss"]})
    e0 = time.process_time()
    final = evaluate(model, tok, sets, full=True)
    eval_cpu += time.process_time() - e0
    curve.append({"update": updates, "train_cpu_s": cpu, "train_wall_s": wall,
                  "gsm_subset_loss": final["gsm_subset_loss"]})
    recorder = runner._recorder
    return {
        "config": cfg.to_dict(),
        "figures": {
            "gsm_eval_loss": final["gsm_loss"], "gsm_n": len(sets["gsm"]),
            "arith_accuracy": final["arith_accuracy"], "arith_n": final["arith_n"],
            "curve": curve, "updates": updates, "probe_passes": probe_passes,
            "train_cpu_s": cpu, "train_wall_s": wall, "probe_cpu_s": probe_cpu, "probe_wall_s": probe_wall,
            "eval_cpu_s": eval_cpu, "cpu_s_per_update": (cpu - probe_cpu) / max(1, updates),
            "skipped_steps": runner.skipped_steps,
            "dropped_observations": recorder.dropped if recorder is not None else 0,
            "distinct_blocks": len(set().union(*map(set, active_sets))) if prepared.sampler else None,
            "final_train_loss": statistics.fmean(losses[-20:]),
        },
    }


def base_figures() -> dict[str, Any]:
    """The model as loaded, on the same eval sets (update 0 of every curve)."""
    import torch

    from grass_ft.models import load_model_and_tokenizer

    torch.set_num_threads(THREADS)
    model, tok = load_model_and_tokenizer(PROTOCOL["model"], PROTOCOL["dtype"])
    sets = eval_sets()
    c0 = time.process_time()
    f = evaluate(model, tok, sets, full=True)
    return {"gsm_eval_loss": f["gsm_loss"], "gsm_subset_loss": f["gsm_subset_loss"],
            "arith_accuracy": f["arith_accuracy"], "arith_n": f["arith_n"], "eval_cpu_s": time.process_time() - c0}


def child(argv: list[str], out: Path) -> bool:
    """Run ``argv`` (this script's ``one`` or ``base``) in a fresh process, so each run's CPU time and memory
    are its own; True when it wrote ``out``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--json-out", str(out)], env=env)
    return proc.returncode == 0 and out.is_file()


def record_common() -> dict[str, Any]:
    import torch

    sha, dirty = git_commit()
    return {"protocol_id": protocol_id(), "protocol": PROTOCOL, "eval_sets": EVAL_SETS, "git_commit": sha,
            "git_dirty_src": dirty, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": THREADS,
                     "torch": torch.__version__, "python": platform.python_version(),
                     "note": "shared machine: wall time is contaminated by other jobs; read CPU-seconds"}}


def cmd_run(ledger: Path, max_runs: int | None, phases: str | None) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    base_key = f"base|protocol={protocol_id()}"
    mine = None if any(r.get("key") == base_key for r in read_jsonl(ledger)) else try_lock(claim_path(WORK, base_key))
    if mine:
        print("[base] the model as loaded", flush=True)
        if child(["base"], WORK / "base.json"):
            append_record({"record": "base", "key": base_key, **record_common(),
                           "figures": json.loads((WORK / "base.json").read_text())}, ledger)
        mine.close()
    done = 0
    while max_runs is None or done < max_runs:
        if (WORK / "stop").exists():  # drain: every queue finishes its run, then exits (rm the file to go on)
            print(f"[stop] {WORK / 'stop'} exists: not starting another run", flush=True)
            return
        runs = runs_of(read_jsonl(ledger))
        todo = [(ph, arm, seed, lr) for ph, arm, seed, lr in queue(runs)
                if lr is not None and run_key(arm, seed, lr) not in runs and (not phases or ph[0] in phases)]
        failed = set((WORK / "failed.txt").read_text().splitlines()) if (WORK / "failed.txt").exists() else set()
        todo = [t for t in todo if run_key(*t[1:]) not in failed]
        if not todo:
            waiting = [t for t in queue(runs) if t[3] is None]
            print(f"[idle] nothing runnable; {len(waiting)} item(s) wait for a learning-rate grid", flush=True)
            return
        claimed = None
        for phase, arm, seed, lr in todo:
            key = run_key(arm, seed, lr)
            claimed = try_lock(claim_path(WORK, key))
            if claimed is not None:
                break
        if claimed is None:
            print("[idle] every runnable item is being run by another queue", flush=True)
            return
        print(f"[run ] {phase}: {key}", flush=True)
        t0 = time.perf_counter()
        out = WORK / f"{arm}-s{seed}-lr{lr:g}.json"
        common = record_common() | {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if child(["one", "--arm", arm, "--seed", str(seed), "--lr", repr(lr)], out):
            rec = json.loads(out.read_text())
            common["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            append_record({"record": "run", "key": key, "arm": arm, "seed": seed, "lr": lr, "phase": phase,
                           **common, **rec}, ledger)
            print(f"[done] {key}: GSM eval loss {rec['figures']['gsm_eval_loss']:.4f}, arithmetic "
                  f"{100 * rec['figures']['arith_accuracy']:.1f} %, {rec['figures']['train_cpu_s']:.0f} CPU-s "
                  f"training, {time.perf_counter() - t0:.0f} s wall", flush=True)
        else:
            with open(WORK / "failed.txt", "a") as f:  # not retried by this queue; delete the file to retry
                f.write(key + "\n")
            print(f"[FAIL] {key}", flush=True)
        claimed.close()
        done += 1


# ------------------------------------------------------------------------------------------------ measure


def cmd_measure(steps: int) -> None:
    """s/step (process CPU and wall) of every arm, side by side in one process: ``steps`` steps each after one
    warm-up step, real gsm-mix batches. For the cost plan; ratios are what to read on a shared machine."""
    import torch

    from grass_ft import data as data_mod
    from grass_ft.loss import loss_forward
    from grass_ft.methods import prepare
    from grass_ft.models import load_model_and_tokenizer
    from grass_ft.step import StepRunner

    torch.set_num_threads(THREADS)
    train_ex = data_mod.generate_examples("gsm-mix", 400, 1)
    rows = []
    for arm in ("fft", "lora", "lisa", "grass", "grass-uniform"):
        cfg = arm_config(arm, 1, 1e-4)
        model, tok = load_model_and_tokenizer(cfg.model, cfg.dtype)
        features = [data_mod.tokenize_example(tok, ex, cfg.max_seq_len) for ex in train_ex]
        stream = data_mod.BatchStream(features, cfg.batch_size, tok.pad_token_id, seed=1)
        prepared = prepare(model, cfg)
        runner = StepRunner(prepared, None, max_grad_norm=1.0)
        start = prepared.sampler.measure_steps if prepared.sampler else 0
        fwd = loss_forward(cfg.supervised_only_loss)
        for s in range(start):  # the probe, timed apart
            runner.train_step(s, [stream.next_batch()], forward=fwd)
        runner.train_step(start, [stream.next_batch()], forward=fwd)  # warm-up
        c0, w0 = time.process_time(), time.perf_counter()
        for s in range(start + 1, start + 1 + steps):
            runner.train_step(s, [stream.next_batch()], forward=fwd)
        rows.append((arm, (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps))
        print(f"{arm}: {rows[-1][1]:.2f} CPU-s/step, {rows[-1][2]:.2f} wall-s/step", flush=True)
    print(json.dumps(rows))


# ------------------------------------------------------------------------------------------------ report


def chosen_runs(runs: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """Per arm, its runs at the rate the table uses: the best rate once its seed-1 grid is complete, else
    3e-4 (the core comparison's) where recorded, else the rate with most seeds (of those, the lowest seed-1 GSM
    eval loss so far: a baseline is shown at its best rate yet, not at the first one of its grid)."""
    by_arm: dict[str, dict[float, dict[int, dict]]] = {}
    for r in runs.values():
        by_arm.setdefault(r["arm"], {}).setdefault(r["lr"], {})[r["seed"]] = r
    out = {}
    for arm, by_lr in by_arm.items():
        lr = best_lr(arm, runs)
        if lr not in by_lr:
            def rank(k: float) -> tuple[int, float]:
                first = by_lr[k].get(1)
                return len(by_lr[k]), -(first["figures"]["gsm_eval_loss"] if first else math.inf)

            lr = FIRST_LR if FIRST_LR in by_lr else max(by_lr, key=rank)
        out[arm] = by_lr[lr]
    return out


def fft_at_equal_cpu(chosen: dict[str, dict[int, dict]]) -> list[str]:
    """Post hoc, not a rule of this experiment: each arm's curve loss at its last update (the curve's 64 problems)
    minus FFT's at the same training CPU-seconds, FFT's curve interpolated linearly between its points (every 50
    updates). FFT costs more per update, so an arm's whole budget falls inside FFT's run."""
    fft = chosen.get("fft", {})

    def at(curve: list[dict], cpu: float) -> float | None:
        pts = [(c["train_cpu_s"], c["gsm_subset_loss"]) for c in curve]
        return next((y0 + (y1 - y0) * (cpu - x0) / (x1 - x0) for (x0, y0), (x1, y1) in zip(pts, pts[1:])
                     if x0 <= cpu <= x1), None)

    rows = []
    for arm in (a for a in ARMS if a != "fft" and chosen.get(a)):
        diffs = {}
        for seed in sorted(set(chosen[arm]) & set(fft)):
            last = chosen[arm][seed]["figures"]["curve"][-1]
            other = at(fft[seed]["figures"]["curve"], last["train_cpu_s"])
            if other is not None:
                diffs[seed] = last["gsm_subset_loss"] - other
        if len(diffs) >= 2:
            ahead = sum(d < 0 for d in diffs.values())
            rows.append(f"| {LABELS[arm]} − FFT | {','.join(map(str, diffs))} | "
                        f"{fmt_ci(paired_ci(list(diffs.values())), 4)} | {ahead} of {len(diffs)} |")
    if not rows:
        return []
    return ["", "## At equal training CPU-seconds (post hoc)", "",
            "Not one of this experiment's rules (it decided at equal updates): each arm at its 200th update against "
            "FFT at the same training CPU-seconds, on the curve's 64 problems (FFT's curve interpolated between its "
            "points every 50 updates). The frontier experiment decides on this axis by rules written before its runs.",
            "", "| row − FFT | seeds | curve eval loss at the row's CPU-seconds, 95 % interval | seeds where the row "
            "is ahead |", "|---|---|---|---|", *rows]


def targets_md(chosen: dict[str, dict[int, dict]]) -> list[str]:
    """The issue's targets for the best GRASS variant (lowest mean GSM eval loss among :data:`CANDIDATES`), each
    on paired seeds: met only when the 95 % interval says so."""
    variants = [a for a in CANDIDATES if chosen.get(a)]
    if not variants:
        return []

    def mean_loss(arm: str) -> float:
        return statistics.fmean(r["figures"]["gsm_eval_loss"] for r in chosen[arm].values())

    best = min(variants, key=mean_loss)
    rows = []

    def paired(other: str, fig: str) -> tuple[list[int], list[float]]:
        seeds = sorted(set(chosen[best]) & set(chosen.get(other, {})))
        return seeds, [chosen[best][s]["figures"][fig] - chosen[other][s]["figures"][fig] for s in seeds]

    def layout(arm: str) -> str:
        extra = ARMS[arm][1]
        return "frozen" if (extra.get("train_embeddings"), extra.get("train_head")) == (False, False) else "trained"

    for other in ("lisa", "grass-uniform", "grass-static"):
        if other not in chosen or other == best:
            continue
        seeds, d = paired(other, "gsm_eval_loss")
        ci = paired_ci(d)
        # a comparator with the other embeddings/head layout measures the layout as much as the draws: say so
        note = "" if layout(other) == layout(best) else (
            f" (layouts differ: embeddings/head {layout(best)} here, {layout(other)} in {LABELS[other]})")
        rows.append((f"GSM eval loss below {LABELS[other]}'s (interval below 0){note}",
                     fmt_ci(ci, 4) + f", seeds {seeds}", ci is not None and ci[2] < 0))
    if "fft" in chosen:
        seeds, _ = paired("fft", "gsm_eval_loss")
        if seeds:
            rel = [chosen[best][s]["figures"]["gsm_eval_loss"] / chosen["fft"][s]["figures"]["gsm_eval_loss"] - 1
                   for s in seeds]
            ci = paired_ci(rel)
            rows.append(("GSM eval loss within 2 % of FFT's (upper end of the interval of the ratio − 1 ≤ 2 %)",
                         fmt_ci(ci, 2, 100, mark=False) + f" %, seeds {seeds}",
                         ci is not None and ci[2] <= 0.02))
    for other, margin in (("lisa", 2.0), ("fft", -0.5)):
        if other not in chosen:
            continue
        seeds, d = paired(other, "arith_accuracy")
        ci = paired_ci(d)
        rows.append((f"arithmetic accuracy ≥ {LABELS[other]} {margin:+.1f} points (lower end of the interval)",
                     fmt_ci(ci, 1, 100) + f" points, seeds {seeds}", ci is not None and 100 * ci[1] >= margin))
    return (["", f"## Targets for the best GRASS variant so far: {LABELS[best]} (`{best}`)", "",
             "| target | paired difference, 95 % interval | met |", "|---|---|---|"]
            + [f"| {t} | {v} | {'yes' if ok else '**no** (or not yet resolved)'} |" for t, v, ok in rows])


def run_cost(rec: dict) -> float:
    """A recorded run's process CPU-seconds: training (probe included) and evaluation."""
    return rec["figures"]["train_cpu_s"] + rec["figures"].get("eval_cpu_s", 0.0)


def arm_price(runs: dict[str, dict], fallback: float | None = None):
    """CPU-seconds a run of an arm is expected to cost: the mean recorded cost of the arm's method, else of all
    recorded runs, else ``fallback``."""
    per_method: dict[str, list[float]] = {}
    for r in runs.values():
        per_method.setdefault(ARMS[r["arm"]][0], []).append(run_cost(r))
    overall = [c for costs in per_method.values() for c in costs]

    def price(arm: str) -> float:
        costs = per_method.get(ARMS[arm][0]) or overall
        return statistics.fmean(costs) if costs else (fallback or 0.0)

    return price


def cost_lines(runs: dict[str, dict], q: list[tuple[str, str, int, float | None]]) -> list[str]:
    """CPU spent by the recorded runs, and the remaining queue priced at each method's mean recorded cost per run
    (training + probe + evaluation; a method not yet recorded is priced at the mean of all recorded runs)."""
    if not runs:
        return []
    cost = {k: run_cost(r) for k, r in runs.items()}
    price = arm_price(runs)
    left = [t for t in q if t[3] is None or run_key(t[1], t[2], t[3]) not in runs]
    certain = [t for t in left if not (t[0].startswith("E") and t[3] is None)]
    est = sum(price(arm) for _, arm, _, _ in certain)
    return [f"CPU spent by the recorded runs: {sum(cost.values()) / 3600:.2f} CPU-hours (training, probe and "
            f"evaluation; process CPU time). Remaining planned runs: {len(certain)}, about {est / 3600:.1f} "
            f"CPU-hours at the recorded cost per run, plus {len(left) - len(certain)} conditional phase-E items.", ""]


def report_md(records: list[dict]) -> str:
    runs = runs_of(records)
    chosen = chosen_runs(runs)
    base = next((r for r in records if r.get("record") == "base" and r.get("protocol_id") == protocol_id()), None)
    q = queue(runs)
    n_done = sum(1 for _, arm, seed, lr in q if lr is not None and run_key(arm, seed, lr) in runs)
    n_cond = sum(1 for ph, *_ , lr in q if ph.startswith("E") and lr is None)
    n_planned = len(q) - n_cond
    L = ["# 200-update quality experiment (generated from the ledger by `make quality`; do not edit)", "",
         f"Ledger: `docs/results/quality_ledger.jsonl`, protocol `{protocol_id()}`. **{len(runs)} runs recorded**; "
         f"the queue plans {n_planned} runs ({n_done} done; phase E adds up to {n_cond} reruns where an arm's best "
         f"rate is not 3e-4). " + ("**Complete: every planned run is in.**" if n_done == n_planned and not n_cond
                                   else "**Partial until every planned run is in.** Continue with "
                                        "`nice -n 19 python benchmarks/quality.py run` (skips recorded runs)."), ""]
    L += cost_lines(runs, q)
    if base:
        b = base["figures"]
        L += [f"Model as loaded: GSM-style eval loss {b['gsm_eval_loss']:.4f} nats/token (n=256), arithmetic "
              f"accuracy {100 * b['arith_accuracy']:.1f} % (n={b['arith_n']}).", ""]
    L += ["## Per arm (each at the rate the table uses; mean ± sample sd over seeds)", "",
          "| arm | lr | seeds | GSM-style eval loss (n=256) | arithmetic accuracy, % (n=200) | "
          "train CPU-s per update | "
          "probe passes (CPU-s) | distinct blocks trained |", "|---|---|---|---|---|---|---|---|"]

    def ms(xs: list[float], d: int) -> str:
        if not xs:
            return "–"
        return f"{statistics.fmean(xs):.{d}f}" + (f" ± {statistics.stdev(xs):.{d}f}" if len(xs) > 1 else "")

    for arm in ARMS:
        rs = chosen.get(arm)
        if not rs:
            continue
        f = [r["figures"] for r in rs.values()]
        lr = next(iter(rs.values()))["lr"]
        blocks = [x["distinct_blocks"] for x in f if x.get("distinct_blocks") is not None]
        L.append(f"| {LABELS[arm]} (`{arm}`) | {lr:g} | {','.join(map(str, sorted(rs)))} | "
                 f"{ms([x['gsm_eval_loss'] for x in f], 4)} | {ms([100 * x['arith_accuracy'] for x in f], 1)} | "
                 f"{ms([x['cpu_s_per_update'] for x in f], 2)} | "
                 f"{f[0]['probe_passes']} ({ms([x['probe_cpu_s'] for x in f], 0)}) | "
                 f"{ms(blocks, 1) if blocks else '–'} |")
    L += ["", "## Paired by seed: row arm minus column arm (95 % t-interval; **excl. 0** = the interval excludes 0)",
          "", "Eval loss: negative = the row arm is better. Accuracy: points, positive = the row arm is better.", ""]
    pairs = [("grass", "grass-uniform"), ("grass", "grass-static"), ("grass", "lisa"),
             ("grass-static", "grass-uniform"),
             ("grass-trainprobe", "grass"), ("grass-trainprobe", "grass-uniform"), ("grass-relative", "grass"),
             ("grass-relative", "grass-uniform"), ("grass-uniform", "lisa"), ("grass-head", "lisa"),
             ("grass-head", "grass"), ("grass-head", "fft"), ("grass", "fft"), ("grass", "lora"),
             ("grass-uniform", "fft"), ("lisa", "fft"), ("lora", "fft")]
    L += ["| row − column | seeds | GSM eval loss difference | accuracy difference, points |", "|---|---|---|---|"]
    for a, b in pairs:
        if a not in chosen or b not in chosen:
            continue
        seeds = sorted(set(chosen[a]) & set(chosen[b]))
        if not seeds:
            continue
        dl = [chosen[a][s]["figures"]["gsm_eval_loss"] - chosen[b][s]["figures"]["gsm_eval_loss"] for s in seeds]
        da = [chosen[a][s]["figures"]["arith_accuracy"] - chosen[b][s]["figures"]["arith_accuracy"] for s in seeds]
        single = len(seeds) == 1
        L.append(f"| {LABELS[a]} − {LABELS[b]} | {','.join(map(str, seeds))} | "
                 f"{f'{dl[0]:+.4f} (one seed)' if single else fmt_ci(paired_ci(dl), 4)} | "
                 f"{f'{100 * da[0]:+.1f} (one seed)' if single else fmt_ci(paired_ci(da), 1, 100)} |")
    L += targets_md(chosen)
    L += fft_at_equal_cpu(chosen)
    L += ["", "## Learning-rate grid (seed 1; GSM eval loss / arithmetic accuracy)", "",
          "| arm | rates | best |", "|---|---|---|"]
    for arm in GRID:
        cells = []
        check = lr_check(arm, runs)
        for lr in (*seed1_grid(arm, runs), *([check] if check is not None else [])):
            r = runs.get(run_key(arm, 1, lr))
            cells.append(f"{lr:g}: " + (f"{r['figures']['gsm_eval_loss']:.4f} / "
                                        f"{100 * r['figures']['arith_accuracy']:.1f} %" if r else "not yet"))
        best, default = best_lr(arm, runs), default_rate(arm, runs)
        note = "" if check is None else f" (phase G's {check:g}: " + (
            "not yet)" if default is None else f"best for the `lr` rule: {default:g})")
        L.append(f"| {LABELS[arm]} | {' · '.join(cells)} | {best:g}{note} |" if best else
                 f"| {LABELS[arm]} | {' · '.join(cells)} | grid incomplete |")
    L += ["", "GRASS*, the training probe and the relative variant take GRASS's rate (same parameters, same "
          "optimizer). Edge rule: where a grid's best sits at one of its ends, the next rate past that end is run too "
          "(once per end; no end is closed in advance: `BEYOND` in benchmarks/quality.py, and \"Learning rates\" in "
          "docs/RESULTS.md for why). Phase G: a baseline that may become the default method and whose best is the "
          "edge rule's rate gets one more rate past it, read for the `lr` default only (`LR_CHECK`); its other "
          "seeds keep the best column's rate.",
          "", "## Every run", "", "| arm | seed | lr | GSM eval loss | accuracy, % | train CPU-s | wall-s | commit |",
          "|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs.values(), key=lambda r: (list(ARMS).index(r["arm"]), r["seed"], r["lr"])):
        f = r["figures"]
        L.append(f"| `{r['arm']}` | {r['seed']} | {r['lr']:g} | {f['gsm_eval_loss']:.4f} | "
                 f"{100 * f['arith_accuracy']:.1f} | {f['train_cpu_s']:.0f} | {f['train_wall_s']:.0f} | "
                 f"{r['git_commit'][:8]}{'+' if r.get('git_dirty_src') else ''} |")
    L += ["", "## Queue (in order)", "", "| phase | arm | seed | lr | status |", "|---|---|---|---|---|"]
    for ph, arm, seed, lr in q:
        st = "waits for grid" if lr is None else ("done" if run_key(arm, seed, lr) in runs else "to run")
        L.append(f"| {ph} | `{arm}` | {seed} | {'best' if lr is None else f'{lr:g}'} | {st} |")
    L += ["", "![loss vs updates](quality_updates.png)", "", "![loss vs CPU-seconds](quality_cpu.png)", ""]
    return "\n".join(L) + "\n"


def plots(records: list[dict], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = runs_of(records)
    chosen = chosen_runs(runs)
    base = next((r for r in records if r.get("record") == "base" and r.get("protocol_id") == protocol_id()), None)
    for name, xkey, xlabel in (("quality_updates.png", "update", "optimizer updates"),
                               ("quality_cpu.png", "train_cpu_s", "training process CPU-seconds (probe included)")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for arm, rs in chosen.items():
            curves = [r["figures"]["curve"] for r in rs.values()]
            n = min(len(c) for c in curves)
            xs = [statistics.fmean(c[i][xkey] for c in curves) for i in range(n)]
            ys = [[c[i]["gsm_subset_loss"] for c in curves] for i in range(n)]
            if base:
                xs, ys = [0.0] + xs, [[base["figures"]["gsm_subset_loss"]]] + ys
            mean = [statistics.fmean(y) for y in ys]
            ax.plot(xs, mean, marker=".", color=COLORS[arm], label=f"{LABELS[arm]} ({len(curves)} seeds)")
            if len(curves) > 1:
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=COLORS[arm], alpha=0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("GSM-style eval loss, 64-problem curve set")
        if base:
            ax.scatter([0.0], [base["figures"]["gsm_subset_loss"]], color="black", zorder=3, label="as loaded")
        ax.set_title("mean over seeds, band = min..max over seeds" if chosen else "no run recorded yet", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(docs / name, dpi=110)
        plt.close(fig)


def cmd_report(ledger: Path, docs: Path) -> None:
    records = read_jsonl(ledger)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "quality.md").write_text(report_md(records))
    plots(records, docs)  # also before the first run: the links in RESULTS.md stay valid
    print(f"wrote {docs / 'quality.md'} and the plots from {len(records)} ledger records")


def cmd_plan(ledger: Path, s_per_step: dict[str, float]) -> None:
    """The queue, each run priced at its method's mean recorded cost (``s_per_step`` only for a method the
    ledger has no run of yet)."""
    runs = runs_of(read_jsonl(ledger))
    q = queue(runs)
    price = arm_price(runs)
    total = conditional = 0.0
    for ph, arm, seed, lr in q:
        method = ARMS[arm][0]
        if runs:
            cost = price(arm)
        else:
            cost = s_per_step.get(method, s_per_step.get("grass", 0)) * UPDATES + EVAL_CPU_S
            if ARMS[arm][1].get("probe_mode") != "train" and method in ("grass", "grass-static"):
                cost += PROBE_PASSES_COST * s_per_step.get("fft", 0)
        done = lr is not None and run_key(arm, seed, lr) in runs
        if ph.startswith("E") and lr is None:
            conditional += cost  # runs only if the arm's best rate is not 3e-4
        else:
            total += 0 if done else cost
        print(f"{ph:22s} {arm:17s} seed {seed} lr {'best' if lr is None else f'{lr:g}':6s} "
              f"{'done' if done else f'~{cost / 3600:.2f} CPU-h'}")
    print(f"{len(q)} items, {sum(1 for t in q if t[3] is not None and run_key(t[1], t[2], t[3]) in runs)} done; "
          f"remaining ≈ {total / 3600:.1f} CPU-hours at the recorded cost per run, plus up to {conditional / 3600:.1f} "
          f"CPU-hours of phase E reruns if some arm's best rate at seed 1 is not 3e-4")


EVAL_CPU_S = 150.0  # measured: 3 curve evals of 64 problems + 256 + 64 loss + 200 generations, one thread
PROBE_PASSES_COST = 4  # the measuring probe: 4 full backward passes, each about an FFT step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run the queue, skipping runs already in the ledger")
    p_run.add_argument("--max-runs", type=int, default=None)
    p_run.add_argument("--phases", default=None, help="only these phase letters, e.g. AB")
    sub.add_parser("report", help="docs/results/quality.md and plots from the ledger alone")
    p_plan = sub.add_parser("plan", help="the queue and its remaining CPU cost")
    p_plan.add_argument("--s-per-step", default="{}", help='JSON {"fft": 9.0, ...} CPU-s per step (from measure)')
    p_measure = sub.add_parser("measure", help="CPU-s per step of each arm, side by side in one process")
    p_measure.add_argument("--steps", type=int, default=4)
    p_one = sub.add_parser("one", help="one run; prints its figures (recorded only by `run`)")
    p_one.add_argument("--arm", choices=list(ARMS), required=True)
    p_one.add_argument("--seed", type=int, required=True)
    p_one.add_argument("--lr", type=float, required=True)
    p_one.add_argument("--json-out", type=Path, default=None)
    p_base = sub.add_parser("base", help="the model as loaded on the eval sets")
    p_base.add_argument("--json-out", type=Path, default=None)
    for p in (p_run, p_plan, sub.choices["report"]):
        p.add_argument("--ledger", type=Path, default=LEDGER)
    sub.choices["report"].add_argument("--docs", type=Path, default=DOCS)
    args = ap.parse_args()
    if args.cmd == "run":
        cmd_run(args.ledger, args.max_runs, args.phases)
    elif args.cmd == "report":
        cmd_report(args.ledger, args.docs)
    elif args.cmd == "plan":
        cmd_plan(args.ledger, json.loads(args.s_per_step))
    elif args.cmd == "measure":
        cmd_measure(args.steps)
    elif args.cmd in ("one", "base"):
        res = one_run(args.arm, args.seed, args.lr, progress=True) if args.cmd == "one" else base_figures()
        text = json.dumps(res)
        if args.json_out:
            args.json_out.write_text(text)
        else:
            print(text)


if __name__ == "__main__":
    main()
