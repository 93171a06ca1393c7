"""The frontier experiment's report (docs/results/frontier.md and its plots), rebuilt from the ledger alone.

The views of docs/RESULTS.md's frontier protocol — equal updates, equal training CPU-seconds (time-matched runs
for the settings slower than the reference), predicted device memory on LLaMA-2-7B from the planner — and the
verdicts of its rules: method=auto's order of preference (:func:`preference`), the importance rule and the
quantisation-repair test. Paired 95 % t-intervals over seeds as benchmarks/quality.py computes them.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import frontier_data as fdata  # noqa: E402
from frontier_protocol import (  # noqa: E402
    ALL_BLOCKS, ARMS, BEYOND, COLORS, COST_UPDATES, COST_WARMUP, FRONTIER_LAYERWISE, GRID, LABELS, MAIN, NOISY,
    QUIET_LOAD, REFERENCE, SEEDS, UPDATES, Setting, best_lr, cost_ratio, equal_time_setting, frontier_settings,
    plan_lines, protocol_id, queue, quiet, run_key, runnable, runs_of, seed1_grid, setting_of, train_cpu)
from harness import fmt_ci, paired_ci, read_jsonl, t_quantile  # noqa: E402


_PLANNER: dict = {}  # LLaMA-2-7B's shape and profile, made once per report


def predicted_device_gib(s: Setting) -> float | None:
    """Predicted peak device memory of the setting on LLaMA-2-7B (bf16, batch 4, sequence 1024, gradient
    checkpointing) from the memory planner (grass_ft.planner, docs/PLAN.md), at its worst draw; a layer-wise
    setting's γ read on the 7B's 32 blocks as method=auto reads it (``grass_ft.planner.table.frontier_gamma``)."""
    import dataclasses

    from memory_estimate import build_config

    from grass_ft.config import TrainConfig
    from grass_ft.methods import resolved_offload
    from grass_ft.planner import Setting as Row, model_shape, predict
    from grass_ft.planner.table import frontier_gamma, profile_for

    if "config" not in _PLANNER:
        _PLANNER["config"] = build_config("llama2-7b")
    config = _PLANNER["config"]
    method, extra = ARMS[s.arm]
    gamma = frontier_gamma(s.gamma, config.num_hidden_layers) if s.gamma else 1
    cfg = TrainConfig(method=method, gamma=gamma, lora_r=s.lora_r or 32, batch_size=4, max_seq_len=1024,
                      dtype="bfloat16", gradient_checkpointing=True,
                      **{k: v for k, v in extra.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    if "shape" not in _PLANNER:
        _PLANNER.update(shape=model_shape(config), profile=profile_for(config, cfg, True, adapters=True))
    keys = {f.name for f in dataclasses.fields(Row)}
    row = Row(**{k: getattr(cfg, k) for k in keys if hasattr(cfg, k) and k not in ("offload", "world_size")},
              offload=resolved_offload(cfg))
    return predict(_PLANNER["shape"], _PLANNER["profile"], row).device / 2**30


def by_setting(runs: dict[str, dict]) -> dict[Setting, dict[int, dict]]:
    """Each setting's runs by seed, at the setting's rate (the grid's other rates are kept out)."""
    out: dict[Setting, dict[int, dict]] = {}
    for r in runs.values():
        s = setting_of(r)
        if r["lr"] == best_lr(s.arm, runs):
            out.setdefault(s, {})[r["seed"]] = r
    return out


def at_equal_time(runs: dict[str, dict]) -> dict[Setting, dict[int, dict]]:
    """Each 500-update setting's equal-time runs by seed (its time-matched twin's, or its own)."""
    table = by_setting(runs)
    out = {}
    for s in table:
        if s.updates == UPDATES and (eq := equal_time_setting(s, runs)) is not None and table.get(eq):
            out[s] = table[eq]
    return out


def figure(rs: dict[int, dict], key: str) -> list[float]:
    return [rs[seed]["figures"][key] for seed in sorted(rs)]


def ms(xs: list[float], d: int, scale: float = 1.0) -> str:
    xs = [scale * x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "–"
    return f"{statistics.fmean(xs):.{d}f}" + (f" ± {statistics.stdev(xs):.{d}f}" if len(xs) > 1 else "")


def mean_ci(xs: list[float], d: int, scale: float = 1.0) -> str:
    """The mean over seeds with its 95 % t-interval (n − 1 df); the value alone for one seed."""
    xs = [scale * x for x in xs if x is not None and not math.isnan(x)]
    if len(xs) < 2:
        return f"{xs[0]:.{d}f}" if xs else "–"
    m, half = statistics.fmean(xs), t_quantile(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return f"{m:.{d}f} [{m - half:.{d}f}, {m + half:.{d}f}]"


def paired(a: dict[int, dict], b: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    seeds = sorted(set(a) & set(b))
    return seeds, [a[s]["figures"][key] - b[s]["figures"][key] for s in seeds]


def pooled_sd(groups: list[list[float]]) -> tuple[float, int] | None:
    """Pooled seed-to-seed sd of several settings' figures, and its degrees of freedom."""
    groups = [g for g in groups if len(g) > 1]
    df = sum(len(g) - 1 for g in groups)
    if not df:
        return None
    return math.sqrt(sum(statistics.variance(g) * (len(g) - 1) for g in groups) / df), df


def difference(a: dict[int, dict], b: dict[int, dict], key: str,
               floor: tuple[float, int] | None) -> tuple[float, float, float] | None:
    """``a − b`` with a 95 % interval: paired over common seeds where there are two or more; for one seed, the
    difference ± t(df) · √2 · the pooled seed sd of the 3-seed settings (unpaired, so wider than paired)."""
    seeds, d = paired(a, b, key)
    if len(seeds) >= 2:
        return paired_ci(d)
    if not seeds or floor is None:
        return None
    half = t_quantile(0.975, floor[1]) * math.sqrt(2) * floor[0]
    return d[0], d[0] - half, d[0] + half


def main_arms(tab: dict[Setting, dict[int, dict]]) -> dict[Setting, dict[int, dict]]:
    """The main arms (γ = 4, r = 32) that have their three seeds in ``tab``: the pool of rule 1's seed sd."""
    return {Setting(a): tab[Setting(a)] for a in MAIN if len(tab.get(Setting(a), {})) == len(SEEDS)}


def pooled(tab: dict[Setting, dict[int, dict]], key: str) -> tuple[float, int] | None:
    """Rule 1's pooled seed sd of one figure over the 3-seed main arms of ``tab`` (a one-seed difference's floor)."""
    return pooled_sd([figure(rs, key) for rs in main_arms(tab).values()])


def ranked_for_auto(eq: dict[Setting, dict[int, dict]]) -> dict[Setting, dict[int, dict]]:
    """The settings rule 1 ranks: the main arms and the frontier points (not GRASS* nor the repair test's noised
    starts, which decide no default)."""
    return {s: rs for s, rs in eq.items() if s.arm in MAIN}


def planner_entry(s: Setting) -> str:
    """A setting as ``grass_ft.planner.table.FRONTIER_ORDER`` names it: "fft", "<arm> gamma=<γ or all>", "lora r=<r>"."""
    if s.lora_r is not None:
        return f"lora r={s.lora_r}"
    if s.gamma is not None:
        return f"{s.arm} gamma={'all' if s.gamma == ALL_BLOCKS else s.gamma}"
    return s.arm


def auto_order(records: list[dict]) -> tuple[str, ...]:
    """Rule 1's order, flattened, as the planner reads it (:func:`planner_entry`)."""
    runs = runs_of(records)
    eq = at_equal_time(runs)
    memory = {s: predicted_device_gib(s) for s in eq}
    return planner_order(preference(ranked_for_auto(eq), pooled(eq, "test_loss"), memory, runs))


def planner_order(order: list[list[Setting]]) -> tuple[str, ...]:
    return tuple(planner_entry(s) for g in order for s in g)


def order_decided(eq: dict[Setting, dict[int, dict]]) -> bool:
    """Rule 1 applies: every main arm has its three seeds at equal time (time-matched runs included)."""
    return all(len(eq.get(Setting(a), {})) == len(SEEDS) for a in MAIN)


def preference(eq: dict[Setting, dict[int, dict]], floor, memory: dict[Setting, float | None],
               runs: dict[str, dict]) -> list[list[Setting]]:
    """method=auto's order (docs/RESULTS.md, rule 1): settings by mean equal-time test loss, grouped where a
    setting's difference to its group's first is not resolved (the interval includes 0); within a group, lower
    predicted device memory first (then lower CPU-s per update), and GRASS never before grass-uniform at its γ
    (rule 2: it does not fit in less memory). A difference with no interval (no seed sd yet) is not resolved."""
    ranked = sorted(eq, key=lambda s: statistics.fmean(figure(eq[s], "test_loss")))
    groups: list[list[Setting]] = []
    for s in ranked:
        if not groups:
            groups.append([s])
            continue
        ci = difference(eq[s], eq[groups[-1][0]], "test_loss", floor)
        if ci is None or ci[1] <= 0 <= ci[2]:
            groups[-1].append(s)
        else:
            groups.append([s])

    def lean(s: Setting) -> tuple[float, float]:
        cost = cost_ratio(s, runs)
        return (memory.get(s) if memory.get(s) is not None else math.inf, cost[0] if cost else math.inf)

    out = []
    for g in groups:
        g = sorted(g, key=lean)
        for s in [s for s in g if s.arm == "grass"]:
            twin = Setting("grass-uniform", gamma=s.gamma)
            if twin in g and g.index(s) < g.index(twin):
                g.remove(s)
                g.insert(g.index(twin) + 1, s)
        out.append(g)
    return out


def importance_verdict(grass: dict[int, dict], uniform: dict[int, dict]) -> str:
    """Rule 2: mgn stays only if GRASS − grass-uniform at equal time, paired over seeds 1-3, lies below 0."""
    if len(paired(grass, uniform, "test_loss")[0]) < len(SEEDS):
        return "not yet (seeds 1-3)"
    ci = difference(grass, uniform, "test_loss", None)
    return ("**mgn stays** (the interval lies below 0)" if ci[2] < 0 else
            "**the importance signal did not pay at this scale** (the interval does not lie below 0)")


def report_md(records: list[dict]) -> str:
    runs = runs_of(records)
    table, eq = by_setting(runs), at_equal_time(runs)
    bases = {r["noise"]: r["figures"] for r in records if r.get("record") == "base"
             and r.get("protocol_id") == protocol_id()}
    memory = {s: predicted_device_gib(s) for s in table if s.updates == UPDATES}
    main = main_arms(eq)
    floor = pooled(eq, "test_loss")
    ref = eq.get(REFERENCE)
    t_ref = train_cpu(REFERENCE, runs)
    q = queue(runs)
    n_done = sum(1 for t in q if runnable(t) and run_key(*t[1:]) in runs)
    L = ["# The frontier experiment (generated from the ledger by `make frontier`; do not edit)", "",
         f"Ledger `docs/results/frontier_ledger.jsonl`, protocol `{protocol_id()}`: **{len(runs)} runs recorded**, "
         f"{n_done} of the {len(q)} queued items done. Model SmolLM2-135M-Instruct (its weights went through 4-bit "
         f"Q4_1 quantisation), data reasoning-gym (GSM-style problems split by template; accuracy task "
         f"`{fdata.ACC_TASK_NAME}`); 500 updates of batch 4, warm-up then cosine; CPU only, one thread per run. "
         "Rules: docs/RESULTS.md, \"The frontier experiment\". Intervals: 95 % t over seeds paired by seed; "
         "**excl. 0** = the interval excludes 0.", ""]
    if bases.get(False):
        b = bases[False]
        L += [f"Model as loaded: test loss {b['test_loss']:.4f} (number tokens {b['test_number_loss']:.4f}), "
              f"validation {b['validation_loss']:.4f}, seen templates {b['seen_loss']:.4f}, prose "
              f"{b['prose_loss']:.4f} nats/token, accuracy {100 * b['acc_accuracy']:.1f} %"
              + (f"; with Q4_1-sized noise: test {bases[True]['test_loss']:.4f}, prose {bases[True]['prose_loss']:.4f}"
                 if bases.get(True) else "") + ".", ""]
    L += ["## Decisions (rules of docs/RESULTS.md)", ""]
    if t_ref is None or not main:
        L += ["Not yet: the reference (grass-uniform γ=4, seeds 1-3) and the main arms are still running.", ""]
    else:
        L += [f"Equal time = {t_ref:.0f} training CPU-s (grass-uniform γ=4's mean over seeds 1-3, its runs' own "
              "clocks; every other setting's cost is its ratio to it from the side-by-side cost benchmark, "
              "docs/RESULTS.md's third amendment); "
              f"pooled seed sd of the main arms' equal-time test loss "
              + (f"{floor[0]:.4f} ({floor[1]} df)" if floor else "–") + ".", "",
              "**method=auto's order** (rule 1; a group = differences not resolved; within a group the lower "
              "predicted device memory first, then the lower CPU-s per update):", ""]
        points = sum(1 for s in frontier_settings() if s in eq)
        if not order_decided(eq):
            L[-2] = L[-2].replace("**method=auto's order**", "**method=auto's order, provisional** (not every main "
                                  "arm has its three seeds at equal time yet)")
        L[-2] += f" Frontier points at equal time so far: {points} of {len(frontier_settings())}."
        order = preference(ranked_for_auto(eq), floor, memory, runs)
        for i, group in enumerate(order, 1):
            L.append(f"{i}. " + "; ".join(f"{s.name} ({mean_ci(figure(eq[s], 'test_loss'), 4)}, "
                                          f"{len(eq[s])} seed{'s' if len(eq[s]) > 1 else ''})" for s in group))
        L += ["", "As `grass_ft.planner.table.FRONTIER_ORDER` reads it (" + ("copied there, with "
              "`AUTO_ORDER_FROM_FRONTIER = True`, by the change that brings the deciding records):" if
              order_decided(eq) else "not applied while provisional):"), "",
              "`" + repr(planner_order(order)) + "`"]
        L += forgetting_check(order, eq)
        g, u = eq.get(Setting("grass")), ref
        if g and u:
            ci = difference(g, u, "test_loss", None)
            L += ["", f"**importance** (rule 2): GRASS − grass-uniform at equal time {fmt_ci(ci, 4)}: "
                  f"{importance_verdict(g, u)}."]
        L.append("")
    L += ["## Every setting (each at its rate; mean over seeds [95 % t-interval of the mean])", "",
          "| setting | lr | seeds | updates | test loss, unseen templates | number tokens | seen templates | "
          "validation | accuracy, % | forgetting: prose loss − as loaded | train CPU-s (own clocks) | cost × reference | "
          "7B device GiB (predicted) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base_prose = {n: b["prose_loss"] for n, b in bases.items()}
    for s in sorted(table, key=lambda s: (list(ARMS).index(s.arm), s.gamma or 0, s.lora_r or 0, -s.updates)):
        rs = table[s]
        lr = next(iter(rs.values()))["lr"]
        forget = [x - base_prose.get(s.arm in NOISY, math.nan) for x in figure(rs, "prose_loss")]
        mem = memory.get(s)
        L.append(f"| {s.name} | {lr:g} | {','.join(map(str, sorted(rs)))} | {s.updates} | "
                 f"{mean_ci(figure(rs, 'test_loss'), 4)} | {mean_ci(figure(rs, 'test_number_loss'), 4)} | "
                 f"{mean_ci(figure(rs, 'seen_loss'), 4)} | {mean_ci(figure(rs, 'validation_loss'), 4)} | "
                 f"{mean_ci(figure(rs, 'acc_accuracy'), 1, 100)} | {mean_ci(forget, 4)} | "
                 f"{ms(figure(rs, 'train_cpu_s'), 0)} | "
                 f"{cost_cell(s, runs)} | "
                 f"{'pending (grass_ft.planner)' if mem is None and s.updates == UPDATES else '' if mem is None else f'{mem:.1f}'} |")
    L += load_md(runs)
    L += views_md(table, eq, ref)
    L += repair_md(table)
    L += grid_md(runs)
    L += ["", "## Queue and cost", "", *plan_lines(runs), "",
          "![test loss vs updates](frontier_updates.png)", "", "![test loss vs CPU-seconds](frontier_cpu.png)", "",
          "![equal-time test loss vs predicted device memory](frontier_memory.png)", ""]
    return "\n".join(L) + "\n"


def cost_cell(s: Setting, runs: dict[str, dict]) -> str:
    ratio = cost_ratio(s, runs)
    return "–" if ratio is None else f"{ratio[0]:.3f} ({ratio[1]} round{'s' if ratio[1] > 1 else ''})"


def load_md(runs: dict[str, dict]) -> list[str]:
    """What the costs rest on, and which runs shared the machine (their own clocks are in the curves only)."""
    shared = sorted(f"{setting_of(r).name} lr {r['lr']:g} seed {r['seed']} ({r['figures']['others_load']:.2f})"
                    for r in runs.values() if quiet(r) is False)
    unmeasured = sum(1 for r in runs.values() if quiet(r) is None)
    costs = getattr(runs, "costs", {})
    rounds = sorted({rnd for by_round in costs.values() for rnd in by_round})
    return ["", "Cost × reference is each setting's training CPU-s per update over grass-uniform γ=4's, measured "
            "side by side (`python benchmarks/frontier.py costs`: in each round every setting in turn, "
            f"{COST_WARMUP} untimed then {COST_UPDATES} timed updates, a fresh process each, the machine "
            f"otherwise quiet — other processes at most {QUIET_LOAD:.2f} CPUs; the geometric mean over rounds); it "
            "sets the time-matching and the tie-break. Train CPU-s is the runs' own clocks, as are the curves: this "
            "virtual machine's speed drifts by tens of per cent over hours, so runs made at different times are not "
            f"compared by them. Cost rounds recorded: {len(rounds)}. Runs recorded before the load was measured: "
            f"{unmeasured}; runs that shared the machine (others' load): " + ("; ".join(shared) if shared else "none")
            + "."] + cost_table(runs)


def cost_table(runs: dict[str, dict]) -> list[str]:
    """The cost benchmark's measurements: CPU-s per update by round, and each setting's ratio to the reference."""
    costs = getattr(runs, "costs", {})
    rounds = sorted({rnd for by_round in costs.values() for rnd in by_round})
    if not rounds:
        return []
    L = ["", "| setting | " + " | ".join(f"round {r}, CPU-s/update" for r in rounds) + " | cost × reference |",
         "|---|" + "---|" * (len(rounds) + 1)]
    for s in sorted(costs, key=lambda s: (s != REFERENCE, list(ARMS).index(s.arm), s.gamma or 0, s.lora_r or 0)):
        cells = [f"{costs[s][r]:.3f}" if r in costs[s] else "–" for r in rounds]
        L.append(f"| {s.name} | " + " | ".join(cells) + f" | {cost_cell(s, runs)} |")
    return L


def views_md(table, eq, ref) -> list[str]:
    """The equal-updates and equal-time views: every main arm against grass-uniform and against FFT. A one-seed
    difference's interval uses the pooled seed sd of the same figure (:func:`pooled`)."""
    L = ["", "## Equal updates (500 each; reported, not decisive) and equal time (decisive)", "",
         "| row − column | seeds | test loss, equal updates | test loss, equal time | number tokens, equal time | "
         "seen templates, equal updates | accuracy, points, equal updates | forgetting (prose loss), equal updates |",
         "|---|---|---|---|---|---|---|---|"]
    for other in ("grass-uniform", "fft"):
        b_upd, b_eq = table.get(Setting(other)), eq.get(Setting(other))
        upd_sd = {k: pooled(table, k) for k in ("test_loss", "seen_loss", "acc_accuracy", "prose_loss")}
        eq_sd = {k: pooled(eq, k) for k in ("test_loss", "test_number_loss")}
        for arm in MAIN:
            a = Setting(arm)
            if arm == other or not table.get(a) or not b_upd:
                continue
            seeds, _ = paired(table[a], b_upd, "test_loss")
            cells = [fmt_ci(difference(table[a], b_upd, "test_loss", upd_sd["test_loss"]), 4),
                     fmt_ci(difference(eq[a], b_eq, "test_loss", eq_sd["test_loss"]), 4) if a in eq and b_eq else "–",
                     fmt_ci(difference(eq[a], b_eq, "test_number_loss", eq_sd["test_number_loss"]), 4)
                     if a in eq and b_eq else "–",
                     fmt_ci(difference(table[a], b_upd, "seen_loss", upd_sd["seen_loss"]), 4),
                     fmt_ci(difference(table[a], b_upd, "acc_accuracy", upd_sd["acc_accuracy"]), 1, 100),
                     fmt_ci(difference(table[a], b_upd, "prose_loss", upd_sd["prose_loss"]), 4)]
            L.append(f"| {a.name} − {LABELS[other]} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    L += ["", "Equal time: a setting whose 500 updates cost more than 1.1× the reference's training CPU-seconds is "
          "read from its time-matched run (its whole schedule in the updates that cost the reference's time); "
          "one within 1.1× is read at its 500 updates (a cheaper one is not given more updates: conservative "
          "against it). CPU-seconds are the training process's user + sys on this CPU; GPU timings will differ.",
          "", "## The memory frontier (equal-time test loss against predicted peak device memory on LLaMA-2-7B)", "",
          "| setting | seeds | equal-time test loss | − grass-uniform γ=4 | 7B device GiB |", "|---|---|---|---|---|"]
    floor = pooled(eq, "test_loss")
    for s in sorted((s for s in eq if s.arm in (*FRONTIER_LAYERWISE, "lora")),
                    key=lambda s: (s.arm, s.gamma or 0, s.lora_r or 0)):
        mem = predicted_device_gib(s)
        diff = fmt_ci(difference(eq[s], ref, "test_loss", floor), 4) if ref and s != REFERENCE else "–"
        L.append(f"| {s.name} | {len(eq[s])} | {ms(figure(eq[s], 'test_loss'), 4)} | {diff} | "
                 f"{'pending' if mem is None else f'{mem:.1f}'} |")
    return L


def repair_md(table) -> list[str]:
    """The quantisation-repair test: FFT's lead over grass-uniform with and without Q4_1-sized noise."""
    parts = [table.get(Setting(a)) for a in ("grass-uniform", "fft", "grass-uniform-noise", "fft-noise")]
    L = ["", "## Quantisation repair (rule 4)", ""]
    if not all(parts):
        return L + ["Not yet: needs grass-uniform and FFT with and without the noise, seeds 1-3.", ""]
    gu, fft, gun, fftn = parts
    seeds = sorted(set(gu) & set(fft) & set(gun) & set(fftn))
    lead = [gu[s]["figures"]["test_loss"] - fft[s]["figures"]["test_loss"] for s in seeds]
    lead_noisy = [gun[s]["figures"]["test_loss"] - fftn[s]["figures"]["test_loss"] for s in seeds]
    growth = [b - a for a, b in zip(lead, lead_noisy)]
    ci = paired_ci(growth)
    L += ["| | seeds | FFT's lead (grass-uniform − FFT, test loss, 500 updates) |", "|---|---|---|",
          f"| as loaded | {','.join(map(str, seeds))} | {fmt_ci(paired_ci(lead), 4)} |",
          f"| + Q4_1-sized noise | {','.join(map(str, seeds))} | {fmt_ci(paired_ci(lead_noisy), 4)} |",
          f"| growth with one more dose of noise | {','.join(map(str, seeds))} | {fmt_ci(ci, 4)} |", "",
          "If the lead grows (interval above 0), one dose of Q4_1 error buys FFT that much; the weights as loaded "
          "carry one dose, so about that much of the lead as loaded is repair (a linear reading).", "",
          "**Verdict**: " + repair_verdict(ci, len(seeds))]
    return L


def repair_verdict(ci: tuple[float, float, float] | None, seeds: int) -> str:
    """Rule 4's reading of the growth's interval."""
    if ci is None or seeds < len(SEEDS):
        return "not yet (seeds 1-3 of all four)."
    if ci[1] > 0:
        return (f"repair detected: one more dose of Q4_1-sized error grows FFT's lead by {ci[0]:.4f} nats, so about "
                f"{ci[0]:.4f} of its lead as loaded is read as repair (a linear reading).")
    return "no repair detected (the growth's interval includes 0" + (" or lies below it)." if ci[2] < 0 else ").")


def forgetting_check(order: list[list[Setting]], eq: dict[Setting, dict[int, dict]]) -> list[str]:
    """Rule 3's check: the forgetting (prose loss) of the setting the order puts first against the next one's, at
    the runs the order reads; flagged when the interval lies wholly on the worse side."""
    flat = [s for g in order for s in g]
    if len(flat) < 2:
        return []
    first, second = flat[:2]
    ci = difference(eq[first], eq[second], "prose_loss", pooled(eq, "prose_loss"))
    worse = ci is not None and ci[1] > 0
    return ["", f"**forgetting** (rule 3): {first.name} − {second.name}, prose loss at equal time {fmt_ci(ci, 4)}: "
            + ("**the first setting forgets more** (the interval lies above 0): the README says so beside the "
               "recommendation." if worse else "not wholly worse.")]


def grid_md(runs: dict[str, dict]) -> list[str]:
    L = ["", "## Learning rates (seed 1; validation loss / test loss)", "", "| arm | rates | chosen |", "|---|---|---|"]
    for arm in GRID:
        cells = []
        for lr in seed1_grid(arm, runs):
            r = runs.get(run_key(Setting(arm), 1, lr))
            cells.append(f"{lr:g}: " + (f"{r['figures']['validation_loss']:.4f} / {r['figures']['test_loss']:.4f}"
                                        if r else "not yet"))
        best = best_lr(arm, runs)
        grid = seed1_grid(arm, runs)
        below, above = BEYOND[arm]
        edge = best is not None and ((best == min(grid) and set(below) <= set(grid))
                                     or (best == max(grid) and set(above) <= set(grid)))
        chosen = "grid incomplete" if best is None else f"{best:g}" + (" (at the edge: the fourth amendment's "
                                                                           "three steps are spent)" if edge else "")
        L.append(f"| {LABELS[arm]} | {' · '.join(cells)} | {chosen} |")
    return L


def plots(records: list[dict], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = runs_of(records)
    table, eq = by_setting(runs), at_equal_time(runs)
    base = next((r["figures"] for r in records if r.get("record") == "base" and not r.get("noise")
                 and r.get("protocol_id") == protocol_id()), None)
    for name, xkey, xlabel in (("frontier_updates.png", "update", "optimizer updates"),
                               ("frontier_cpu.png", "train_cpu_s", "training process CPU-seconds (probe, offload in)")):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for arm in MAIN:
            rs = table.get(Setting(arm))
            if not rs:
                continue
            curves = [r["figures"]["curve"] for r in rs.values()]
            n = min(len(c) for c in curves)
            xs = [statistics.fmean(c[i][xkey] for c in curves) for i in range(n)]
            ys = [statistics.fmean(c[i]["test_subset_loss"] for c in curves) for i in range(n)]
            if base:
                xs, ys = [0.0] + xs, [base["test_subset_loss"]] + ys
            ax.plot(xs, ys, marker=".", color=COLORS[arm], label=f"{LABELS[arm]} ({len(curves)} seeds)")
            tm = eq.get(Setting(arm))
            if xkey == "train_cpu_s" and tm and next(iter(tm.values()))["updates"] != UPDATES:
                ax.scatter([statistics.fmean(figure(tm, "train_cpu_s"))], [statistics.fmean(figure(tm, "test_subset_loss"))],
                           marker="*", s=90, color=COLORS[arm], zorder=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test loss, 64 unseen-template problems")
        ax.set_title("mean over seeds; ★ = the time-matched run (its whole schedule)" if table else
                     "no run recorded yet", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(docs / name, dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    mem = {s: predicted_device_gib(s) for s in eq}
    pending = all(v is None for v in mem.values())
    for arm in (*FRONTIER_LAYERWISE, "lora", "fft", "lisa", "grass-uniform-reset"):
        pts = sorted((s for s in eq if s.arm == arm), key=lambda s: (s.gamma or 0, s.lora_r or 0))
        xs = [(cost_ratio(s, runs) or (None,))[0] if pending else mem[s] for s in pts]
        ys = [statistics.fmean(figure(eq[s], "test_loss")) for s in pts]
        if pts and all(x is not None for x in xs):
            ax.plot(xs, ys, marker="o", color=COLORS[arm], label=LABELS[arm])
    ax.set_xlabel("cost per update × reference (device memory: pending grass_ft.planner)" if pending else
                  "predicted peak device memory on LLaMA-2-7B, GiB")
    ax.set_ylabel("equal-time test loss (unseen templates)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "frontier_memory.png", dpi=110)
    plt.close(fig)


def cmd_report(ledger: Path, docs: Path) -> None:
    records = read_jsonl(ledger)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "frontier.md").write_text(report_md(records))
    plots(records, docs)
    print(f"wrote {docs / 'frontier.md'} and the plots from {len(records)} ledger records")
