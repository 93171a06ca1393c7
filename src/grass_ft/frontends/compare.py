"""``grass-ft compare``: the same data, seed and step budget through several methods, one subprocess each.

Each method runs as ``python -m grass_ft.cli train ... output_dir=<out>/<method>`` so that its peak memory, its
import and load time and a crash belong to it alone. Keys are shared unless prefixed with a method name
(``lora.lr=2e-4`` applies to lora only). Every method's configuration is validated before the first one starts,
and every error is reported at once. A method that fails is reported with its error; the others still run.

``output_dir`` receives ``results.json`` (a list with one object per method), ``results.md`` (the same as a
table with units), the charts of :func:`grass_ft.run.report.plot_compare` and one run directory per method with
its ``stdout.log`` and ``stderr.log``. docs/COMPARE.md describes every column.
"""

from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..config import ALIASES, ConfigError, TrainConfig, build_config, resolve_aliases, validate
from ..base.registry import traits

# the baselines, the paper's two GRASS arms, and the layer-wise default (docs/DEFAULTS.md)
DEFAULT_METHODS = ("fft", "lora", "dora", "lisa", "grass", "grass-static", "grass-uniform")
COMPARE_KEYS = ("methods", "output_dir")
# Keys that define "the same data, seed and step budget": a per-method value is allowed but flagged.
FAIRNESS_KEYS = ("model", "data", "eval_data", "task", "seed", "max_steps", "batch_size", "grad_accum", "max_seq_len",
                 "train_samples", "eval_samples", "max_new_tokens", "dtype")
SUMMARY_KEYS = ("accuracy", "accuracy_before", "eval_loss", "eval_loss_before", "final_train_loss", "eval_n",
                "peak_memory_bytes", "optimizer_state_bytes", "optimizer_state_device_bytes",
                "optimizer_state_host_bytes", "optimizer_state_peak_device_bytes", "trainable_params",
                "total_params", "tokens_per_s", "s_per_step", "train_wall_s", "mgn_bookkeeping_fraction",
                "skipped_steps", "offload", "final_dir")


@dataclass
class ComparePlan:
    """A validated compare: which methods, where, and the ``key=value`` arguments of each run."""

    methods: list[str]
    output_dir: Path
    config_file: str | None
    overrides: dict[str, dict[str, str]]  # method -> its train overrides (shared + its own)
    configs: dict[str, TrainConfig]
    warnings: list[str] = field(default_factory=list)

    def run_dir(self, method: str) -> Path:
        return self.output_dir / method

    def argv(self, method: str, quiet: bool = True) -> list[str]:
        args = [sys.executable, "-m", "grass_ft.cli", "train"] + (["--quiet"] if quiet else [])
        if self.config_file:
            args += ["--config", self.config_file]
        return args + [f"{k}={v}" for k, v in self.overrides[method].items()]

    def meta(self) -> dict[str, Any]:
        """The shared setup, for the head of results.md."""
        c = self.configs[self.methods[0]]
        return {"model": c.model, "data": c.data, "task": c.task, "max_steps": c.max_steps, "seed": c.seed,
                "batch_size": c.batch_size, "max_seq_len": c.max_seq_len, "eval_samples": c.eval_samples}


def plan_compare(config_file: str | None, overrides: dict[str, str]) -> ComparePlan:
    """Split shared and per-method keys and validate every method's configuration.

    Raises:
        ConfigError: every error at once; one that every method shares is listed once, the others are
            prefixed with their method.
    """
    from ..method.methods import method_names

    known = method_names()
    errors: list[str] = []
    methods = _methods(overrides, known, errors)
    if "method" in overrides:
        errors.append("`method` is set per run by compare; choose the runs with methods=a,b,c")
    output_dir = Path(overrides.get("output_dir", "runs/compare"))
    shared, own, warnings = _split_keys(overrides, methods, known, errors)
    configs, final = _method_configs(config_file, shared, own, methods, known, output_dir, errors)
    if errors:
        raise ConfigError(errors)
    return ComparePlan(methods=methods, output_dir=output_dir, config_file=config_file, overrides=final,
                       configs=configs, warnings=warnings)


def _methods(overrides: dict[str, str], known: list[str], errors: list[str]) -> list[str]:
    """The methods to run (``methods=a,b,c``, default :data:`DEFAULT_METHODS`), each once, known ones only."""
    methods = [m.strip() for m in overrides.get("methods", ",".join(DEFAULT_METHODS)).split(",") if m.strip()]
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        errors.append(f"`methods` must be a comma-separated list of {', '.join(known)}, got "
                      f"{overrides.get('methods', '')!r}")
    if len(set(methods)) != len(methods):
        errors.append(f"`methods` lists a method twice: {overrides['methods']!r}")
    return [m for m in dict.fromkeys(methods) if m in known]


