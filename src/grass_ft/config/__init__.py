"""Typed run configuration: flat YAML plus ``key=value`` overrides, validated with every error reported at once.

Each field carries a one-line help (``metadata["help"]``) that ``grass-ft train --help`` prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..base.errors import UserError, not_utf8
from ..base.registry import METHODS, traits, with_fsdp


# Names a transformers Trainer / TRL user already knows, accepted as aliases where the meaning is the same;
# config.yaml is written with the canonical name on the right. Resolved before the unknown-key check.
ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "lr_schedule",
    "max_length": "max_seq_len",            # TRL SFTConfig
    "max_seq_length": "max_seq_len",        # TRL before 0.20
    "model_name_or_path": "model",          # TRL ModelConfig
    "dataset_name": "data",                 # TRL ScriptArguments
    "dataset_config": "data_config",
    "dataset_train_split": "data_split",
    "dataset_test_split": "eval_split",
    "resume_from_checkpoint": "resume",
    "bf16": "dtype",                        # bf16=true -> dtype=bfloat16 (see ALIAS_VALUES)
    "fp16": "dtype",
}
# Aliases whose value maps to a different value of the canonical key.
ALIAS_VALUES: dict[str, dict[bool, str]] = {"bf16": {True: "bfloat16", False: "float32"},
                                            "fp16": {True: "float16", False: "float32"}}


def resolve_aliases(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``raw`` with every alias of :data:`ALIASES` renamed to its canonical key, and the errors: an alias given
    together with its canonical key (or two aliases of one key), or a bad bf16/fp16 value."""
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    errors: list[str] = []
    for key, value in raw.items():
        canon = ALIASES.get(key, key)
        if canon in source:
            errors.append(f"`{key}` and `{source[canon]}` both set `{canon}`; give one (`{canon}` is the name "
                          f"config.yaml uses)")
            continue
        if key in ALIAS_VALUES:
            try:
                flag = _coerce(key, value, bool)
            except ValueError as e:
                errors.append(str(e))
                continue
            value = ALIAS_VALUES[key][flag]
        out[canon] = value
        source[canon] = key
    return out, errors


