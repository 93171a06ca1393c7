"""``grass-ft train | plan | eval | validate | prepare-model | compare | plot`` — every key is ``key=value`` or from
``--config FILE``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from ..config import ConfigError, TrainConfig, _coerce, build_config, parse_overrides, unknown_key_message, validate
from ..base.errors import UserError
from ..model.load import ModelError
from ..base.registry import traits

def _default_methods() -> str:
    from .compare import DEFAULT_METHODS

    return ",".join(DEFAULT_METHODS)


USAGE = """grass-ft COMMAND [--config FILE] [key=value ...]

commands:
  plan           what fits your device and host, every method and gamma, before any weight loads:
                 plan model=DIR_WITH_CONFIG_JSON device_memory=24GiB [batch_size=4 max_seq_len=1024 ...]
  train          fine-tune (default: method=auto, the most capable setting that fits the device, chosen by the
                 planner; dtype=auto; on SmolLM2-135M-Instruct, GSM-style data, offline): train data=FILE|DIR|HUB_ID
  eval           evaluate a model or adapter directory: model=PATH data=FILE|DIR|GENERATOR task=NAME
  validate       check a configuration and report every error at once
  prepare-model  convert the packaged SmolLM2-135M-Instruct GGUF file to a safetensors cache (once)
  compare        run several methods on the same data, seed and steps, one subprocess each; writes results.json,
                 results.md and charts: methods={methods} [key=value] [lora.lr=2e-4]
  plot           draw the charts of a run directory (or redraw those of a compare directory): plot DIR [DIR ...]

`grass-ft train --help` lists every key with its help line. A bad input prints one line and exits 2; `--debug`
(or GRASS_FT_DEBUG=1) shows the traceback instead. Ctrl-C exits 130 and SIGTERM 143, with checkpoints intact."""


def usage() -> str:
    """The top-level help, its lists taken from the code (compare's default methods)."""
    return USAGE.format(methods=_default_methods())


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, add_help=False)
    ap.add_argument("--config", default=None, help="YAML file of key: value pairs")
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", help="key=value pairs")
    return ap


def _keys_help() -> str:
    return "keys (YAML or key=value):\n" + "\n".join(TrainConfig.help_lines())


def _config(args) -> TrainConfig:
    """Build and validate the config; ``gamma`` is checked against the model's block count when its
    config.json is at hand (a local directory or the prepared packaged model)."""
    from ..method.methods import method_names
    from ..model.load import num_blocks_hint

    cfg = build_config(args.config, parse_overrides(args.overrides), known_methods=method_names())
    n = num_blocks_hint(cfg.model) if traits(cfg.method).sampling else None
    errors = validate(cfg, num_blocks=n, known_methods=method_names()) if n is not None else []
    if errors:
        raise ConfigError(errors)
    return cfg


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's pre-emption, ``kill``, torchrun stopping its workers), raised where the run is."""


