"""The frontier experiment's protocol and rules (docs/RESULTS.md, issue 27): what every run trains and is scored on,
the settings and their keys in the ledger, the rate grids and the edge rule, the equal-time costs, and the queue in
priority order with its price. Pure bookkeeping over ledger records: no model is loaded here.

``frontier.py`` runs what this module queues and records it; ``frontier_report.py`` reads the same records through
these rules. Neither is imported here.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import frontier_data as fdata  # noqa: E402
from harness import DOCS  # noqa: E402

LEDGER = DOCS / "frontier_ledger.jsonl"
SEEDS, THREADS = (1, 2, 3), 1
UPDATES, WARMUP_SHARE, CURVE_EVERY = 500, 0.05, 100
ALL_BLOCKS = 30  # SmolLM2-135M's decoder blocks: γ = all
PROTOCOL: dict[str, Any] = {
    "model": "smollm2-135m", "data": fdata.TRAIN_MIX, "train_samples": 2000, "batch_size": 4, "grad_accum": 1,
    "max_seq_len": 256, "max_steps": UPDATES, "count_probe_steps": False, "lr_schedule": "cosine",
    "warmup_steps": round(WARMUP_SHARE * UPDATES), "max_grad_norm": 1.0, "weight_decay": 0.0, "dtype": "float32",
    "gamma": 4, "tau": 1.0, "alpha": 0.5, "probe_steps": 4, "probe_mode": "train", "importance": "mgn",
    "sample_interval": 10, "update_interval": 20, "train_embeddings": True, "train_head": True,
    "reset_state_on_switch": False, "lora_r": 32, "lora_alpha": None, "lora_dropout": 0.05, "master_weights": True,
    "offload": None, "supervised_only_loss": True, "eval_samples": 0,
}
# name -> (template part or task, problems, seed); seeds far from training's (the run's seed and seed + 7919)
EVAL_SETS: dict[str, tuple[str, int, int]] = {
    "test": ("test", 256, 2027_0001), "validation": ("validation", 128, 2027_0002), "seen": ("train", 64, 2027_0003),
    "acc": (fdata.ACC_TASK_NAME, 200, 2027_0004),
}
CURVE_SUBSET = 64  # the first 64 test problems: the curve's eval
MAX_NEW_TOKENS = 16

# arm -> (method, keys besides PROTOCOL). The `-noise` arms start from the weights plus Q4_1-sized noise.
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "fft": ("fft", {}),
    "grass-uniform": ("grass-uniform", {}),
    "lora": ("lora", {}),
    "grass": ("grass", {}),
    "lisa": ("lisa", {}),
    "badam": ("badam", {}),
    "grass-uniform-reset": ("grass-uniform", {"reset_state_on_switch": True}),
    "grass-static": ("grass-static", {}),
    "fft-noise": ("fft", {}),
    "grass-uniform-noise": ("grass-uniform", {}),
}
NOISY = ("fft-noise", "grass-uniform-noise")
LAYERWISE = ("grass-uniform", "grass", "lisa", "badam", "grass-uniform-reset", "grass-static", "grass-uniform-noise")
LABELS = {"fft": "FFT", "grass-uniform": "grass-uniform", "lora": "LoRA", "grass": "GRASS (MGN)",
          "lisa": "LISA (as shipped)", "badam": "BAdam order", "grass-uniform-reset": "grass-uniform, reset",
          "grass-static": "GRASS*", "fft-noise": "FFT + Q4_1 noise", "grass-uniform-noise": "grass-uniform + noise"}
COLORS = {"fft": "#444444", "grass-uniform": "#7f7f7f", "lora": "#1f77b4", "grass": "#2ca02c", "lisa": "#ff7f0e",
          "badam": "#8c564b", "grass-uniform-reset": "#e377c2", "grass-static": "#17becf", "fft-noise": "#000000",
          "grass-uniform-noise": "#bcbd22"}
# Rate grids at seed 1, read on the validation templates, for the arms a default rides on (method=auto's three
# kinds of row: FFT, the layer-wise default, LoRA); the current best first, then one below and one above.
GRID = {"fft": (1e-4, 3e-5, 3e-4), "grass-uniform": (3e-4, 1e-4, 1e-3), "lora": (1e-3, 3e-4, 3e-3)}
# The edge rule's rates past each end of a grid, in the order they are added (below, above): the first was the
# committed rule; the fourth amendment (docs/RESULTS.md) repeats it while the best sits at the end, up to three.
BEYOND = {"fft": ((1e-5, 3e-6, 1e-6), (1e-3, 3e-3, 1e-2)),
          "grass-uniform": ((3e-5, 1e-5, 3e-6), (3e-3, 1e-2, 3e-2)),
          "lora": ((1e-4, 3e-5, 1e-5), (1e-2, 3e-2, 1e-1))}
# The other arms train the same parameters with the same optimizer as the arm named here, and take its rate.
SHARES_LR = {"grass": "grass-uniform", "lisa": "grass-uniform", "badam": "grass-uniform",
             "grass-uniform-reset": "grass-uniform", "grass-static": "grass-uniform",
             "grass-uniform-noise": "grass-uniform", "fft-noise": "fft"}
MAIN = ("fft", "grass-uniform", "lora", "grass", "lisa", "badam", "grass-uniform-reset")  # decide method=auto
FRONTIER_GAMMAS = (1, 2, 8)
FRONTIER_LAYERWISE = ("grass-uniform", "badam", "grass")
FRONTIER_RANKS = (8, 16, 64, 128)
TIME_TOLERANCE = 0.10  # a setting within 10 % of the reference's CPU-seconds counts as equal time
# The cost benchmark (docs/RESULTS.md, third amendment): untimed updates, timed ones, the rate (it moves no cost),
# and the rounds a setting's ratio to the reference needs before its time-matched run is sized.
COST_WARMUP, COST_UPDATES, COST_LR, COST_MIN_ROUNDS = 10, 20, 1e-4, 3
# A run is quiet when the other processes on the machine used at most this many CPUs on average while its training
# steps ran (docs/RESULTS.md, amendment of 2026-12-07): a run sharing the machine may cost more CPU-seconds per update.
QUIET_LOAD = 0.10


@dataclass(frozen=True)
class Setting:
    """What one run trains: an arm at a γ (layer-wise) or rank (LoRA), for a number of updates."""

    arm: str
    gamma: int | None = None
    lora_r: int | None = None
    updates: int = UPDATES

    def __post_init__(self) -> None:
        if self.gamma is None and self.arm in LAYERWISE:
            object.__setattr__(self, "gamma", PROTOCOL["gamma"])
        if self.lora_r is None and ARMS[self.arm][0] == "lora":
            object.__setattr__(self, "lora_r", PROTOCOL["lora_r"])

    @property
    def point(self) -> Setting:
        """The same setting at the protocol's 500 updates (a time-matched run's full-length twin)."""
        return replace(self, updates=UPDATES)

    @property
    def name(self) -> str:
        extra = (f" γ={'all' if self.gamma == ALL_BLOCKS else self.gamma}" if self.gamma is not None else "") + (
            f" r={self.lora_r}" if self.lora_r is not None else "")
        length = {UPDATES: "", 0: ", time-matched (updates once the costs are in)"}.get(self.updates,
                                                                                         f", {self.updates} updates")
        return LABELS[self.arm] + extra + length


REFERENCE = Setting("grass-uniform")  # the equal-time budget: its mean training CPU-s over seeds 1-3


def protocol_id() -> str:
    """A short hash of everything that makes two runs comparable."""
    blob = json.dumps({"p": PROTOCOL, "e": EVAL_SETS, "split": fdata.template_split(), "acc": fdata.ACC_TASK,
                       "prose": fdata.PROSE_SHA256, "noise": fdata.NOISE_SEED,
                       "c": [CURVE_EVERY, CURVE_SUBSET, MAX_NEW_TOKENS, WARMUP_SHARE]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_key(s: Setting, seed: int, lr: float) -> str:
    return (f"{s.arm}|gamma={s.gamma}|r={s.lora_r}|updates={s.updates}|seed={seed}|lr={lr:g}"
            f"|protocol={protocol_id()}")


class Runs(dict):
    """This protocol's finished runs by key, with its cost benchmark's measurements (``costs``: setting -> round ->
    CPU-s per update, quiet measurements only)."""

    costs: dict[Setting, dict[int, float]]


def runs_of(records: list[dict]) -> Runs:
    """This protocol's finished runs by key (the first record of a key wins: later ones are read first) and its
    cost measurements (:func:`cmd_costs`)."""
    pid = protocol_id()
    runs = Runs((r["key"], r) for r in reversed(records) if r.get("record") == "run" and r.get("protocol_id") == pid)
    runs.costs = {}
    for r in records:
        if r.get("record") == "cost" and r.get("protocol_id") == pid and r["others_load"] <= QUIET_LOAD:
            runs.costs.setdefault(Setting(r["arm"], r.get("gamma"), r.get("lora_r")), {})[r["round"]] = (
                r["cpu_s_per_update"])
    return runs


def setting_of(rec: dict) -> Setting:
    return Setting(rec["arm"], rec.get("gamma"), rec.get("lora_r"), rec["updates"])


# ------------------------------------------------------------------------------------------------ rules


def _val_loss(arm: str, lr: float, runs: dict[str, dict]) -> float | None:
    r = runs.get(run_key(Setting(arm), 1, lr))
    return r["figures"]["validation_loss"] if r else None


def seed1_grid(arm: str, runs: dict[str, dict]) -> tuple[float, ...]:
    """``arm``'s rates at seed 1: its grid, plus the edge rule's rates. While every rate so far is recorded and the
    best (by validation loss) sits at an end, the next rate past that end is added (:data:`BEYOND`, at most three
    past each end); the grid is returned as it stands at the first rate not yet recorded."""
    grid = GRID[arm]
    below, above = (list(side) for side in BEYOND[arm])
    while True:
        found = {lr: v for lr in grid if (v := _val_loss(arm, lr, runs)) is not None}
        if len(found) < len(grid):
            return grid
        best = min(grid, key=lambda lr: (found[lr], lr))
        side = below if best == min(grid) else above if best == max(grid) else []
        if not side:
            return grid
        grid = (*grid, side.pop(0))


def best_lr(arm: str, runs: dict[str, dict]) -> float | None:
    """The rate an arm runs at: the lowest validation loss at seed 1 over its (extended) grid, or the rate of the
    arm it shares with (:data:`SHARES_LR`); None until that grid is recorded."""
    source = SHARES_LR.get(arm, arm)
    grid = seed1_grid(source, runs)
    found = {lr: v for lr in grid if (v := _val_loss(source, lr, runs)) is not None}
    return min(grid, key=lambda lr: (found[lr], lr)) if len(found) == len(grid) else None


def quiet(r: dict) -> bool | None:
    """Whether a run's training steps had the machine to themselves (the others' load at most :data:`QUIET_LOAD`);
    None for a run recorded before the load was measured."""
    load = r["figures"].get("others_load")
    return None if load is None else load <= QUIET_LOAD


def cost_per_update(s: Setting, runs: dict[str, dict]) -> tuple[float, str] | None:
    """The setting's training CPU-seconds per update (probe and offload included) and what it rests on: the mean
    over its 500-update runs, at any rate and seed (the rate changes no arithmetic), that were quiet; without one,
    over those recorded before the load was measured ("unmeasured"); then over the shared ones ("shared")."""
    mine = [r for r in runs.values() if setting_of(r) == s.point]
    for basis, want in (("quiet", True), ("unmeasured", None), ("shared", False)):
        if xs := [r["figures"]["cpu_s_per_update"] for r in mine if quiet(r) is want]:
            return statistics.fmean(xs), basis
    return None


def cost_ratio(s: Setting, runs: dict[str, dict], first: int | None = None) -> tuple[float, int] | None:
    """The setting's training cost per update relative to the reference's (grass-uniform γ=4), side by side: the
    geometric mean over the cost benchmark's rounds that measured both (:func:`cmd_costs`; only the ``first`` of
    them where given), and how many rounds; None before one has (docs/RESULTS.md, third amendment)."""
    costs = getattr(runs, "costs", {})
    ref, mine = costs.get(REFERENCE.point, {}), costs.get(s.point, {})
    rounds = sorted(set(ref) & set(mine))[:first]
    if not rounds:
        return None
    return math.exp(statistics.fmean(math.log(mine[r] / ref[r]) for r in rounds)), len(rounds)


def train_cpu(s: Setting, runs: dict[str, dict]) -> float | None:
    """The training CPU-seconds of the setting's 500 updates, once the reference's seeds 1-3 are recorded
    (None before): the reference's own clocks over those runs (the equal-time budget ``T_ref``), × the setting's
    :func:`cost_ratio`."""
    lr = best_lr(REFERENCE.arm, runs)
    recs = [runs.get(run_key(REFERENCE, seed, lr)) for seed in SEEDS] if lr is not None else [None]
    ratio = cost_ratio(s, runs)
    if not all(recs) or ratio is None:
        return None
    return ratio[0] * statistics.fmean(r["figures"]["train_cpu_s"] for r in recs)


def seeds_of(s: Setting) -> tuple[int, ...]:
    """The seeds a setting is planned with: 3 for the arms at the protocol's γ and rank, 1 for frontier points."""
    main = s.gamma in (None, PROTOCOL["gamma"]) and s.lora_r in (None, PROTOCOL["lora_r"])
    return SEEDS if main else SEEDS[:1]