def _f(default: Any, help: str) -> Any:  # noqa: A002 - "help" is the natural name here
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything one ``grass-ft train`` run needs. Names follow the GRASS paper where it has one."""

    # what to train
    model: str = _f("smollm2-135m", "packaged model name, hub id or local directory of a causal LM")
    data: str = _f("gsm-mix", "training data: a generator (gsm-mix, gsm_symbolic, chain_sum, basic_arithmetic, "
                               "easy_arith), a .json/.jsonl/.parquet/.csv file, a data directory or a hub data set id, "
                               "in any format of data_format (docs/DATA.md)")
    eval_data: str | None = _f(None, "held-out data (file, directory, hub id or generator); unset or holdout: "
                                     "eval_samples rows held out of `data` (a generator: drawn from held-out seeds)")
    task: str = _f("gsm8k", "answer rule that scores the evaluation (gsm8k = last number within 0.001)")
    method: str = _f("auto", "fine-tuning method: auto (the most capable setting that fits the device and the "
                             "host, chosen at start by the planner: docs/PLAN.md), fft (full fine-tuning), "
                             "grass-uniform (GRASS's offloaded layer-wise training with uniform draws, no probe: the "
                             "layer-wise default), grass (the paper's importance sampling), grass-static, badam "
                             "(BAdam's cyclic order), lisa, lora, dora")
    # data sources and formats (docs/DATA.md), logging sinks
    data_format: str = _f("auto", "format of `data` and `eval_data` rows: auto (from the columns), alpaca, "
                                  "prompt_completion, messages, text")
    data_split: str = _f("train", "split of a hub data set or data directory used for training")
    eval_split: str = _f("test", "split of a hub data set or data directory given as `eval_data`")
    data_config: str | None = _f(None, "configuration (subset) name of a hub data set, e.g. main for gsm8k")
    chat_template: str | None = _f(None, "Jinja chat template (a .jinja file or the template text) for messages data "
                                         "when the model's tokenizer has none, or to replace its own")
    report_to: str = _f("none", "extra metric sinks besides metrics.jsonl: none, tensorboard, wandb (as its "
                                "WANDB_PROJECT / WANDB_ENTITY / WANDB_MODE say; offline without credentials), "
                                "comma-separated")
    run_name: str | None = _f(None, "the run's name in wandb and the model card (unset: the output directory's name)")
    # GRASS
    gamma: int | str = _f("auto", "γ: number of decoder blocks trainable at a time; auto: the largest that fits the "
                                  "device (docs/PLAN.md)")
    tau: float = _f(1.0, "τ: softmax temperature over the normalised MGN (large = uniform, small = top-γ)")
    alpha: float = _f(0.5, "α: EMA weight of the newest MGN window at each refresh, in (0, 1]")
    probe_steps: int = _f(4, "T_p: with probe_mode=train, steps each group of γ blocks trains while its gradients "
                             "are read; with measure, probe steps at the start (gradients read, nothing updated)")
    probe_mode: str = _f("train", "train: the first steps train the blocks γ at a time, all once, reading their "
                                  "gradients (as good as measure at 200 updates, no update lost: docs/DEFAULTS.md); "
                                  "measure: the paper's probe (every block's gradient read, nothing updated)")
    importance: str = _f("mgn", "block importance: mgn (the paper's mean gradient norm) or relative (MGN / the "
                                "block's own probe reading: how far its gradient has fallen; grass only)")
    count_probe_steps: bool = _f(True, "measuring-probe steps count toward max_steps (the paper's accounting); "
                                       "false: max_steps counts optimizer updates, the probe comes on top")
    sample_interval: int = _f(10, "T_s: steps between re-draws of the active blocks")
    update_interval: int = _f(20, "T_u: steps between refreshes of the sampling probabilities (adaptive grass only)")
    train_embeddings: bool = _f(True, "also train the input embeddings at every step, as LISA does (on by default: "
                                      "-0.10 nats at 200 updates, docs/DEFAULTS.md); false: the paper's layout")
    train_head: bool = _f(True, "also train the final norm and LM head at every step, as LISA does (on by default); with "
                                "tied embeddings the head is the embedding matrix, which is then trained too")
    reset_state_on_switch: bool = _f(False, "restart a block's Adam moments when it is re-drawn (BAdam) instead of resuming them")
    offload: bool | None = _f(None, "keep the optimizer state of blocks on the host, on the device only while they "
                                    "update (unset: on for grass, grass-static and grass-uniform, off for lisa as "
                                    "shipped and fft)")
    fsdp: bool = _f(False, "multi-process: shard weights, gradients and optimizer state with FSDP2 (each decoder "
                           "block its own fully_shard unit); grass, grass-static, lisa, fft (docs/DISTRIBUTED.md)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (non-reentrant, works with frozen "
                                             "lower blocks)")
    layers_attribute: str | None = _f(None, "dotted path of the decoder-block list (e.g. model.layers) for models not auto-detected")
    # memory planning (grass-ft plan; method=auto, gamma=auto)
    device_memory: str | None = _f(None, "device memory a setting may use, e.g. 24GiB or 80GB (unset: the free memory "
                                         "of the GPU, or the available RAM on a CPU-only machine)")
    host_memory: str | None = _f(None, "host memory for the optimizer state kept off the device, e.g. 64GiB (unset: "
                                       "the available RAM)")
    memory_margin: float = _f(0.1, "share of each memory budget method=auto / gamma=auto leave free, in [0, 1)")
    # LoRA / DoRA (peft); ignored by the other methods
    lora_r: int = _f(32, "LoRA/DoRA rank r (32 as in the DoRA/LLM-Adapters recipes; the GRASS paper's table uses 128)")
    lora_alpha: float | None = _f(None, "LoRA/DoRA scale numerator; the update is scaled by alpha / r (unset: 2 x lora_r)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA/DoRA input, in [0, 1)")
    lora_target_modules: str | None = _f(None, "comma-separated module names to adapt, e.g. q_proj,v_proj (unset: "
                                               "all-linear = every linear layer but the LM head)")
    merge_lora: bool = _f(False, "LoRA/DoRA: also save the adapter merged into the base weights, as final/merged/")
    # optimisation
    lr: float | None = _f(None, "peak learning rate (AdamW); unset: the method's best rate at 200 updates "
                                "(docs/DEFAULTS.md): " + ", ".join(f"{m} {t.lr:.0e}".replace("e-0", "e-")
                                                                   for m, t in METHODS.items()))
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    warmup_steps: int = _f(0, "linear warm-up steps after the probe (given > 0, it wins over warmup_ratio, as in "
                              "the Trainer)")
    warmup_ratio: float = _f(0.0, "share of the optimizer updates spent on linear warm-up, in [0, 1) (rounded up to "
                                  "whole steps, as the Trainer)")
    lr_schedule: str = _f("constant", "learning-rate shape after warm-up: constant, linear, cosine")
    max_grad_norm: float = _f(1.0, "global gradient-norm clipping (0 turns it off)")
    batch_size: int = _f(8, "examples per micro-batch (global batch = batch_size x grad_accum)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    max_seq_len: int = _f(256, "tokens per example after truncation (with packing: per packed row)")
    packing: bool = _f(False, "concatenate examples into rows of max_seq_len tokens (TRL's packing, best-fit "
                              "decreasing), attention kept within each example (position ids restart per example; "
                              "docs/DATA.md)")
    attn_implementation: str = _f("auto", "attention kernel: auto (transformers' default for the model, sdpa where "
                                          "supported), eager, sdpa, flash_attention_2, flash_attention_3, "
                                          "flex_attention")
    max_steps: int | None = _f(None, "optimizer steps in all, probe steps included (unset: 30, or the steps of "
                                     "num_train_epochs; given, it wins over num_train_epochs, as in the Trainer)")
    num_train_epochs: float | None = _f(None, "passes over the training data, fractional allowed (sets max_steps "
                                              "unless max_steps is given)")
    train_samples: int = _f(2000, "examples to generate when `data` is a generator")
    train_on_inputs: bool = _f(False, "compute the loss on the prompt tokens too")
    supervised_only_loss: bool = _f(True, "run the LM head and cross-entropy only at positions with a label, in "
                                          "chunks (false: full logits at every position, as model(**batch).loss)")
    max_bad_steps: int = _f(5, "stop after this many consecutive steps with a non-finite loss or gradient")
    seed: int = _f(42, "seed for data order, block draws and initialisation")
    dtype: str = _f("auto", "parameter dtype: auto (bfloat16 on a GPU that supports it, float16 on one that does "
                            "not, float32 on a CPU, where it is fastest), float32, bfloat16, float16 (with dynamic "
                            "loss scaling); the Trainer's bf16=true / fp16=true map here")
    master_weights: bool = _f(True, "bfloat16/float16 parameters train against fp32 master copies kept with the "
                                    "optimizer state (false: pure-bf16 AdamW as LISA/FFT ship, which loses small "
                                    "updates; float16 needs them)")
    # evaluation and output
    eval_samples: int = _f(32, "held-out examples to evaluate before and after training (0 turns evaluation off)")
    eval_batch_size: int = _f(16, "examples per evaluation batch")
    eval_before: bool = _f(True, "also evaluate the model as loaded, before training (off: the baseline is known)")
    eval_steps: int = _f(0, "also evaluate the held-out data every N steps while training (eval_loss, and accuracy "
                            "where the task has an answer rule) into metrics.jsonl and report_to (0: only before and "
                            "after)")
    metric_for_best_model: str = _f("eval_loss", "what makes an evaluation better: eval_loss (lower) or eval_accuracy "
                                                 "(higher)")
    load_best_model_at_end: bool | None = _f(None, "final/ holds the weights of the best evaluation during training "
                                                   "instead of the last step's (unset: on with "
                                                   "early_stopping_patience, as the Trainer requires)")
    early_stopping_patience: int = _f(0, "stop after this many evaluations in a row without improving "
                                         "metric_for_best_model (0: never)")
    eval_loss_only_tasks: str = _f("", "comma-separated held-out tasks scored by eval loss only, without "
                                       "generation (e.g. long chain-of-thought whose accuracy does not move)")
    max_new_tokens: int = _f(128, "generation budget per evaluated example")
    output_dir: str = _f("runs/grass-ft", "where config.yaml, metrics.jsonl, layers.jsonl, summary.json, the plots "
                                          "and final/ go")
    save_dtype: str = _f("auto", "dtype of the weights in final/: auto (the training dtype), float32, bfloat16, "
                                 "float16")
    logging_steps: int = _f(1, "write a metrics.jsonl line every N steps")
    save_steps: int = _f(0, "write a checkpoint every N steps (0: none; final/ is always written)")
    save_total_limit: int = _f(2, "keep only the newest N checkpoints (0: keep all)")
    resume: str | None = _f(None, "resume from `auto` (the newest complete checkpoint in output_dir) or a checkpoint path")
    overwrite_output_dir: bool = _f(False, "replace a previous run in output_dir (without it a directory that "
                                           "holds a run is refused, unless `resume` continues it)")

    def __post_init__(self) -> None:
        # `lr` unset takes the method's own rate (the registry's); dataclasses.replace(cfg, method=...) keeps the
        # rate already resolved, as it keeps every other key. With method=auto it stays unset until the planner
        # has chosen the method (grass_ft.planner.resolve).
        if self.lr is None and self.method != "auto":
            self.lr = traits(self.method).lr
        # `max_steps` unset is 30 steps, unless num_train_epochs is set: then the run resolves it from the data's
        # size at its start (grass_ft.recipe), as the Trainer's max_steps=-1
        if self.max_steps is None and self.num_train_epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS
        if isinstance(self.metric_for_best_model, str) and not self.metric_for_best_model.startswith("eval_"):
            self.metric_for_best_model = "eval_" + self.metric_for_best_model  # the Trainer's rule: loss = eval_loss

    @property
    def auto(self) -> bool:
        """``method``, or the ``gamma`` of a layer-sampling method, is still ``auto`` (resolved once, at the start of
        a run; a method that samples no layers reads no ``gamma``)."""
        return self.method == "auto" or (self.gamma == "auto" and bool(traits(self.method).sampling))

    @property
    def held_out_split(self) -> bool:
        """The held-out examples come from ``data`` itself (``eval_data`` unset or ``holdout``)."""
        from ..data.loading import holds_out

        return holds_out(self)

    @classmethod
    def help_lines(cls) -> list[str]:
        aliases: dict[str, list[str]] = {}
        for a, c in ALIASES.items():
            aliases.setdefault(c, []).append(a)
        return [f"  {f.name:<24} {f.metadata['help']} (default: {f.default!r})"
                + (f" [alias: {', '.join(aliases[f.name])}]" if f.name in aliases else "")
                for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_MAX_STEPS = 30
HOLDOUT = "holdout"  # eval_data: rows held out of `data` (what config.yaml writes for the default)


def holds_out(cfg: Any) -> bool:
    """The held-out examples come from ``data`` itself: ``eval_data`` unset or ``holdout`` (any object with the
    configuration's attributes)."""
    return getattr(cfg, "eval_data", None) in (None, HOLDOUT)
AUTO_KEYS = ("method", "gamma")  # keys whose value may be `auto`: chosen by the planner at the start of a run
LR_SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: resolved once at the start (grass_ft.recipe)
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
BEST_METRICS = {"eval_loss": False, "eval_accuracy": True}  # metric -> greater is better
DATA_FORMATS = ("auto", "alpaca", "prompt_completion", "messages", "text")  # grass_ft.formats.FORMATS + auto
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
REPORT_TO = ("none", "tensorboard", "wandb")


class ConfigError(UserError, ValueError):
    """One or more configuration errors; ``errors`` holds each message, ``str()`` lists them all (one error: one
    line, as every other bad input gets)."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        if len(self.errors) == 1:
            super().__init__(f"invalid configuration: {self.errors[0]}")
        else:
            super().__init__("invalid configuration:\n" + "\n".join(f"  - {e}" for e in self.errors))


def unknown_key_message(key: str, known: typing.Iterable[str]) -> str:
    """"unknown key `gama` (did you mean `gamma`?)", or the list of known keys when nothing is close."""
    known = sorted(known)
    plain = {k.replace("_", ""): k for k in known}
    close = ([plain[key.replace("_", "").replace("-", "")]] if key.replace("_", "").replace("-", "") in plain
             else difflib.get_close_matches(key, known, n=1, cutoff=0.75))
    if close:
        return f"unknown key `{key}` (did you mean `{close[0]}`?)"
    return f"unknown key `{key}`; known keys: {', '.join(known)}"


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ValueError naming what is allowed."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(key, value, args[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"`{key}` must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"`{key}` must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"`{key}` must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"`{key}` must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"`{key}` must be a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"`{key}` must be a string, got {value!r}")
        return str(value)
    return value


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["gamma=4", "tau=0.5"]`` -> ``{"gamma": "4", "tau": "0.5"}``; a bare word is an error."""
    out: dict[str, str] = {}
    errors = []
    for a in args:
        if "=" not in a:
            errors.append(f"argument {a!r} is not key=value")
            continue
        k, v = a.split("=", 1)
        out[k.strip()] = v
    if errors:
        raise ConfigError(errors)
    return out


def build_config(config_file: str | None = None, overrides: dict[str, Any] | None = None,
                 num_blocks: int | None = None, known_methods: typing.Sequence[str] = (),
                 auto_method: bool = True) -> TrainConfig:
    """Merge a YAML file and ``key=value`` overrides into a validated :class:`TrainConfig`.

    Raises:
        ConfigError: listing every unknown key, wrong type and out-of-range value at once.
    """
    raw: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError([f"config file {path}: {e.strerror}"]) from None
        except UnicodeDecodeError as e:
            raise ConfigError([not_utf8(path, e)]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"config file {path}: not valid YAML ({e})"]) from None
        if not isinstance(loaded, dict):
            raise ConfigError([f"config file {path}: expected a mapping of key: value, got {type(loaded).__name__}"])
        raw.update(loaded)
    # aliases resolve within the file and within the overrides, so that an override wins either way
    raw, errors = resolve_aliases(raw)
    over, over_errors = resolve_aliases(dict(overrides or {}))
    raw.update(over)
    errors.extend(over_errors)

    hints = _field_types(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            errors.append(unknown_key_message(str(key), known))
            continue
        if key in AUTO_KEYS and str(value).strip().lower() == "auto":
            values[key] = "auto"
            continue
        try:
            values[key] = _coerce(key, value, int if key == "gamma" else hints[key])
        except ValueError as e:
            errors.append(str(e))
    cfg = TrainConfig(**values)
    errors.extend(validate(cfg, num_blocks, known_methods, skip=set(raw) - set(values), auto_method=auto_method))
    if errors:
        raise ConfigError(errors)
    return cfg


# The paper's settings where this project's defaults departed from them (docs/DEFAULTS.md), for what must mean the
# paper's GRASS whatever the defaults (benchmark arms, recorded runs): its layout (embeddings and head frozen) and
# its measuring probe (the first probe_steps steps read every block's gradient and update nothing).
PAPER_LAYOUT = {"train_embeddings": False, "train_head": False}
PAPER_PROBE = {"probe_mode": "measure"}


# Keys only the layer-sampling methods read (registry.with_sampling()); fft, lora and dora ignore them.
SAMPLING_KEYS = ("gamma", "tau", "alpha", "probe_steps", "probe_mode", "importance", "count_probe_steps",
                 "sample_interval", "update_interval", "train_embeddings", "train_head", "reset_state_on_switch")


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
    """Every range and consistency error of ``cfg``.

    ``num_blocks`` (once the model is known) bounds gamma; ``known_methods`` comes from the method registry,
    which sits above this module, so the caller passes it in.
    """
    errs: list[str] = non_finite_errors(cfg, skip or set())
    skip = (skip or set()) | {e.split("`")[1] for e in errs}  # one error per key: inf is not also "must be > 0"

    def check(key: str, ok: bool, msg: str) -> None:
        if key not in skip and not ok:
            errs.append(f"`{key}` {msg}, got {getattr(cfg, key)!r}")

    if known_methods:  # auto_method: the planner may choose (grass-ft train); not where the front end fixes it
        check("method", (auto_method and cfg.method == "auto") or cfg.method in known_methods,
              f"must be {'auto or ' if auto_method else ''}one of {', '.join(known_methods)}")
    if cfg.gamma == "auto":
        pass
    elif not isinstance(cfg.gamma, int):
        check("gamma", False, "must be an integer or auto")
    elif num_blocks is not None:
        check("gamma", 1 <= cfg.gamma <= num_blocks,
              f"must be between 1 and {num_blocks} (the model has {num_blocks} decoder blocks)")
    else:
        check("gamma", cfg.gamma >= 1, "must be at least 1")
    check("tau", math.isfinite(cfg.tau) and cfg.tau > 0, "must be > 0")
    check("alpha", 0 < cfg.alpha <= 1, "must be in (0, 1]")
    check("probe_steps", cfg.probe_steps >= 0, "must be >= 0")
    t = traits(cfg.method)
    if t.measures and not t.refreshes:
        check("probe_steps", cfg.probe_steps >= 1, f"must be >= 1 for method {cfg.method} (its probabilities come "
                                                   "from the probe alone)")
    check("probe_mode", cfg.probe_mode in ("measure", "train"), "must be measure or train")
    check("importance", cfg.importance in ("mgn", "relative"), "must be mgn or relative")
    if cfg.importance == "relative":
        check("method", t.refreshes, "must be grass with importance=relative (GRASS* never refreshes, "
                                     "so its relative importance would stay uniform)")
    if t.measures and cfg.probe_mode == "train":
        check("probe_steps", cfg.probe_steps >= 1, "must be >= 1 with probe_mode=train (steps per group)")
    if t.measures and cfg.count_probe_steps and cfg.probe_mode == "measure" and cfg.max_steps is not None:
        check("probe_steps", cfg.probe_steps < cfg.max_steps, f"must be below max_steps={cfg.max_steps} "
                                                              f"(probe steps count toward max_steps)")
    check("sample_interval", cfg.sample_interval >= 1, "must be >= 1")
    check("update_interval", cfg.update_interval >= 1, "must be >= 1")
    check("lr", cfg.lr is None or (math.isfinite(cfg.lr) and cfg.lr > 0), "must be > 0")
    for key in ("device_memory", "host_memory"):
        if key not in skip and getattr(cfg, key) is not None:
            try:
                parse_size(key, getattr(cfg, key))
            except ConfigError as e:
                errs.extend(e.errors)
    check("memory_margin", 0 <= cfg.memory_margin < 1, "must be in [0, 1)")
    check("weight_decay", cfg.weight_decay >= 0, "must be >= 0")
    check("warmup_steps", cfg.warmup_steps >= 0, "must be >= 0")
    check("lr_schedule", cfg.lr_schedule in LR_SCHEDULES, f"must be one of {', '.join(LR_SCHEDULES)}")
    check("max_grad_norm", cfg.max_grad_norm >= 0, "must be >= 0 (0 turns clipping off)")
    check("batch_size", cfg.batch_size >= 1, "must be >= 1")
    check("grad_accum", cfg.grad_accum >= 1, "must be >= 1")
    check("max_seq_len", cfg.max_seq_len >= 8, "must be >= 8")
    check("max_steps", cfg.max_steps is None or cfg.max_steps >= 1, "must be >= 1")
    check("num_train_epochs", cfg.num_train_epochs is None or cfg.num_train_epochs > 0,
          "must be > 0 (fractional allowed: 0.5 is half a pass over the data)")
    check("warmup_ratio", 0 <= cfg.warmup_ratio < 1, "must be in [0, 1) (a share of the optimizer updates)")
    check("packing", not cfg.packing or cfg.max_seq_len >= 16, "needs max_seq_len >= 16 (rows to pack into)")
    check("attn_implementation", cfg.attn_implementation in ATTN_IMPLEMENTATIONS,
          f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    check("save_dtype", cfg.save_dtype in SAVE_DTYPES, f"must be one of {', '.join(SAVE_DTYPES)}")
    check("eval_steps", cfg.eval_steps >= 0, "must be >= 0 (0: evaluate only before and after training)")
    if cfg.eval_steps > 0:
        check("eval_steps", not cfg.fsdp, "does not work with fsdp=true yet (rank 0 would evaluate a sharded model "
                                          "alone): evaluation before and after training still runs")
        check("eval_steps", cfg.eval_samples > 0, f"needs held-out data, but eval_samples=0 (set eval_samples=N; "
                                                  f"eval_data=FILE or a held-out split of `data` gives them)")
    check("metric_for_best_model", cfg.metric_for_best_model in BEST_METRICS,
          f"must be one of {', '.join(BEST_METRICS)} (or loss, accuracy)")
    check("early_stopping_patience", cfg.early_stopping_patience >= 0, "must be >= 0 (0: never stop early)")
    if cfg.early_stopping_patience > 0:
        check("early_stopping_patience", cfg.eval_steps > 0, "counts evaluations, so it needs eval_steps > 0")
    if cfg.load_best_model_at_end:
        check("load_best_model_at_end", cfg.eval_steps > 0, "needs evaluations during training: set eval_steps > 0")
        check("load_best_model_at_end", not cfg.fsdp, "does not work with fsdp=true yet (the best weights would be "
                                                      "gathered at every improvement); drop one of them")
    check("train_samples", cfg.train_samples >= 1, "must be >= 1")
    check("max_bad_steps", cfg.max_bad_steps >= 1, "must be >= 1")
    check("dtype", cfg.dtype in DTYPES, f"must be one of {', '.join(DTYPES)}")
    if cfg.dtype == "float16":
        check("master_weights", cfg.master_weights, "must be true with dtype=float16 (the loss scaler unscales the "
                                                    "fp16 gradients into the fp32 masters; pure fp16 AdamW loses "
                                                    "most updates)")
        check("dtype", not cfg.fsdp, "float16 does not work with fsdp=true yet (untested): use bfloat16")
    check("eval_samples", cfg.eval_samples >= 0, "must be >= 0 (0 turns evaluation off)")
    check("eval_batch_size", cfg.eval_batch_size >= 1, "must be >= 1")
    check("max_new_tokens", cfg.max_new_tokens >= 1, "must be >= 1")
    check("logging_steps", cfg.logging_steps >= 1, "must be >= 1")
    check("lora_r", cfg.lora_r >= 1, "must be >= 1")
    check("lora_alpha", cfg.lora_alpha is None or (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0),
          "must be > 0 (unset: 2 x lora_r)")
    check("lora_dropout", 0 <= cfg.lora_dropout < 1, "must be in [0, 1)")
    check("lora_target_modules", cfg.lora_target_modules is None or bool(lora_targets(cfg.lora_target_modules)),
          "must be comma-separated module names such as q_proj,v_proj, or unset for all-linear")
    check("fsdp", not cfg.fsdp or cfg.method == "auto" or t.fsdp,
          f"works with method {', '.join(with_fsdp())} (not {cfg.method}: peft adapters are not sharded yet)")
    check("save_steps", cfg.save_steps >= 0, "must be >= 0 (0: no checkpoints)")
    check("save_total_limit", cfg.save_total_limit >= 0, "must be >= 0 (0: keep all)")
    check("data", bool(cfg.data), "must name a generator, a file, a directory or a hub data set")
    check("output_dir", bool(str(cfg.output_dir).strip()), "must name a directory (empty would write the run into "
                                                           "the current directory)")
    if "data" not in skip and cfg.data and cfg.data.endswith(DATA_FILE_SUFFIXES) and not Path(cfg.data).is_file():
        errs.append(f"`data` file {cfg.data!r} does not exist")
    if cfg.eval_data and cfg.eval_data.endswith(DATA_FILE_SUFFIXES) and not Path(cfg.eval_data).is_file():
        errs.append(f"`eval_data` file {cfg.eval_data!r} does not exist")
    check("data_format", cfg.data_format in DATA_FORMATS, f"must be one of {', '.join(DATA_FORMATS)}")
    sinks = [s.strip() for s in cfg.report_to.split(",")]
    check("report_to", all(s in REPORT_TO for s in sinks), f"must be one or more (comma-separated) of "
                                                           f"{', '.join(REPORT_TO)}")
    for sink in ("tensorboard", "wandb"):
        if "report_to" not in skip and sink in sinks and importlib.util.find_spec(sink) is None:
            errs.append(f"`report_to` {sink} needs the `{sink}` package (pip install {sink})")
    if "task" not in skip:
        try:
            from ..base.tasks import canonical_task

            canonical_task(cfg.task)
        except ImportError:
            pass
        except ValueError as e:
            errs.append(f"`task`: {e}")
    return errs


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


def lora_targets(spec: str | None) -> list[str] | str:
    """``lora_target_modules`` as peft wants it: a list of names, or ``"all-linear"`` when unset."""
    if spec is None or spec.strip() == "all-linear":
        return "all-linear"
    return [t.strip() for t in spec.split(",") if t.strip()]


def save_config(cfg: TrainConfig | dict[str, Any], path: str | Path) -> None:
    """config.yaml: a configuration, or the resolved record of a run (grass_ft.recipe.filled)."""
    Path(path).write_text(yaml.safe_dump(cfg if isinstance(cfg, dict) else cfg.to_dict(), sort_keys=False))
