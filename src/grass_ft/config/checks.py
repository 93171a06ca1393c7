"""Validation of a :class:`~grass_ft.config.keys.TrainConfig`: every error at once, each naming the key, the bad
value and what is allowed (torchtune's ``tune validate``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from pathlib import Path
from typing import Any

from ..base.errors import UserError
from ..base.registry import traits, with_fsdp
from ..base.tasks import canonical_task
from .keys import (ATTN_IMPLEMENTATIONS, BEST_METRICS, DATA_FILE_SUFFIXES, DATA_FORMATS, DTYPES, LR_SCHEDULES,
                   REPORT_TO, SAMPLING_KEYS, SAVE_DTYPES, TrainConfig, lora_targets)


class ConfigError(UserError, ValueError):
    """One or more configuration errors; ``errors`` holds each message, ``str()`` lists them all (one error: one
    line, as every other bad input gets)."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        if len(self.errors) == 1:
            super().__init__(f"invalid configuration: {self.errors[0]}")
        else:
            super().__init__("invalid configuration:\n" + "\n".join(f"  - {e}" for e in self.errors))


def ignored_keys_warning(cfg: TrainConfig) -> str | None:
    """One line when layer-sampling keys are set away from their defaults for a method that samples no layers
    (e.g. ``gamma=8`` with the default ``fft``), which would otherwise be ignored silently; None otherwise."""
    if traits(cfg.method).sampling or cfg.method == "auto":  # auto may choose a layer-sampling method
        return None
    defaults = TrainConfig()
    changed = [f"{k}={getattr(cfg, k)}" for k in SAMPLING_KEYS if getattr(cfg, k) != getattr(defaults, k)]
    if not changed:
        return None
    return (f"{', '.join(changed)}: for the layer-sampling methods only; method={cfg.method} trains every "
            f"{'adapter' if cfg.method in ('lora', 'dora') else 'parameter'} and ignores "
            f"{'them' if len(changed) > 1 else 'it'} (method=grass-uniform trains gamma blocks at a time)")


def validate(cfg: TrainConfig, num_blocks: int | None = None, known_methods: typing.Sequence[str] = (),
             skip: set[str] | None = None, auto_method: bool = True) -> list[str]:
    """Every range and consistency error of ``cfg``, one concern after another (:data:`CONCERNS`).

    ``num_blocks`` (once the model is known) bounds gamma; ``known_methods`` comes from the method registry,
    which sits above this module, so the caller passes it in.
    """
    errs: list[str] = non_finite_errors(cfg, skip or set())
    skip = (skip or set()) | {e.split("`")[1] for e in errs}  # one error per key: inf is not also "must be > 0"
    c = Checks(cfg, skip, errs, num_blocks, tuple(known_methods), auto_method)
    for concern in CONCERNS:
        concern(c)
    return errs


@dataclasses.dataclass
class Checks:
    """What the checks of one configuration share: the errors found so far and the keys not to check again."""

    cfg: TrainConfig
    skip: set[str]  # keys that already have an error (or did not parse)
    errors: list[str]
    num_blocks: int | None = None
    known_methods: tuple[str, ...] = ()
    auto_method: bool = True

    def check(self, key: str, ok: bool, msg: str) -> None:
        """An error ``"`key` msg, got value"`` unless ``ok`` (or ``key`` has one already)."""
        if key not in self.skip and not ok:
            self.errors.append(f"`{key}` {msg}, got {getattr(self.cfg, key)!r}")

    def add(self, key: str, message: str) -> None:
        """An error in a wording of its own, unless ``key`` has one already."""
        if key not in self.skip:
            self.errors.append(message)


# ------------------------------------------------------------------------ one check per group of keys (keys.py)