def matched_updates(s: Setting, runs: dict[str, dict]) -> int | None:
    """Updates of the setting's time-matched run: its schedule compressed so that its training costs the
    reference's CPU-seconds (``round(500 / ratio)``, :func:`cost_ratio`); 0 when its 500 updates cost at most 10 %
    more than the reference's (they are the equal-time figure then); None until :data:`COST_MIN_ROUNDS` rounds of
    the cost benchmark have measured the ratio. Sized once: from those first rounds only, so a later round cannot
    resize a setting whose matched runs are recorded (the third amendment's "sized once 3 rounds have measured it")."""
    ratio = cost_ratio(s, runs, first=COST_MIN_ROUNDS)
    if ratio is None or ratio[1] < COST_MIN_ROUNDS:
        return None
    return 0 if ratio[0] <= 1 + TIME_TOLERANCE else max(1, round(UPDATES / ratio[0]))


def equal_time_setting(s: Setting, runs: dict[str, dict]) -> Setting | None:
    """The run that stands for ``s`` at equal CPU time: its time-matched twin, or itself; None while unknown."""
    n = matched_updates(s, runs)
    return None if n is None else (s.point if n == 0 else replace(s, updates=n))


def frontier_settings() -> list[Setting]:
    """The memory frontier's points besides the protocol's γ and rank (phase F)."""
    out = [Setting("grass-uniform", gamma=g) for g in (*FRONTIER_GAMMAS, ALL_BLOCKS)]
    out += [Setting("lora", lora_r=r) for r in FRONTIER_RANKS]
    return out + [Setting(a, gamma=g) for a in FRONTIER_LAYERWISE[1:] for g in FRONTIER_GAMMAS]


