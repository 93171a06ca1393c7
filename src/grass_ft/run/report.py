"""Tables and plots of training runs: the ``grass-ft compare`` table and the charts of ``compare`` and ``plot``.

Everything here reads a run's output directory (``metrics.jsonl``, ``layers.jsonl``, ``summary.json``,
``config.yaml``) and never a live model, so a finished or a half-written run can be drawn again at any time.
Charts use matplotlib's Agg backend (files only, no display needed). Each method keeps one colour in every chart.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..base.registry import traits, with_sampling

# One colour per method in every chart (tab10 entries).
METHOD_COLORS = {"fft": "#444444", "lora": "#1f77b4", "dora": "#9467bd", "lisa": "#ff7f0e", "grass": "#2ca02c",
                 "grass-static": "#17becf", "grass-uniform": "#8c564b"}
METHOD_STYLES = {"dora": "--", "grass-static": "--", "grass-uniform": ":"}  # dashed: a variant drawn over its sibling stays visible
FROZEN, PROBE, TRAINED = 0, 1, 2  # cell values of the block x step activity matrix

# --------------------------------------------------------------------------------------------- reading runs


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSONL file; a missing file is empty and a torn last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@dataclass
class Run:
    """What one output directory holds; empty fields when a file is missing."""

    path: Path
    method: str
    metrics: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)  # metrics.jsonl's evaluations during training (eval_steps)

    @property
    def steps(self) -> int:
        """Steps the run planned (or, without a config, the steps it logged)."""
        if isinstance(self.config.get("max_steps"), int):
            return self.config["max_steps"]
        return max((m["step"] for m in self.metrics), default=-1) + 1


def read_json(path: Path) -> Any:
    """A JSON file written by grass-ft, or one line naming it and where it is damaged (a killed copy, an edit)."""
    from ..base.errors import UserError, not_utf8

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(not_utf8(path, e)) from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); the file is damaged") from None


def load_run(path: str | Path, method: str | None = None) -> Run:
    path = Path(path)
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            from ..base.errors import UserError

            raise UserError(f"{path / 'config.yaml'}: not valid YAML ({str(e).splitlines()[0]})") from None
    summary = read_json(path / "summary.json") if (path / "summary.json").is_file() else {}
    lines = read_jsonl(path / "metrics.jsonl")
    return Run(path=path, method=method or config.get("method") or summary.get("method") or path.name,
               metrics=[m for m in lines if "loss" in m], events=read_jsonl(path / "layers.jsonl"),
               summary=summary, config=config, evals=[m for m in lines if "eval_loss" in m])


def activity_matrix(events: list[dict], metrics: list[dict], steps: int) -> list[list[int]] | None:
    """Block x step matrix of FROZEN / PROBE / TRAINED, or None when the run drew no blocks.

    ``layers.jsonl`` is the source (its draws are complete whatever ``logging_steps`` is): steps before the
    ``probe`` event probe every block, and each ``draw`` holds until the next. Without events the ``active`` and
    ``probe`` fields of ``metrics.jsonl`` are used, for the logged steps only.
    """
    num_blocks = next((len(e["mgn"]) for e in events if e.get("mgn")), None)
    if num_blocks is None:
        actives = [b for m in metrics for b in m.get("active") or []]
        if not actives:
            return None
        num_blocks = max(actives) + 1
    mat = [[FROZEN] * steps for _ in range(num_blocks)]
    if events:
        probe_end = next((e["step"] for e in events if e["event"] == "probe"), 0)
        draws = sorted((e["step"], e["active"]) for e in events if e["event"] == "draw")
        for t in range(min(probe_end, steps)):
            for b in range(num_blocks):
                mat[b][t] = PROBE
        for i, (start, active) in enumerate(draws):
            end = draws[i + 1][0] if i + 1 < len(draws) else steps
            for t in range(start, min(end, steps)):
                for b in active:
                    mat[b][t] = TRAINED
        return mat
    for m in metrics:
        if m["step"] >= steps:
            continue
        for b in range(num_blocks) if m.get("probe") else m.get("active") or []:
            mat[b][m["step"]] = PROBE if m.get("probe") else TRAINED
    return mat


# ------------------------------------------------------------------------------------------------- tables


def _num(x: Any, fmt: str, scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x * scale, fmt)


def _arrow(before: Any, after: Any, fmt: str, scale: float = 1.0) -> str:
    if before is None:
        return _num(after, fmt, scale)
    return f"{_num(before, fmt, scale)} → {_num(after, fmt, scale)}"


RESULT_COLUMNS = [  # (header with unit, cell) — docs/COMPARE.md explains each column
    ("method", lambda r: f"`{r['method']}`"),
    ("accuracy, % (before → after)", lambda r: _arrow(r.get("accuracy_before"), r.get("accuracy"), ".1f", 100)),
    ("eval loss, nats/token (before → after)",
     lambda r: _arrow(r.get("eval_loss_before"), r.get("eval_loss"), ".4f")),
    ("final train loss, nats/token", lambda r: _num(r.get("final_train_loss"), ".4f")),
    ("peak memory, GiB", lambda r: _num(r.get("peak_memory_bytes"), ".3f", 2 ** -30)),
    ("optimizer state, MiB (device + host)",
     lambda r: "–" if r.get("optimizer_state_bytes") is None else
     f"{_num(r.get('optimizer_state_device_bytes'), '.2f', 2 ** -20)} + "
     f"{_num(r.get('optimizer_state_host_bytes'), '.2f', 2 ** -20)}"),
    ("trainable params (% of total)",
     lambda r: "–" if r.get("trainable_params") is None else
     f"{r['trainable_params']:,} ({100 * r['trainable_params'] / max(1, r.get('total_params') or 1):.1f}%)"),
    ("tokens/s", lambda r: _num(r.get("tokens_per_s"), ",.0f")),
    ("s/step", lambda r: _num(r.get("s_per_step"), ".3f")),
    ("MGN bookkeeping, % of step time", lambda r: _num(r.get("mgn_bookkeeping_fraction"), ".2f", 100)
     if traits(r.get("method", "")).refreshes else "–"),
    ("run wall time, s", lambda r: _num(r.get("wall_s"), ".1f")),
    ("error", lambda r: (r.get("error") or "").replace("|", "\\|").replace("\n", " ")),
]


def results_markdown(rows: list[dict], meta: dict[str, Any] | None = None, plots: list[str] = ()) -> str:
    """``results.md``: a header naming the shared setup, the table (one row per method), notes and plots."""
    meta = meta or {}
    lines = ["# grass-ft compare", ""]
    if meta:
        lines += [", ".join(f"{k} `{v}`" for k, v in meta.items()), ""]
    lines.append("| " + " | ".join(h for h, _ in RESULT_COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in RESULT_COLUMNS) + "|")
    for r in rows:
        lines.append("| " + " | ".join(cell(r) for _, cell in RESULT_COLUMNS) + " |")
    lines += [
        "",
        "Peak memory is `torch.cuda.max_memory_allocated` on a GPU and the process's peak resident set on a CPU "
        "(which then includes the Python runtime). Optimizer state is measured at the end of training; device "
        "state of the offloading optimizer is what stays on the device between steps. Trainable params are those "
        "updated at one step (drawn blocks plus always-trained parts for sampling methods). "
        "See docs/COMPARE.md.",
    ]
    for p in plots:
        lines += ["", f"![{Path(p).stem}]({Path(p).name})"]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def _color(method: str, i: int) -> str:
    return METHOD_COLORS.get(method, f"C{i % 10}")


def plot_loss(runs: list[Run], path: Path, title: str = "Training loss") -> Path | None:
    """Training loss per optimizer step of every run on one chart; probe steps (no update) as open circles."""
    runs = [r for r in runs if r.metrics]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    any_probe = False
    for i, run in enumerate(runs):
        steps = [m["step"] for m in run.metrics]
        loss = [m["loss"] for m in run.metrics]
        c, ls = _color(run.method, i), METHOD_STYLES.get(run.method, "-")
        label = run.method + ("" if run.summary else " (did not finish)")
        if len(steps) > 30:  # noisy per-step losses: faint raw line, EMA on top
            ax.plot(steps, loss, color=c, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _ema(loss, 2 / (max(2, len(steps) // 20) + 1)), color=c, linewidth=1.8, label=label,
                    linestyle=ls)
        else:
            ax.plot(steps, loss, color=c, linewidth=1.6, marker=".", label=label, linestyle=ls)
        probe = [(s, v) for s, v, m in zip(steps, loss, run.metrics) if m.get("probe")]
        if probe:
            any_probe = True
            ax.scatter(*zip(*probe), facecolors="none", edgecolors=c, s=36, zorder=3)
        evals = [(m["step"], m["eval_loss"]) for m in run.evals if m.get("eval_loss") is not None]
        if evals:  # the held-out loss of the evaluations during training (eval_steps), on the same axes
            ax.plot(*zip(*evals), color=c, linestyle=":", marker="s", markersize=4, label=f"{run.method} held-out")
    if any_probe:
        ax.scatter([], [], facecolors="none", edgecolors="k", s=36, label="probe step (no update)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy, nats/token)")
    ax.set_title(title + (" (EMA-smoothed; raw faint)" if any(len(r.metrics) > 30 for r in runs) else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _ema(xs: list[float], a: float) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None or not math.isfinite(m) else a * x + (1 - a) * m
        out.append(m)
    return out


def plot_active_blocks(runs: list[Run], path: Path) -> Path | None:
    """Per sampling run, a block x step map of which decoder blocks trained, probed or stayed frozen, with the
    share of update steps each block trained alongside."""
    mats = [(r, activity_matrix(r.events, r.metrics, r.steps)) for r in runs]
    mats = [(r, m) for r, m in mats if m is not None and r.steps > 0]
    if not mats:
        return None
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colors = ["#e8e8e8", "#fdbf6f", "#1f4e9c"]
    nb = max(len(m) for _, m in mats)
    height = 1.1 + len(mats) * (0.8 + 0.16 * nb)
    fig, axes = plt.subplots(len(mats), 2, figsize=(10, height), squeeze=False,
                             gridspec_kw={"width_ratios": [6, 1]})
    for (run, mat), (ax, side) in zip(mats, axes):
        steps = len(mat[0])
        ax.imshow(mat, aspect="auto", origin="lower", interpolation="nearest", cmap=ListedColormap(colors),
                  vmin=0, vmax=2, extent=(-0.5, steps - 0.5, -0.5, len(mat) - 0.5))
        ax.set_ylabel(f"{run.method}\ndecoder block")
        tick = 1 if len(mat) <= 16 else 2 if len(mat) <= 32 else 5
        ax.set_yticks(range(0, len(mat), tick))
        update_steps = [t for t in range(steps) if any(row[t] != PROBE for row in mat)]
        share = [100 * sum(row[t] == TRAINED for t in update_steps) / max(1, len(update_steps)) for row in mat]
        side.barh(range(len(mat)), share, color=_color(run.method, 0), height=0.8)
        side.set_ylim(-0.5, len(mat) - 0.5)
        side.set_yticks(range(0, len(mat), tick))
        side.set_xlim(0, 100)
        side.grid(axis="x", alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    axes[-1][1].set_xlabel("% of update\nsteps trained")
    axes[0][0].set_title("Active decoder blocks per step (block 0 is nearest the input)")
    fig.legend(handles=[Patch(color=colors[TRAINED], label="trained"), Patch(color=colors[PROBE],
                        label="probe (gradient read, no update)"), Patch(color=colors[FROZEN], label="frozen")],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))  # keep ~0.35 inch at the bottom for the legend
    return _save(fig, path, tight=False)


def plot_mgn(run: Run, path: Path) -> Path | None:
    """MGN per block over time (at the probe's end and each refresh) and the sampling probabilities it gave."""
    evs = [e for e in run.events if e["event"] in ("probe", "refresh") and e.get("mgn")]
    if not evs:
        return None
    plt = _plt()
    import matplotlib as mpl

    nb = len(evs[0]["mgn"])
    steps = [e["step"] for e in evs]
    end = max(run.steps, steps[-1] + 1)
    fig, (ax, axp) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True, layout="constrained",
                                  gridspec_kw={"height_ratios": [1.2, 1]})
    colors = mpl.colormaps["viridis"].resampled(nb)
    for b in range(nb):
        vals = [e["mgn"][b] for e in evs]
        # each estimate holds until the next refresh: draw it as a step function up to the end of training
        ax.step(steps + [end], vals + [vals[-1]], where="post", color=colors(b), linewidth=1.2, marker="o",
                markersize=3, markevery=list(range(len(steps))))
    positive = [v for e in evs for v in e["mgn"] if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    for a in (ax, axp):
        if steps[0] > 0:
            a.axvspan(0, steps[0], facecolor="#eeeeee", edgecolor="#bbbbbb", hatch="//", linewidth=0)
            if steps[0] >= 0.06 * end:  # a label only where the band is wide enough to hold it
                a.text(steps[0] / 2, 0.98, "probe", transform=a.get_xaxis_transform(), ha="center", va="top",
                       fontsize=8)
        a.set_xlim(0, end)
    ax.set_ylabel("MGN (mean gradient RMS,\n√(‖g‖² / N) per block)")
    ax.set_title(f"{run.method}: block importance (MGN) at the probe's end and each refresh")
    ax.grid(alpha=0.3)
    bounds = mpl.colors.BoundaryNorm([b - 0.5 for b in range(nb + 1)], nb)
    tick = 1 if nb <= 16 else 2 if nb <= 32 else 5
    fig.colorbar(mpl.cm.ScalarMappable(norm=bounds, cmap=colors), ax=ax, label="decoder block (line colour)",
                 ticks=range(0, nb, tick))
    edges = steps + [end]
    probs = [[e["probs"][b] for e in evs] for b in range(nb)]
    mesh = axp.pcolormesh(edges, [b - 0.5 for b in range(nb + 1)], probs, cmap="magma", shading="flat")
    fig.colorbar(mesh, ax=axp, label="sampling probability p")
    axp.set_ylabel("decoder block")
    axp.set_yticks(range(0, nb, tick))
    axp.set_xlabel("optimizer step")
    axp.set_title("p = softmax(z / τ), z = MGN / mean(MGN)")
    return _save(fig, path, tight=False)


def plot_summary(rows: list[dict], path: Path) -> Path | None:
    """Bars per method: accuracy (before as a tick), peak memory, optimizer state (device + host), throughput."""
    rows = [r for r in rows if not r.get("error")]
    if not rows:
        return None
    plt = _plt()
    names = [r["method"] for r in rows]
    colors = [_color(n, i) for i, n in enumerate(names)]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    acc = [100 * (r.get("accuracy") or 0) for r in rows]
    panels = [(axes[0][0], acc, "accuracy after training, %", ".1f"),
              (axes[0][1], [(r.get("peak_memory_bytes") or 0) / 2 ** 30 for r in rows], "peak memory, GiB", ".2f"),
              (axes[1][1], [r.get("tokens_per_s") or 0 for r in rows], "throughput, tokens/s", ",.0f")]
    for ax, vals, label, fmt in panels:
        bars = ax.bar(names, vals, color=colors)
        ax.bar_label(bars, labels=[format(v, fmt) for v in vals], fontsize=7, padding=2)
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.15 * max(vals) if max(vals) > 0 else 1)
    before = [100 * r["accuracy_before"] if r.get("accuracy_before") is not None else None for r in rows]
    if any(b is not None for b in before):
        xs = [i for i, b in enumerate(before) if b is not None]
        axes[0][0].scatter(xs, [before[i] for i in xs], marker="_", s=400, color="k", zorder=3, label="before")
        axes[0][0].legend(fontsize=8)
        axes[0][0].set_ylim(0, max(5.0, 1.15 * max(acc + [b for b in before if b is not None])))
    dev = [(r.get("optimizer_state_device_bytes") or 0) / 2 ** 20 for r in rows]
    host = [(r.get("optimizer_state_host_bytes") or 0) / 2 ** 20 for r in rows]
    ax = axes[1][0]
    ax.bar(names, dev, color=colors, label="on device")
    bars = ax.bar(names, host, bottom=dev, color=colors, alpha=0.35, hatch="//", label="on host")
    ax.bar_label(bars, labels=[f"{d:.2f}+{h:.2f}" for d, h in zip(dev, host)], fontsize=7, padding=2)
    ax.set_ylim(0, 1.15 * max(d + h for d, h in zip(dev, host)) or 1)
    ax.set_ylabel("optimizer state at the end, MiB")
    ax.legend(fontsize=8)
    for a in axes.flat:
        a.tick_params(axis="x", labelrotation=30)
        a.grid(axis="y", alpha=0.3)
    fig.suptitle("Methods compared on the same data, seed and step budget")
    return _save(fig, path)