def check_method(c: Checks) -> None:
    """``method``, the layer-sampling keys (GRASS: gamma, tau, alpha, the probe, the intervals) and ``fsdp``."""
    cfg, t = c.cfg, traits(c.cfg.method)
    if c.known_methods:  # auto_method: the planner may choose (grass-ft train); not where the front end fixes it
        c.check("method", (c.auto_method and cfg.method == "auto") or cfg.method in c.known_methods,
                f"must be {'auto or ' if c.auto_method else ''}one of {', '.join(c.known_methods)}")
    if cfg.gamma == "auto":
        pass
    elif not isinstance(cfg.gamma, int):
        c.check("gamma", False, "must be an integer or auto")
    elif c.num_blocks is not None:
        c.check("gamma", 1 <= cfg.gamma <= c.num_blocks,
                f"must be between 1 and {c.num_blocks} (the model has {c.num_blocks} decoder blocks)")
    else:
        c.check("gamma", cfg.gamma >= 1, "must be at least 1")
    c.check("tau", math.isfinite(cfg.tau) and cfg.tau > 0, "must be > 0")
    c.check("alpha", 0 < cfg.alpha <= 1, "must be in (0, 1]")
    c.check("probe_steps", cfg.probe_steps >= 0, "must be >= 0")
    if t.measures and not t.refreshes:
        c.check("probe_steps", cfg.probe_steps >= 1, f"must be >= 1 for method {cfg.method} (its probabilities come "
                                                     "from the probe alone)")
    c.check("probe_mode", cfg.probe_mode in ("measure", "train"), "must be measure or train")
    c.check("importance", cfg.importance in ("mgn", "relative"), "must be mgn or relative")
    if cfg.importance == "relative":
        c.check("method", t.refreshes, "must be grass with importance=relative (GRASS* never refreshes, "
                                       "so its relative importance would stay uniform)")
    if t.measures and cfg.probe_mode == "train":
        c.check("probe_steps", cfg.probe_steps >= 1, "must be >= 1 with probe_mode=train (steps per group)")
    if t.measures and cfg.count_probe_steps and cfg.probe_mode == "measure" and cfg.max_steps is not None:
        c.check("probe_steps", cfg.probe_steps < cfg.max_steps, f"must be below max_steps={cfg.max_steps} "
                                                                f"(probe steps count toward max_steps)")
    c.check("sample_interval", cfg.sample_interval >= 1, "must be >= 1")
    c.check("update_interval", cfg.update_interval >= 1, "must be >= 1")
    c.check("fsdp", not cfg.fsdp or cfg.method == "auto" or t.fsdp,
            f"works with method {', '.join(with_fsdp())} (not {cfg.method}: peft adapters are not sharded yet)")


def check_memory(c: Checks) -> None:
    """The budgets of memory planning (``method=auto``, ``gamma=auto``, ``grass-ft plan``)."""
    for key in ("device_memory", "host_memory"):
        if key not in c.skip and getattr(c.cfg, key) is not None:
            try:
                parse_size(key, getattr(c.cfg, key))
            except ConfigError as e:
                c.errors.extend(e.errors)
    c.check("memory_margin", 0 <= c.cfg.memory_margin < 1, "must be in [0, 1)")


def check_lora(c: Checks) -> None:
    """LoRA / DoRA (peft)."""
    cfg = c.cfg
    c.check("lora_r", cfg.lora_r >= 1, "must be >= 1")
    c.check("lora_alpha", cfg.lora_alpha is None or (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0),
            "must be > 0 (unset: 2 x lora_r)")
    c.check("lora_dropout", 0 <= cfg.lora_dropout < 1, "must be in [0, 1)")
    c.check("lora_target_modules", cfg.lora_target_modules is None or bool(lora_targets(cfg.lora_target_modules)),
            "must be comma-separated module names such as q_proj,v_proj, or unset for all-linear")