Item = tuple[str, Setting, int, float | None]  # (phase, setting, seed, lr); lr None or updates 0: waits


def queue(runs: dict[str, dict]) -> list[Item]:
    """The queue in priority order: what decides method=auto's order first (the rate grids, the main arms' seeds,
    their time-matched runs, the frontier at one seed), then GRASS*, the repair test, the frontier's seeds 2-3."""
    q: list[Item] = []
    grids = {arm: seed1_grid(arm, runs) for arm in GRID}
    for i in range(max(map(len, grids.values()))):  # L: rates at seed 1, every arm's current best first
        q += [("L rate grid (seed 1, validation)", Setting(arm), 1, g[i]) for arm, g in grids.items() if i < len(g)]
    for seed in SEEDS:  # M: the arms that decide method=auto and importance, at their rates (a grid's seed 1 is in L)
        q += [("M main arms", Setting(arm), seed, best_lr(arm, runs)) for arm in MAIN
              if not (seed == 1 and arm in GRID)]

    def matched(phase: str, settings: list[Setting], seeds: tuple[int, ...]) -> list[Item]:
        out: list[Item] = []
        for s in settings:
            n = matched_updates(s, runs)
            if n != 0:  # 0: no time-matched run needed; None: not known yet (updates 0: waits)
                out += [(phase, replace(s, updates=n or 0), seed, best_lr(s.arm, runs)) for seed in seeds]
        return out

    q += matched("T time-matched (main)", [Setting(a) for a in MAIN if a != REFERENCE.arm], SEEDS)
    frontier = frontier_settings()
    q += [("F frontier (seed 1)", s, 1, best_lr(s.arm, runs)) for s in frontier]
    q += matched("F' frontier time-matched (seed 1)", frontier, SEEDS[:1])
    q += [("S GRASS*", Setting("grass-static"), seed, best_lr("grass-static", runs)) for seed in SEEDS]
    q += [("Q repair test", Setting(arm), seed, best_lr(arm, runs)) for seed in SEEDS for arm in NOISY]
    q += [("X frontier seeds 2-3", s, seed, best_lr(s.arm, runs)) for seed in SEEDS[1:] for s in frontier]
    seen, out = set(), []
    for item in q:  # a rate grid's best is also the main arm's seed-1 run: listed once
        key = (item[1], item[2], item[3])
        if runnable(item) and key in seen:
            continue
        seen.add(key)
        out.append(item)
    return out