def _save(fig, path: Path, tight: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- entry points


def plot_run(run_dir: str | Path) -> list[Path]:
    """``grass-ft plot RUN_DIR``: loss.png, active_blocks.png (sampling methods) and mgn.png (adaptive GRASS)."""
    run = load_run(run_dir)
    out = [plot_loss([run], run.path / "loss.png", title=f"{run.method}: training loss"),
           plot_active_blocks([run], run.path / "active_blocks.png"),
           plot_mgn(run, run.path / "mgn.png")]
    return [p for p in out if p is not None]


def plot_compare(out_dir: str | Path, rows: list[dict]) -> list[Path]:
    """The charts of a compare directory from each method's run directory (``row["output_dir"]``)."""
    out_dir = Path(out_dir)
    # a relative output_dir was relative to where compare ran; the run directories also sit under out_dir
    dirs = [(r["method"], Path(r.get("output_dir") or out_dir / r["method"])) for r in rows]
    runs = [load_run(d if d.is_dir() else out_dir / m, m) for m, d in dirs]
    paths = [plot_loss(runs, out_dir / "loss.png", "Training loss, all methods"),
             plot_active_blocks([r for r in runs if r.method in with_sampling()], out_dir / "active_blocks.png")]
    paths += [plot_mgn(r, out_dir / f"mgn_{r.method}.png") for r in runs if traits(r.method).refreshes]
    paths.append(plot_summary(rows, out_dir / "summary.png"))
    return [p for p in paths if p is not None]