def _split_keys(overrides: dict[str, str], methods: list[str], known: list[str],
                errors: list[str]) -> tuple[dict[str, str], dict[str, dict[str, str]], list[str]]:
    """Shared keys, per-method keys (``lora.lr=1e-3``) and a warning for each per-method key that breaks the
    comparison's fairness (data, seed, step budget)."""
    shared: dict[str, str] = {}
    own: dict[str, dict[str, str]] = {m: {} for m in methods}
    warnings: list[str] = []
    for key, value in overrides.items():
        if key in COMPARE_KEYS or key == "method":
            continue
        if "." not in key:
            shared[key] = value
            continue
        method, sub = key.split(".", 1)
        if method not in known:
            errors.append(f"`{key}`: {method!r} is not a method (known: {', '.join(known)})")
        elif method not in own:
            errors.append(f"`{key}` is for method {method}, which is not in methods={','.join(methods)}")
        elif sub in COMPARE_KEYS or sub == "method":
            errors.append(f"`{key}`: `{sub}` cannot be set per method")
        else:
            own[method][sub] = value
            if ALIASES.get(sub, sub) in FAIRNESS_KEYS:
                warnings.append(f"`{key}` differs from the shared setting: {method} no longer runs on the same "
                                f"data / seed / step budget as the others")
    return shared, own, warnings


def _method_configs(config_file: str | None, shared: dict[str, str], own: dict[str, dict[str, str]],
                    methods: list[str], known: list[str], output_dir: Path,
                    errors: list[str]) -> tuple[dict[str, TrainConfig], dict[str, dict[str, str]]]:
    """Each method's validated config and its final keys; an error every method shares (a typo in a shared key)
    is listed once, not once per method."""
    from ..model.load import num_blocks_hint

    per_method_errors: dict[str, list[str]] = {}
    configs: dict[str, TrainConfig] = {}
    final: dict[str, dict[str, str]] = {}
    # the Trainer's names (learning_rate, ...) as their canonical keys, so lora.learning_rate overrides a shared lr
    shared, alias_errors = resolve_aliases(shared)
    errors += alias_errors
    for m in methods:
        own[m], alias_errors = resolve_aliases(own[m])
        errors += [f"{m}: {e}" for e in alias_errors]
        final[m] = {**shared, **own[m], "method": m, "output_dir": str(output_dir / m)}
        try:
            cfg = build_config(config_file, final[m], known_methods=known)
            n = num_blocks_hint(cfg.model) if traits(m).sampling else None
            errs = validate(cfg, num_blocks=n, known_methods=known) if n is not None else []
            configs[m] = cfg
        except ConfigError as e:
            errs = e.errors
        per_method_errors[m] = errs
    common = [e for e in per_method_errors[methods[0]] if all(e in v for v in per_method_errors.values())] \
        if methods else []
    errors += common
    errors += [f"{m}: {e}" for m in methods for e in per_method_errors[m] if e not in common]
    return configs, final


# ------------------------------------------------------------------------------------------ running