def runnable(item: Item) -> bool:
    return item[1].updates > 0 and item[3] is not None


# ------------------------------------------------------------------------------------------------ price


# CPU-s per update in the 200-update experiment (docs/results/quality_ledger.jsonl, means over its runs): the
# price of a method until this ledger has its own; layer-wise arms train the embeddings and head (grass-head's).
PRIOR_CPU_PER_UPDATE = {"fft": 5.1, "lora": 4.6, "lisa": 3.7, "layerwise": 3.5}
PRIOR_EVAL_CPU_S = 600.0  # the 200-update experiment's ~560 CPU-s, plus the validation, seen and prose sets


def price(s: Setting, runs: dict[str, dict]) -> float:
    """Expected CPU-seconds of a run: the cost per update of the same arm, γ and rank (:func:`cost_per_update`;
    else the arm's recorded mean, else the prior) times its updates, plus the recorded mean evaluation cost (else
    the prior)."""
    own = cost_per_update(s, runs)
    rates = ([own[0]] if own else [r["figures"]["cpu_s_per_update"] for r in runs.values() if r["arm"] == s.arm]
             or [PRIOR_CPU_PER_UPDATE.get(ARMS[s.arm][0], PRIOR_CPU_PER_UPDATE["layerwise"])])
    evals = [r["figures"]["eval_cpu_s"] for r in runs.values()] or [PRIOR_EVAL_CPU_S]
    return statistics.fmean(rates) * s.updates + statistics.fmean(evals)