def check_optimisation(c: Checks) -> None:
    """The optimizer, the schedule, batches and sequence length, steps, precision."""
    cfg = c.cfg
    c.check("lr", cfg.lr is None or (math.isfinite(cfg.lr) and cfg.lr > 0), "must be > 0")
    c.check("weight_decay", cfg.weight_decay >= 0, "must be >= 0")
    c.check("warmup_steps", cfg.warmup_steps >= 0, "must be >= 0")
    c.check("warmup_ratio", 0 <= cfg.warmup_ratio < 1, "must be in [0, 1) (a share of the optimizer updates)")
    c.check("lr_schedule", cfg.lr_schedule in LR_SCHEDULES, f"must be one of {', '.join(LR_SCHEDULES)}")
    c.check("max_grad_norm", cfg.max_grad_norm >= 0, "must be >= 0 (0 turns clipping off)")
    c.check("batch_size", cfg.batch_size >= 1, "must be >= 1")
    c.check("grad_accum", cfg.grad_accum >= 1, "must be >= 1")
    c.check("max_seq_len", cfg.max_seq_len >= 8, "must be >= 8")
    c.check("packing", not cfg.packing or cfg.max_seq_len >= 16, "needs max_seq_len >= 16 (rows to pack into)")
    c.check("attn_implementation", cfg.attn_implementation in ATTN_IMPLEMENTATIONS,
            f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    c.check("max_steps", cfg.max_steps is None or cfg.max_steps >= 1, "must be >= 1")
    c.check("num_train_epochs", cfg.num_train_epochs is None or cfg.num_train_epochs > 0,
            "must be > 0 (fractional allowed: 0.5 is half a pass over the data)")
    c.check("train_samples", cfg.train_samples >= 1, "must be >= 1")
    c.check("max_bad_steps", cfg.max_bad_steps >= 1, "must be >= 1")
    c.check("dtype", cfg.dtype in DTYPES, f"must be one of {', '.join(DTYPES)}")
    if cfg.dtype == "float16":
        c.check("master_weights", cfg.master_weights, "must be true with dtype=float16 (the loss scaler unscales the "
                                                      "fp16 gradients into the fp32 masters; pure fp16 AdamW loses "
                                                      "most updates)")
        c.check("dtype", not cfg.fsdp, "float16 does not work with fsdp=true yet (untested): use bfloat16")


def check_evaluation(c: Checks) -> None:
    """Evaluation before, during and after training; the best model and early stopping; the answer rule."""
    cfg = c.cfg
    c.check("eval_samples", cfg.eval_samples >= 0, "must be >= 0 (0 turns evaluation off)")
    c.check("eval_batch_size", cfg.eval_batch_size >= 1, "must be >= 1")
    c.check("max_new_tokens", cfg.max_new_tokens >= 1, "must be >= 1")
    c.check("eval_steps", cfg.eval_steps >= 0, "must be >= 0 (0: evaluate only before and after training)")
    if cfg.eval_steps > 0:
        c.check("eval_steps", not cfg.fsdp, "does not work with fsdp=true yet (rank 0 would evaluate a sharded "
                                            "model alone): evaluation before and after training still runs")
        c.check("eval_steps", cfg.eval_samples > 0, f"needs held-out data, but eval_samples=0 (set eval_samples=N; "
                                                    f"eval_data=FILE or a held-out split of `data` gives them)")
    c.check("metric_for_best_model", cfg.metric_for_best_model in BEST_METRICS,
            f"must be one of {', '.join(BEST_METRICS)} (or loss, accuracy)")
    c.check("early_stopping_patience", cfg.early_stopping_patience >= 0, "must be >= 0 (0: never stop early)")
    if cfg.early_stopping_patience > 0:
        c.check("early_stopping_patience", cfg.eval_steps > 0, "counts evaluations, so it needs eval_steps > 0")
    if cfg.load_best_model_at_end:
        c.check("load_best_model_at_end", cfg.eval_steps > 0, "needs evaluations during training: set eval_steps > 0")
        c.check("load_best_model_at_end", not cfg.fsdp, "does not work with fsdp=true yet (the best weights would "
                                                        "be gathered at every improvement); drop one of them")
    if "task" not in c.skip:
        try:
            canonical_task(cfg.task)
        except ValueError as e:
            c.errors.append(f"`task`: {e}")


def check_data(c: Checks) -> None:
    """The data sources and their format."""
    cfg = c.cfg
    c.check("data", bool(cfg.data), "must name a generator, a file, a directory or a hub data set")
    if cfg.data and cfg.data.endswith(DATA_FILE_SUFFIXES) and not Path(cfg.data).is_file():
        c.add("data", f"`data` file {cfg.data!r} does not exist")
    if cfg.eval_data and cfg.eval_data.endswith(DATA_FILE_SUFFIXES) and not Path(cfg.eval_data).is_file():
        c.errors.append(f"`eval_data` file {cfg.eval_data!r} does not exist")
    c.check("data_format", cfg.data_format in DATA_FORMATS, f"must be one of {', '.join(DATA_FORMATS)}")


def check_output(c: Checks) -> None:
    """What a run writes: the output directory, checkpoints, logs, saved weights, metric sinks."""
    cfg = c.cfg
    c.check("output_dir", bool(str(cfg.output_dir).strip()), "must name a directory (empty would write the run "
                                                             "into the current directory)")
    c.check("save_dtype", cfg.save_dtype in SAVE_DTYPES, f"must be one of {', '.join(SAVE_DTYPES)}")
    c.check("logging_steps", cfg.logging_steps >= 1, "must be >= 1")
    c.check("save_steps", cfg.save_steps >= 0, "must be >= 0 (0: no checkpoints)")
    c.check("save_total_limit", cfg.save_total_limit >= 0, "must be >= 0 (0: keep all)")
    sinks = [s.strip() for s in cfg.report_to.split(",")]
    c.check("report_to", all(s in REPORT_TO for s in sinks), f"must be one or more (comma-separated) of "
                                                             f"{', '.join(REPORT_TO)}")
    for sink in ("tensorboard", "wandb"):
        if sink in sinks and importlib.util.find_spec(sink) is None:
            c.add("report_to", f"`report_to` {sink} needs the `{sink}` package (pip install {sink})")


# In the order of the key groups of TrainConfig; a new key's check goes into its group's function.
CONCERNS = (check_method, check_memory, check_lora, check_optimisation, check_evaluation, check_data, check_output)


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(key: str, text: str | int | float) -> int:
    """Bytes of ``24GiB`` / ``80 GB`` / ``512MiB`` (GB = 10^9 B, GiB = 2^30 B: card vendors print the first,
    ``nvidia-smi`` and torch the second).

    Raises:
        ConfigError: one line naming ``key``, the value and the allowed form.
    """
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS or float(m.group(1)) <= 0:
        hint = " (add a unit)" if m is not None and not unit else ""
        raise ConfigError([f"`{key}` must be a size such as 24GiB or 80GB (units: {', '.join(_SIZE_UNITS)}; "
                           f"GB = 10^9 bytes, GiB = 2^30), got {text!r}{hint}"])
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def non_finite_errors(cfg: Any, skip: set[str] = frozenset()) -> list[str]:
    """An error for every float key holding ``inf`` or ``nan`` (``float("inf")`` parses, and ``weight_decay=inf``
    once trained 4 steps into a model of NaN that exited 0: issue 28); range checks never see such a value."""
    return [f"`{f.name}` must be a finite number, got {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
            if f.name not in skip and isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name))]