def error_message(stderr: str, returncode: int) -> str:
    """One line for the table: a ``grass-ft train: error:`` message (all its lines) or the last stderr line."""
    lines = [ln.strip() for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    marker = "grass-ft train: error:"
    starts = [i for i, ln in enumerate(lines) if ln.startswith(marker)]
    if starts:
        msg = " ".join([lines[starts[-1]][len(marker):].strip()] + lines[starts[-1] + 1:])
    elif lines:
        msg = lines[-1]
    elif returncode < 0:
        msg = f"killed by signal {-returncode} (out of memory?)"
    else:
        msg = f"exited with code {returncode} and no message"
    return msg if len(msg) <= 600 else msg[:597] + "..."


def _pump(src: IO[bytes], log: Path, echo: IO[str] | None, sink: list[str]) -> None:
    """Copy a child's stream to its log file (and to ``echo``, live), keeping the text for the error message."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(log, "w", encoding="utf-8") as f:
        while chunk := src.read1(65536):  # whatever has arrived, so progress bars show live
            text = decoder.decode(chunk)
            f.write(text)
            sink.append(text)
            if echo is not None:
                echo.write(text)
                echo.flush()


def run_method(plan: ComparePlan, method: str, quiet: bool = True, env: dict[str, str] | None = None) -> dict:
    """Train one method in a subprocess; returns its results row (metrics from summary.json, or ``error``)."""
    run_dir = plan.run_dir(method)
    run_dir.mkdir(parents=True, exist_ok=True)
    stale = run_dir / "summary.json"  # read only when this run exits 0, having replaced any previous one
    t0 = time.perf_counter()
    proc = subprocess.Popen(plan.argv(method, quiet=quiet), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env if env is not None else os.environ.copy())
    out_text: list[str] = []
    err_text: list[str] = []
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, run_dir / "stdout.log", None, out_text)),
             threading.Thread(target=_pump, args=(proc.stderr, run_dir / "stderr.log",
                                                  None if quiet else sys.stderr, err_text))]
    for t in pumps:
        t.start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()  # Ctrl-C: stop this child too before compare itself stops
        proc.wait()
        raise
    finally:
        for t in pumps:
            t.join()
    row: dict[str, Any] = {"method": method, "status": "ok", "error": None, "returncode": rc,
                           "wall_s": time.perf_counter() - t0, "output_dir": str(run_dir)}
    if rc == 0 and stale.is_file():
        summary = json.loads(stale.read_text())
        row.update({k: summary.get(k) for k in SUMMARY_KEYS})
    else:
        row.update({k: None for k in SUMMARY_KEYS})
        row["status"] = "failed"
        row["error"] = error_message("".join(err_text), rc) if rc != 0 else "finished without summary.json"
    return row


def summary_line(row: dict) -> str:
    if row["error"]:
        return f"FAILED after {row['wall_s']:.1f} s: {row['error']}"

    def f(x, fmt, scale=1.0):
        return "n/a" if x is None else format(x * scale, fmt)

    return (f"accuracy {f(row['accuracy'], '.1%')}, eval loss {f(row['eval_loss'], '.4f')}, "
            f"train loss {f(row['final_train_loss'], '.4f')}, peak {f(row['peak_memory_bytes'], '.2f', 2**-30)} GiB, "
            f"optimizer state {f(row['optimizer_state_bytes'], '.1f', 2**-20)} MiB, "
            f"{f(row['tokens_per_s'], ',.0f')} tokens/s, {row['wall_s']:.1f} s")


def write_results(plan: ComparePlan, rows: list[dict], plots: list[str] = ()) -> None:
    from ..run.report import results_markdown

    (plan.output_dir / "results.json").write_text(json.dumps(rows, indent=1))
    (plan.output_dir / "results.md").write_text(results_markdown(rows, plan.meta(), plots))


def check_previous_compare(plan: ComparePlan) -> None:
    """Refuse, before any method runs, an output_dir that holds a previous compare (``results.json`` or a
    method's run), unless ``overwrite_output_dir=true``: the same rule as ``grass-ft train``."""
    from ..run.preflight import previous_run
    from ..run.train import RunError

    if any(plan.configs[m].overwrite_output_dir for m in plan.methods):
        return
    held = [f"{m}/" for m in plan.methods if previous_run(plan.run_dir(m))]
    held = (["results.json"] if (plan.output_dir / "results.json").exists() else []) + held
    if held:
        raise RunError(f"`output_dir` {str(plan.output_dir)!r} already holds a compare ({', '.join(held)}); pass "
                       f"overwrite_output_dir=true to replace it, or choose another output_dir")


def run_compare(plan: ComparePlan, quiet: bool = False, out: IO[str] | None = None,
                env: dict[str, str] | None = None) -> list[dict]:
    """Run every method in turn, rewriting results.json / results.md after each; draw the charts at the end."""
    from ..run.report import plot_compare

    from ..run.train import RunError

    out = out or sys.stdout
    check_previous_compare(plan)
    try:
        plan.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"`output_dir` {str(plan.output_dir)!r} is not writable: {e.strerror}") from None
    for w in plan.warnings:
        print(f"warning: {w}", file=out)
    rows: list[dict] = []
    for i, method in enumerate(plan.methods, 1):
        print(f"[{i}/{len(plan.methods)}] {method}: training -> {plan.run_dir(method)}", file=out, flush=True)
        rows.append(run_method(plan, method, quiet=quiet, env=env))
        print(f"[{i}/{len(plan.methods)}] {method}: {summary_line(rows[-1])}", file=out, flush=True)
        write_results(plan, rows)
    try:
        plots = [str(p) for p in plot_compare(plan.output_dir, rows)]
    except Exception as e:  # a chart must never cost the table of a long compare
        print(f"warning: plotting failed: {type(e).__name__}: {e}", file=out)
        plots = []
    write_results(plan, rows, plots)
    failed = [r["method"] for r in rows if r["error"]]
    print(f"wrote {plan.output_dir / 'results.md'}, results.json and {len(plots)} charts"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=out)
    return rows