def plan_lines(runs: dict[str, dict]) -> list[str]:
    """The queue as a table, each item done / to run / waiting, priced by :func:`price`; a time-matched item whose
    updates are not known yet is priced at the reference's cost and counted apart (it runs only for a setting
    that proves more than 1.1x slower than the reference)."""
    q = queue(runs)
    lines, left, conditional = [], 0.0, 0.0
    for item in q:
        phase, s, seed, lr = item
        done = runnable(item) and run_key(s, seed, lr) in runs
        cost = price(s if s.updates else REFERENCE, runs)
        if s.updates == 0:
            conditional += cost
        elif not done:
            left += cost
        what = "done" if done else "to run" if runnable(item) else "waits"
        lines.append(f"| {phase} | {s.name} | {seed} | {'best' if lr is None else f'{lr:g}'} | {what} | "
                     f"{'' if done else f'{cost / 3600:.2f}'} |")
    spent = sum(r["figures"]["train_cpu_s"] + r["figures"]["eval_cpu_s"] for r in runs.values())
    head = [f"{len(q)} items, {sum(1 for t in q if runnable(t) and run_key(*t[1:]) in runs)} done; spent "
            f"{spent / 3600:.1f} CPU-hours; left about {left / 3600:.1f}, plus up to {conditional / 3600:.1f} for "
            f"time-matched runs not known yet (priced from the recorded runs, else from the 200-update "
            f"experiment's cost per update).", "",
            "| phase | setting | seed | lr | status | CPU-hours |", "|---|---|---|---|---|---|"]
    return head + lines