@contextmanager
def _sigterm_interrupts():
    """While training, SIGTERM unwinds the run like Ctrl-C: a checkpoint being written is abandoned as a hidden
    temporary, the output directory's lock is released, and the command exits 143 with one line."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM ignored for a moment (main thread only): while the interruption's message is composed
    and printed, a second Ctrl-C would otherwise replace it with a bare "interrupted"."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_train(argv: list[str]) -> int:
    from ..run.train import print_summary, run_train

    args = _parser("grass-ft train").parse_intermixed_args(argv)
    if args.help:
        print("usage: grass-ft train [--config FILE] [--quiet] [key=value ...]\n\n" + _keys_help())
        return 0
    cfg = _config(args)
    if args.quiet:  # transformers' own bars (loading and writing weights) too, so an error stays one line
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        import datasets  # and datasets' (building a split, tokenising), which print only on a cold cache

        datasets.disable_progress_bars()
    try:
        with _sigterm_interrupts():
            summary = run_train(cfg, progress=not args.quiet)
    except KeyboardInterrupt as e:
        from ..run.train import interrupted_state

        with _signals_held():  # a second Ctrl-C must not cut short the line that says what is on disk
            state = interrupted_state(cfg, getattr(e, "run_stage", None), ["grass-ft", "train", *argv])
            how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            print(f"grass-ft train: {how}; {state}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130
    if "method" in summary:  # rank 0 of a multi-process run, or the only process
        print_summary(summary)
    return 0


def cmd_validate(argv: list[str]) -> int:
    """The configuration, then every check ``train`` makes before loading the model (data files read in full,
    generators by name only; output_dir; the checkpoint to resume; the model directory or hub id)."""
    from ..run.preflight import preflight

    args = _parser("grass-ft validate").parse_intermixed_args(argv)
    if args.help:
        print("usage: grass-ft validate [--config FILE] [key=value ...]\n\n" + _keys_help())
        return 0
    cfg = _config(args)
    pf = preflight(cfg, generate=False)
    for w in pf.warnings:
        print(f"grass-ft validate: warning: {w}", file=sys.stderr)
    from ..data.loading import check_data_sources

    notes = check_data_sources(cfg)  # reads the first rows of data / eval_data: format errors name file and row
    print(f"configuration OK (method {cfg.method}, model {cfg.model}, data {cfg.data}{notes})")
    return 0


PLAN_KEYS = {"format": "table or json", "nproc": "processes of the run (with fsdp=true: each holds 1/nproc of the "
                                                 "weights, gradients and optimizer state)",
             "rows": "all: every gamma in the table (default: 1, 2, 4, ..., all blocks and the largest that fits)",
             "exact": "true: also run grass-ft's training step on the whole model on fake tensors for the recommended "
                      "setting (or the method/gamma given) and print its peak beside the plan's (about a minute for "
                      "7B)"}


def cmd_plan(argv: list[str]) -> int:
    """What fits the device and the host, for every setting, and the one to run (docs/PLAN.md)."""
    from ..planner import detect_budgets
    from ..planner.table import build_plan, render

    args = _parser("grass-ft plan").parse_intermixed_args(argv)
    if args.help:
        print("usage: grass-ft plan [--config FILE] [key=value ...]\n\nthe keys of `grass-ft train` (model, "
              "batch_size, max_seq_len, dtype, gradient_checkpointing, fsdp, device_memory, host_memory, memory_margin, ...) and:\n"
              + "\n".join(f"  {k:<24} {v}" for k, v in PLAN_KEYS.items()))
        return 0
    kv = parse_overrides(args.overrides)
    extra = {k: kv.pop(k) for k in list(kv) if k in PLAN_KEYS}
    errors = []
    fmt = extra.get("format", "table")
    if fmt not in ("table", "json"):
        errors.append(f"`format` must be table or json, got {fmt!r}")
    nproc = extra.get("nproc", "1")
    if not str(nproc).isdigit() or int(nproc) < 1:
        errors.append(f"`nproc` must be an integer >= 1, got {nproc!r}")
    if extra.get("rows", "all") != "all":
        errors.append(f"`rows` must be all, got {extra['rows']!r}")
    exact = str(extra.get("exact", "false")).lower()
    if exact not in ("true", "false"):
        errors.append(f"`exact` must be true or false, got {extra['exact']!r}")
    try:
        from ..method.methods import method_names

        cfg = build_config(args.config, kv, known_methods=method_names())
    except ConfigError as e:
        raise ConfigError(errors + e.errors) from None
    if errors:
        raise ConfigError(errors)
    budgets = detect_budgets(cfg.device_memory, cfg.host_memory)
    plan = build_plan(cfg, budgets, world_size=int(nproc) if cfg.fsdp else 1, margin=cfg.memory_margin)
    checked = _exact(plan, cfg) if exact == "true" else None
    if fmt == "json":
        print(json.dumps({**plan.to_json(), **({"exact": checked} if checked else {})}, indent=1))
    else:
        print(render(plan, cfg, every_gamma="rows" in extra))
        if checked:
            print(f"exact: {checked['label']}: {checked['device_gib']:.2f} GiB on the device (the plan: "
                  f"{checked['planned_device_gib']:.2f}), {checked['host_gib']:.2f} GiB on the host, from the whole "
                  f"model's training step on fake tensors")
    return 0


def _exact(plan, cfg: TrainConfig) -> dict | None:
    """The whole-model fake run of the recommended row (or of the method/gamma given when nothing fits)."""
    from ..planner.exact import exact_peak
    from ..planner.shape import load_model_config

    row = plan.recommended or next((r for r in plan.rows if r.setting.method == cfg.method and
                                    r.setting.gamma in (cfg.gamma, None)), None)
    if row is None:
        return None
    got = exact_peak(load_model_config(cfg.model), cfg, row.setting)
    return {"label": row.setting.label, "device_gib": got["device"] / 2**30, "host_gib": got["host"] / 2**30,
            "planned_device_gib": row.prediction.device / 2**30}


def cmd_eval(argv: list[str]) -> int:
    from ..evaluation.evaluate import check_eval_output_dir, run_eval
    from ..run.held_out import evaluate_run_model, run_of

    args = _parser("grass-ft eval").parse_intermixed_args(argv)
    # task unset: each example's own "task" key, else the data's folder name; otherwise task= is required
    allowed = {"model": None, "data": None, "task": None, "eval_samples": "100", "output_dir": "runs/eval",
               "mode": "generate", "max_new_tokens": "160", "batch_size": "16", "max_seq_len": "256",
               "chat_template": None, "overwrite_output_dir": "false"}
    if args.help:
        print("usage: grass-ft eval model=PATH data=FILE|DIR|GENERATOR [task=NAME] [eval_samples=N] "
              "[output_dir=DIR] [mode=generate|loglik] [max_new_tokens=N] [batch_size=N] [chat_template=FILE.jinja] "
              "[overwrite_output_dir=true]\n       grass-ft eval model=RUN/final [output_dir=DIR]   (the run's own "
              "held-out examples and evaluation settings)")
        return 0
    kv = parse_overrides(args.overrides)
    errors = [unknown_key_message(k, allowed) for k in kv if k not in allowed]
    run = run_of(kv["model"]) if kv.get("model") and "data" not in kv else None
    errors += [f"`{k}` is required" for k in ("model", "data") if k not in kv and not (k == "data" and run)]
    if run is not None:  # the run's held-out examples, with the run's task and evaluation settings
        errors += [f"`{k}` is the run's own without data= (its config.yaml); give data= to evaluate other examples"
                   for k in kv if k in allowed and k not in ("model", "output_dir", "overwrite_output_dir")]
    if kv.get("task"):
        from ..base.tasks import canonical_task

        try:
            canonical_task(kv["task"])
        except ValueError as e:
            errors.append(f"`task`: {e}")
    vals = {**{k: v for k, v in allowed.items() if v is not None}, **kv}
    for k, least in (("eval_samples", 1), ("max_new_tokens", 1), ("batch_size", 1), ("max_seq_len", 8)):
        if k in vals and not str(vals[k]).lstrip("-").isdigit():
            errors.append(f"`{k}` must be an integer, got {vals[k]!r}")
        elif k in vals and int(vals[k]) < least:
            errors.append(f"`{k}` must be >= {least}, got {vals[k]!r}")
    if vals.get("mode") not in ("generate", "loglik"):
        errors.append(f"`mode` must be generate or loglik, got {vals.get('mode')!r}")
    try:
        overwrite = _coerce("overwrite_output_dir", vals["overwrite_output_dir"], bool)
    except ValueError as e:
        errors.append(str(e))
        overwrite = False
    errors += [] if errors else check_eval_output_dir(vals["output_dir"], overwrite)
    if errors:
        raise ConfigError(errors)
    if run is not None:
        res = evaluate_run_model(vals["model"], vals["output_dir"])
    else:
        res = run_eval(vals["model"], vals["data"], vals.get("task"), int(vals["eval_samples"]), vals["output_dir"],
                       mode=vals["mode"], max_new_tokens=int(vals["max_new_tokens"]),
                       batch_size=int(vals["batch_size"]), max_seq_len=int(vals["max_seq_len"]),
                       chat_template=vals.get("chat_template"))
    acc = "n/a (no example with a gold answer)" if res["accuracy"] is None else f"{res['accuracy']:.1%}"
    print(f"accuracy {acc} on n={res['n']}" +
          "".join(f"\n  {t}: {r['accuracy']:.1%} (n={r['n']})" for t, r in res.get("per_task", {}).items()) +
          f"\nwrote {vals['output_dir']}/eval.json and predictions.jsonl")
    return 0


def cmd_prepare_model(argv: list[str]) -> int:
    from ..model.load import PACKAGED, packaged_model_dir

    for name in argv or list(PACKAGED):
        if name not in PACKAGED:
            raise ModelError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
        print(f"{name}: {packaged_model_dir(name)}")
    return 0


def cmd_compare(argv: list[str]) -> int:
    """Exit 0 when every method finished, 1 when one failed (it is in the table with its error), 2 on bad keys."""
    from .compare import plan_compare, run_compare

    args = _parser("grass-ft compare").parse_intermixed_args(argv)
    if args.help:
        print("usage: grass-ft compare [--config FILE] [--quiet] [methods=a,b,...] [output_dir=DIR] [key=value ...] "
              "[METHOD.key=value ...]\n\n  methods     comma-separated (default: " + _default_methods() + ")"
              "\n  output_dir  where results.json, results.md, charts and one run directory per method go "
              "(default: runs/compare)\n  METHOD.key  applies to that method only, e.g. lora.lr=2e-4\n"
              "  --quiet     no progress bars from the runs (their summary lines still print)\n\n" + _keys_help())
        return 0
    plan = plan_compare(args.config, parse_overrides(args.overrides))
    rows = run_compare(plan, quiet=args.quiet)
    return 1 if any(r["error"] for r in rows) else 0


def cmd_plot(argv: list[str]) -> int:
    from ..run.report import plot_compare, plot_run
    from ..run.train import RunError

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: grass-ft plot RUN_DIR [RUN_DIR ...]\n\n  a run directory gets loss.png, active_blocks.png "
              "(sampling methods) and mgn.png (grass);\n  a compare directory (with results.json) gets its charts "
              "redrawn")
        return 0
    for d in map(Path, argv):
        if (d / "results.json").is_file():
            paths = plot_compare(d, _compare_rows(d / "results.json"))
        elif (d / "metrics.jsonl").is_file():
            paths = plot_run(d)
        else:
            raise RunError(f"{d} is neither a run directory (metrics.jsonl) nor a compare directory (results.json)")
        print(f"{d}: wrote {', '.join(p.name for p in paths) or 'no charts (no logged steps)'}")
    return 0


def _compare_rows(path: Path) -> list[dict]:
    """The rows of a compare's results.json (one object per method), or one line saying what is wrong with it."""
    from ..run.report import read_json

    rows = read_json(path)
    if not (isinstance(rows, list) and all(isinstance(r, dict) and "method" in r for r in rows)):
        from ..run.train import RunError

        raise RunError(f"{path} is not a compare's results (expected a list with one object per method, each with "
                       f"`method`); `grass-ft compare` rewrites it")
    return rows


COMMANDS = {"train": cmd_train, "plan": cmd_plan, "eval": cmd_eval, "validate": cmd_validate,
            "prepare-model": cmd_prepare_model, "compare": cmd_compare, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    """Run one command; a :class:`~grass_ft.base.errors.UserError` is one line on stderr and exit code 2 (with
    ``--debug`` or ``GRASS_FT_DEBUG=1``: the traceback), Ctrl-C exits 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("GRASS_FT_DEBUG", "").lower() in ("1", "true", "yes", "on")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"grass-ft: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest)
    except UserError as e:
        if debug:
            raise
        print(f"grass-ft {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"grass-ft {cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
