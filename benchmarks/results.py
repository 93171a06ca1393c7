"""The measured comparison behind docs/RESULTS.md: six methods, a learning-rate sweep, three seeds, a γ/τ sweep.

Every run is one method of a ``grass-ft compare`` line (printed, and kept in each group's ``command.txt``), so
any cell of the tables can be rerun on its own. The protocol (fixed here, the same for every method):

- model ``smollm2-135m`` (SmolLM2-135M-Instruct; its weights went through 4-bit quantisation), data ``gsm-mix``
  (2,000 generated problems per seed: a quarter GSM-style chain of thought, three quarters single-digit
  arithmetic), 20 optimizer steps of batch 4 (probe steps included), max_seq_len 256, constant lr;
- one held-out file for every run (``eval.jsonl``, written here from fixed seeds: 16 ``gsm_symbolic`` + 32
  single-digit ``basic_arithmetic`` problems): eval loss on the GSM-style chain of thought (scored by loss only)
  is the primary quality figure; accuracy is greedy generation (16 new tokens) on the arithmetic;
- sampling methods re-draw every 5 steps (``sample_interval``), GRASS refreshes every 10 (``update_interval``).

Stages (each skips groups that already finished with the same command, so an interrupted run resumes):
  lr      every method at three learning rates, seed 42
  seeds   every method at its best learning rate (lowest GSM eval loss at seed 42), seeds 43 and 44
  sweep   GRASS variants (γ, τ, α, probe_steps, state reset) at its best learning rate, seed 42
  long    GRASS and GRASS* at 60 steps (three times the budget), seed 42
  report  tables and charts from whatever has finished -> --docs (results.md, runs.json, *.png)

Usage (``make results`` runs all four):

    python benchmarks/results.py --stage all --out runs/results --docs docs/results
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the shared harness, however this runs
from harness import mean_sd, pyplot, save  # noqa: E402

METHODS = ("fft", "lisa", "grass", "grass-static", "lora", "dora")
FULL_LRS = (3e-5, 1e-4, 3e-4)  # full-parameter methods (fft, lisa, grass, grass-static)
ADAPTER_LRS = (1e-4, 3e-4, 1e-3)  # lora, dora: adapters usually want a larger step
LR_GRID = {m: (ADAPTER_LRS if m in ("lora", "dora") else FULL_LRS) for m in METHODS}
SEED0, EXTRA_SEEDS = 42, (43, 44)
PROTOCOL = {
    "model": "smollm2-135m", "data": "gsm-mix", "max_steps": 20, "batch_size": 4, "max_seq_len": 256,
    "eval_samples": 48, "eval_loss_only_tasks": "gsm_symbolic", "eval_before": "false", "max_new_tokens": 16,
    "sample_interval": 5, "update_interval": 10,
    # the layout these tables were measured with (the default then; docs/DEFAULTS.md); lisa trains them anyway
    "train_embeddings": "false", "train_head": "false",
    # and the paper's measuring probe (the default then; now probe_mode=train); only grass and grass-static read it
    "probe_mode": "measure",
    # and a constant rate without warm-up (the defaults then; since 2026-12-08 cosine after 5 % warm-up)
    "lr_schedule": "constant", "warmup_ratio": 0,
}
GSM, ARITH = "gsm_symbolic", "basic_arithmetic"
# GRASS variants of the sweep: (name, overrides); each is compared with GRASS at its defaults.
SWEEP = (  # in order of priority: an interrupted sweep has the γ/τ rows first
    ("gamma=2", {"gamma": 2}), ("gamma=8", {"gamma": 8}),
    ("tau=0.5", {"tau": 0.5}), ("tau=2", {"tau": 2.0}),
    ("train_embeddings+head", {"train_embeddings": "true", "train_head": "true"}),
    ("probe_steps=2", {"probe_steps": 2}),
    ("reset_state_on_switch", {"reset_state_on_switch": "true"}),
    ("alpha=1", {"alpha": 1.0}),
    ("sample_interval=10,update_interval=20", {"sample_interval": 10, "update_interval": 20}),
)


def write_eval_file(path: Path) -> Path:
    """The fixed held-out set: the same problems for every method and seed (seeds disjoint from training's)."""
    from grass_ft.data import generate_examples

    if not path.exists():
        rows = generate_examples("gsm_symbolic", 16, 2_026_112_8) + generate_examples("easy_arith", 32, 2_026_112_9)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


# ------------------------------------------------------------------------------------------------ running


def compare_argv(out_dir: Path, methods: list[str], keys: dict[str, Any]) -> list[str]:
    kv = {"methods": ",".join(methods), **keys, "output_dir": str(out_dir)}
    return ["grass-ft", "compare", "--quiet", *[f"{k}={v}" for k, v in kv.items()]]


def run_group(out_dir: Path, methods: list[str], keys: dict[str, Any], keep_weights: bool) -> list[dict]:
    """One ``grass-ft compare`` (skipped when it already finished with the same command); its rows."""
    argv = compare_argv(out_dir, methods, keys)
    command = " ".join(argv)
    done = out_dir / "results.json"
    if done.exists() and (out_dir / "command.txt").exists() and (out_dir / "command.txt").read_text() == command:
        rows = json.loads(done.read_text())
        if len(rows) == len(methods) and all(r["status"] == "ok" for r in rows):
            print(f"[skip] {command}", flush=True)
            return rows
    print(f"[run ] {command}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "command.txt").unlink(missing_ok=True)  # written only once the group finished
    t0 = time.perf_counter()
    # a group reruns when its command changed or it failed: it replaces what the earlier attempt left
    subprocess.run([sys.executable, "-m", "grass_ft.cli", *argv[1:], "overwrite_output_dir=true"], check=False)
    rows = json.loads(done.read_text()) if done.exists() else []
    if not keep_weights:  # 0.5 GB per run; the tables need only the summaries and logs
        for m in methods:
            shutil.rmtree(out_dir / m / "final", ignore_errors=True)
    (out_dir / "command.txt").write_text(command)
    print(f"[done] {out_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def eval_keys(eval_file: Path) -> dict[str, Any]:
    return {**PROTOCOL, "eval_data": str(eval_file)}


def stage_lr(out: Path, eval_file: Path, keep: bool) -> None:
    for i in range(3):
        keys = eval_keys(eval_file) | {"seed": SEED0} | {f"{m}.lr": LR_GRID[m][i] for m in METHODS}
        if i == 1:
            keys["fft.eval_before"] = "true"  # the model as loaded, once: the held-out set is the same everywhere
        run_group(out / f"lr{i}-s{SEED0}", list(METHODS), keys, keep)
    extend_lr_grid(out, eval_file, keep)


EXTRA = f"lr-extra-s{SEED0}"


def next_lr(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` on the 1-3-10 ladder (3e-5 -> 1e-5 down, 3e-4 -> 1e-3 up)."""
    exp = math.floor(math.log10(lr) + 1e-9)
    ladder = [m * 10.0 ** e for e in (exp - 1, exp, exp + 1) for m in (1, 3)]
    i = min(range(len(ladder)), key=lambda k: abs(math.log(ladder[k] / lr)))
    return float(f"{ladder[i + 1 if up else i - 1]:.0e}")


def sweep_rows(out: Path) -> list[dict]:
    """Every seed-42 run of the learning-rate sweep (the grid and its extension), each with its ``lr``."""
    rows = []
    for i in range(3):
        rows += [r | {"lr": LR_GRID[r["method"]][i]} for r in load_group(out / f"lr{i}-s{SEED0}")]
    extra = out / EXTRA
    lrs = json.loads((extra / "lrs.json").read_text()) if (extra / "lrs.json").exists() else {}
    rows += [r | {"lr": lrs[r["method"]]} for r in load_group(extra)]
    return rows


def best_lrs(out: Path) -> dict[str, float]:
    """Per method, the learning rate with the lowest GSM eval loss at seed 42 (ties: the smaller rate)."""
    best: dict[str, tuple[float, float]] = {}
    for r in sorted(sweep_rows(out), key=lambda r: r["lr"]):
        loss = gsm_loss(r)
        if loss is not None and (r["method"] not in best or loss < best[r["method"]][0]):
            best[r["method"]] = (loss, r["lr"])
    return {m: lr for m, (_, lr) in best.items()}


def extend_lr_grid(out: Path, eval_file: Path, keep: bool) -> None:
    """A method whose best rate is an end of its grid gets one more rate beyond that end (once)."""
    if (out / EXTRA / "command.txt").exists():
        return
    lrs = best_lrs(out)
    extra = {m: next_lr(lr, up=lr == LR_GRID[m][-1]) for m, lr in lrs.items()
             if lr in (LR_GRID[m][0], LR_GRID[m][-1])}
    if not extra:
        return
    (out / EXTRA).mkdir(parents=True, exist_ok=True)
    (out / EXTRA / "lrs.json").write_text(json.dumps(extra))
    keys = eval_keys(eval_file) | {"seed": SEED0} | {f"{m}.lr": lr for m, lr in extra.items()}
    run_group(out / EXTRA, list(extra), keys, keep)


def stage_seeds(out: Path, eval_file: Path, keep: bool) -> None:
    extend_lr_grid(out, eval_file, keep)
    lrs = best_lrs(out)
    missing = [m for m in METHODS if m not in lrs]
    if missing:
        sys.exit(f"stage seeds needs the lr stage first (no finished run for {', '.join(missing)})")
    for seed in EXTRA_SEEDS:
        keys = eval_keys(eval_file) | {"seed": seed} | {f"{m}.lr": lrs[m] for m in METHODS}
        run_group(out / f"best-s{seed}", list(METHODS), keys, keep)


def stage_sweep(out: Path, eval_file: Path, keep: bool) -> None:
    lr = best_lrs(out).get("grass")
    if lr is None:
        sys.exit("stage sweep needs the lr stage first (no finished grass run)")
    for name, over in SWEEP:
        run_group(out / f"sweep-{name}", ["grass"], eval_keys(eval_file) | {"seed": SEED0, "lr": lr} | over, keep)


LONG_METHODS, LONG_STEPS = ("grass", "grass-static"), 60


def stage_long(out: Path, eval_file: Path, keep: bool) -> None:
    """GRASS and GRASS* over 3x the budget (more refreshes, so adaptive and static draws can part)."""
    lrs = best_lrs(out)
    keys = eval_keys(eval_file) | {"seed": SEED0, "max_steps": LONG_STEPS} | {f"{m}.lr": lrs[m] for m in LONG_METHODS}
    run_group(out / f"long{LONG_STEPS}-s{SEED0}", list(LONG_METHODS), keys, keep)


# ------------------------------------------------------------------------------------------------ report


def load_group(group: Path) -> list[dict]:
    """The group's rows, each with its run's full summary.json merged in (per-task figures live only there)."""
    if not (group / "results.json").exists():
        return []
    rows = []
    for r in json.loads((group / "results.json").read_text()):
        s = Path(r["output_dir"]) / "summary.json"
        if r["status"] == "ok" and s.exists():
            rows.append({**r, **json.loads(s.read_text()), "group": group.name})
    return rows


def gsm_loss(r: dict) -> float | None:
    return (r.get("eval_loss_per_task") or {}).get(GSM)


def arith_acc(r: dict) -> float | None:
    a = (r.get("accuracy_per_task") or {}).get(ARITH)
    return None if a is None else 100 * a


def cell(xs: list[float], digits: int) -> str:
    if not xs:
        return "–"
    m, sd = mean_sd(xs)
    spread = "" if math.isnan(sd) else f" ± {sd:.{digits}f}"
    return f"{m:.{digits}f}{spread} [{min(xs):.{digits}f}, {max(xs):.{digits}f}]"


def collect(out: Path) -> dict[str, Any]:
    lrs = best_lrs(out)
    sweep_lr = sweep_rows(out)
    main: dict[str, list[dict]] = {m: [] for m in METHODS}
    for m in METHODS:
        main[m] += [r for r in sweep_lr if r["method"] == m and r["lr"] == lrs.get(m)]
        for seed in EXTRA_SEEDS:
            main[m] += [r for r in load_group(out / f"best-s{seed}") if r["method"] == m]
    sweep = {name: load_group(out / f"sweep-{name}") for name, _ in SWEEP}
    before = next((r for r in sweep_lr if r.get("eval_loss_per_task_before")), None)
    return {"best_lr": lrs, "lr": sweep_lr, "main": main, "sweep": sweep, "before": before,
            "long": load_group(out / f"long{LONG_STEPS}-s{SEED0}")}


def active_sets(r: dict) -> list[list[int]]:
    """The active blocks of every non-probe step of a run (from its metrics.jsonl)."""
    rows = [json.loads(line) for line in (Path(r["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [d["active"] for d in rows if not d["probe"]]


def state_curve(r: dict) -> tuple[list[int], list[float]]:
    steps, mib = [], []
    for line in (Path(r["output_dir"]) / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        steps.append(d["step"])
        mib.append(d["optimizer_state_device_bytes"] / 2**20)
    return steps, mib


def plots(c: dict[str, Any], docs: Path) -> list[str]:
    from grass_ft.report import METHOD_COLORS

    plt = pyplot()

    names = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ms = [m for m in METHODS if c["main"][m]]
    for ax, fn, label in ((axes[0], gsm_loss, "GSM-style eval loss, nats/token (lower is better)"),
                          (axes[1], arith_acc, "single-digit arithmetic accuracy, % (higher is better)")):
        vals = [[v for v in map(fn, c["main"][m]) if v is not None] for m in ms]
        means = [statistics.fmean(v) if v else float("nan") for v in vals]
        sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(ms, means, yerr=sds, capsize=4, color=[METHOD_COLORS.get(m, "grey") for m in ms])
        for x, v in enumerate(vals):
            ax.scatter([x] * len(v), v, color="black", s=10, zorder=3)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30)
        if fn is gsm_loss and c["before"]:
            ax.axhline(c["before"]["eval_loss_per_task_before"][GSM], ls="--", color="grey", lw=1)
            lo = min(min(v) for v in vals if v)
            ax.set_ylim(lo - 0.05, c["before"]["eval_loss_per_task_before"][GSM] + 0.02)
        if fn is arith_acc and c["before"]:
            ax.axhline(100 * c["before"]["accuracy_per_task_before"][ARITH], ls="--", color="grey", lw=1)
    fig.suptitle("Best learning rate per method, 3 seeds (bar: mean, whisker: sd, dots: seeds; dashed: before)",
                 fontsize=9)
    names.append(save(fig, docs / "main.png"))

    def line_chart(name: str, series: dict[str, tuple], xlabel: str, ylabel: str, title: str, xlog: bool) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for m, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if xlog else ".", label=m, color=METHOD_COLORS.get(m))
        if xlog:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        names.append(save(fig, docs / name))

    lr_series = {m: tuple(zip(*sorted((r["lr"], gsm_loss(r)) for r in c["lr"] if r["method"] == m)))
                 for m in METHODS}
    line_chart("lr_sweep.png", {m: xy for m, xy in lr_series.items() if xy}, "learning rate",
               "GSM-style eval loss, nats/token", "Learning-rate sweep, seed 42", xlog=True)
    seed0 = {m: [r for r in c["main"][m] if r["seed"] == SEED0] for m in ("fft", "lisa", "grass")}
    line_chart("optimizer_state.png", {m: state_curve(rs[0]) for m, rs in seed0.items() if rs}, "step",
               "optimizer state on the device, MiB", "Optimizer state kept on the device between steps (seed 42)",
               xlog=False)
    return names


def targets_md(c: dict[str, Any]) -> list[str]:
    """The issue's targets, checked on the seed means of the main table."""
    main = c["main"]
    if not all(main[m] for m in ("fft", "lisa", "grass", "grass-static", "lora")):
        return []

    def mean(m: str, fn) -> float:
        return statistics.fmean(fn(r) for r in main[m])

    g_loss, g_acc = mean("grass", gsm_loss), mean("grass", arith_acc)
    rows = [(f"GSM eval loss below {name}'s", f"{g_loss:.4f} vs {mean(m, gsm_loss):.4f}", g_loss < mean(m, gsm_loss))
            for m, name in (("lisa", "LISA"), ("lora", "LoRA"), ("grass-static", "GRASS*"))]
    rel = g_loss / mean("fft", gsm_loss) - 1
    rows.append(("GSM eval loss within 2 % of FFT's", f"{rel:+.2%} ({g_loss:.4f} vs {mean('fft', gsm_loss):.4f})",
                 rel <= 0.02))
    for m, name, margin in (("lisa", "LISA", 2.0), ("lora", "LoRA", 3.0), ("fft", "FFT", -0.5)):
        d = g_acc - mean(m, arith_acc)
        rows.append((f"accuracy ≥ {name} {margin:+.1f} points", f"{d:+.1f} points ({g_acc:.1f} vs "
                     f"{mean(m, arith_acc):.1f} %)", d >= margin))
    d = g_acc - mean("grass-static", arith_acc)
    rows.append(("accuracy above GRASS*", f"{d:+.1f} points", d > 0))
    ratio = mean("grass", lambda r: r["s_per_step"]) / mean("fft", lambda r: r["s_per_step"])
    rows.append(("step time ≤ 0.50× FFT (these runs' mean s/step)", f"{ratio:.2f}×", ratio <= 0.5))
    frac = max(r["mgn_bookkeeping_fraction"] for r in main["grass"])
    rows.append(("MGN bookkeeping ≤ 3 % of step time (worst seed)", f"{100 * frac:.2f} %", frac <= 0.03))
    g_curve = [y for r in main["grass"] for y in state_curve(r)[1]]
    l_curve = state_curve(main["lisa"][0])[1]
    rows.append(("GRASS device state flat while LISA's grows (seed 42)",
                 f"GRASS {min(g_curve):.0f}–{max(g_curve):.0f} MiB; LISA {l_curve[0]:.0f} → {l_curve[-1]:.0f} MiB",
                 max(g_curve) == min(g_curve) and l_curve[-1] > l_curve[0]))
    paired = ["", "## Paired by seed: GRASS minus each method (same seed = same training problems and order)", "",
              "| method | GSM eval loss difference, mean ± sd [per seed] | accuracy difference, points, mean ± sd "
              "[per seed] |", "|---|---|---|"]
    by_seed = {m: {r["seed"]: r for r in main[m]} for m in METHODS}
    for m in METHODS:
        if m == "grass":
            continue
        seeds = sorted(set(by_seed["grass"]) & set(by_seed[m]))
        dl = [gsm_loss(by_seed["grass"][k]) - gsm_loss(by_seed[m][k]) for k in seeds]
        da = [arith_acc(by_seed["grass"][k]) - arith_acc(by_seed[m][k]) for k in seeds]
        if seeds:
            paired.append(f"| `{m}` | {mean_sd(dl)[0]:+.4f} ± {mean_sd(dl)[1]:.4f} "
                          f"[{', '.join(f'{x:+.4f}' for x in dl)}] | {mean_sd(da)[0]:+.1f} ± {mean_sd(da)[1]:.1f} "
                          f"[{', '.join(f'{x:+.1f}' for x in da)}] |")
    return (["", "## Targets (seed means of the main table)", "", "| target | measured | met |", "|---|---|---|"]
            + [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in rows] + paired)


def results_md(c: dict[str, Any], figures: list[str]) -> str:
    L = ["# Measured results (generated by benchmarks/results.py; do not edit by hand)", ""]
    b = c["before"]
    if b:
        L += [f"Model as loaded: GSM-style eval loss {b['eval_loss_per_task_before'][GSM]:.4f} nats/token, "
              f"arithmetic accuracy {100 * b['accuracy_per_task_before'][ARITH]:.1f} % "
              f"(overall eval loss {b['eval_loss_before']:.4f}).", ""]
    L += ["## Main table: best learning rate per method, seeds 42, 43, 44", "",
          "mean ± sample sd [min, max] over the seeds; n is the number of finished seeds.", "",
          "| method | lr | n | GSM-style eval loss | arithmetic accuracy, % | all-held-out eval loss | s/step | "
          "tokens/s | peak RSS, GiB | optimizer state device + host, MiB | params updated per step |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        rs = c["main"][m]
        if not rs:
            continue
        st = rs[0]
        L.append(f"| `{m}` | {fmt_lr(c['best_lr'][m])} | {len(rs)} | {cell([gsm_loss(r) for r in rs], 4)} | "
                 f"{cell([arith_acc(r) for r in rs], 1)} | {cell([r['eval_loss'] for r in rs], 4)} | "
                 f"{statistics.fmean(r['s_per_step'] for r in rs):.2f} | "
                 f"{statistics.fmean(r['tokens_per_s'] for r in rs):.0f} | "
                 f"{max(r['peak_memory_bytes'] for r in rs) / 2**30:.2f} | "
                 f"{st['optimizer_state_device_bytes'] / 2**20:.0f} + {st['optimizer_state_host_bytes'] / 2**20:.0f} | "
                 f"{st['trainable_params']:,} |")
    L += targets_md(c)
    L += ["", "## Every seed", "", "| method | seed | GSM-style eval loss | arithmetic accuracy, % | group |",
          "|---|---|---|---|---|"]
    for m in METHODS:
        for r in sorted(c["main"][m], key=lambda r: r["seed"]):
            L.append(f"| `{m}` | {r['seed']} | {gsm_loss(r):.4f} | {arith_acc(r):.1f} | `{r['group']}` |")
    L += ["", "## Learning-rate sweep (seed 42)", "",
          "| method | " + " | ".join(f"lr #{i + 1}" for i in range(4)) + " | chosen |", "|---|---|---|---|---|---|"]
    for m in METHODS:
        rs = sorted((r for r in c["lr"] if r["method"] == m), key=lambda r: r["lr"])
        cells = [f"{fmt_lr(r['lr'])}: {gsm_loss(r):.4f} / {arith_acc(r):.1f} %" for r in rs]
        cells += ["–"] * (4 - len(cells))
        L.append(f"| `{m}` | " + " | ".join(cells) + f" | {fmt_lr(c['best_lr'].get(m, float('nan')))} |")
    L += ["", "Cells: GSM-style eval loss / arithmetic accuracy. The grid is three rates per method; a method whose "
          "best rate was an end of the grid got one more rate beyond it (group `lr-extra-s42`).", ""]
    base = next((r for r in c["main"]["grass"] if r["seed"] == SEED0), None)
    if base:
        L += ["## GRASS sweep (seed 42, GRASS's best lr; one knob changed from the defaults)", "",
              "| variant | GSM-style eval loss | arithmetic accuracy, % | s/step | MGN bookkeeping, % of step |",
              "|---|---|---|---|---|",
              f"| defaults (γ=4, τ=1, α=0.5, probe 4) | {gsm_loss(base):.4f} | {arith_acc(base):.1f} | "
              f"{base['s_per_step']:.2f} | {100 * base['mgn_bookkeeping_fraction']:.2f} |"]
        for name, rs in c["sweep"].items():
            for r in rs:
                L.append(f"| {name} | {gsm_loss(r):.4f} | {arith_acc(r):.1f} | {r['s_per_step']:.2f} | "
                         f"{100 * r['mgn_bookkeeping_fraction']:.2f} |")
        L.append("")
    long_rows = c.get("long") or []
    if long_rows:
        L += [f"## Longer budget ({LONG_STEPS} steps, seed 42, best lr of the 20-step sweep)", "",
              "| method | GSM-style eval loss | arithmetic accuracy, % | distinct blocks trained | distinct active sets |",
              "|---|---|---|---|---|"]
        for r in long_rows:
            active = active_sets(r)
            L.append(f"| `{r['method']}` | {gsm_loss(r):.4f} | {arith_acc(r):.1f} | "
                     f"{len(set().union(*map(set, active))) if active else 0} | {len({tuple(a) for a in active})} |")
        L.append("")
    L += ["## Commands", "", "Each group is one `grass-ft compare` line (the eval file is written by the script):", ""]
    out = Path(c.get("out", "runs/results"))
    for cmd in sorted(out.glob("*/command.txt")):
        L += [f"- `{cmd.parent.name}`: `{cmd.read_text()}`"]
    L += [""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(L) + "\n"


def report(out: Path, docs: Path) -> None:
    c = collect(out)
    c["out"] = str(out)
    docs.mkdir(parents=True, exist_ok=True)
    figures = plots(c, docs)
    (docs / "results.md").write_text(results_md(c, figures))
    keep = ("method", "group", "seed", "eval_loss", "eval_loss_per_task", "accuracy_per_task", "final_train_loss",
            "s_per_step", "tokens_per_s", "peak_memory_bytes", "optimizer_state_device_bytes",
            "optimizer_state_host_bytes", "trainable_params", "mgn_bookkeeping_fraction", "train_wall_s", "wall_s")
    import yaml

    runs = [{k: r.get(k) for k in keep}
            | {"lr": yaml.safe_load((Path(r["output_dir"]) / "config.yaml").read_text()).get("lr")}
            for group in sorted(out.glob("*/")) for r in load_group(group)]
    (docs / "runs.json").write_text(json.dumps({"best_lr": c["best_lr"], "runs": runs}, indent=1))
    print(f"wrote {docs / 'results.md'}, runs.json and {len(figures)} charts")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("lr", "seeds", "sweep", "long", "report", "all"), default="all")
    ap.add_argument("--out", default="runs/results", help="run directories (one per compare group)")
    ap.add_argument("--docs", default="docs/results", help="where results.md, runs.json and the charts go")
    ap.add_argument("--keep-weights", action="store_true", help="keep each run's final/ (0.5 GB each)")
    args = ap.parse_args()
    out, docs = Path(args.out), Path(args.docs)
    eval_file = write_eval_file(out / "eval.jsonl")
    stages = ("lr", "seeds", "sweep", "long", "report") if args.stage == "all" else (args.stage,)
    for stage in stages:
        if stage == "report":
            report(out, docs)
        else:
            {"lr": stage_lr, "seeds": stage_seeds, "sweep": stage_sweep,
             "long": stage_long}[stage](out, eval_file, args.keep_weights)


if __name__ == "__main__":
    main()
