"""The run's keys: :class:`TrainConfig` (typed, a one-line help per key, grouped by concern), the values each key
allows, and the names a ``transformers.Trainer`` user already knows (:data:`ALIASES`).

Each key's check stands in :mod:`grass_ft.config.checks`, in a function per group of keys below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..base.registry import METHODS, traits

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


def _f(default: Any, help: str) -> Any:  # noqa: A002 - "help" is the natural name here
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything one ``grass-ft train`` run needs. Names follow the GRASS paper where it has one."""

    # what to train (checks: config.checks.check_method, check_data, check_evaluation for `task`)
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
                             "layer-wise default), grass (the paper's importance sampling by MGN; it did not beat "
                             "uniform draws on SmolLM2-135M: docs/RESULTS.md), grass-static, badam "
                             "(BAdam's cyclic order), lisa, lora, dora")
    # data sources and formats (docs/DATA.md), logging sinks (checks: check_data, check_output)
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
    # GRASS (checks: check_method)
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
                                    "update (unset: on for grass, grass-static, grass-uniform and badam, off for lisa "
                                    "as shipped and fft)")
    fsdp: bool = _f(False, "multi-process: shard weights, gradients and optimizer state with FSDP2 (each decoder "
                           "block its own fully_shard unit); grass, grass-static, grass-uniform, lisa, fft "
                           "(docs/DISTRIBUTED.md)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (non-reentrant, works with frozen "
                                             "lower blocks)")
    layers_attribute: str | None = _f(None, "dotted path of the decoder-block list (e.g. model.layers) for models not auto-detected")
    # memory planning (grass-ft plan; method=auto, gamma=auto; checks: check_memory)
    device_memory: str | None = _f(None, "device memory a setting may use, e.g. 24GiB or 80GB (unset: the free memory "
                                         "of the GPU, or the available RAM on a CPU-only machine)")
    host_memory: str | None = _f(None, "host memory for the optimizer state kept off the device, e.g. 64GiB (unset: "
                                       "the available RAM)")
    memory_margin: float = _f(0.1, "share of each memory budget method=auto / gamma=auto leave free, in [0, 1)")
    # LoRA / DoRA (peft); ignored by the other methods (checks: check_lora)
    lora_r: int = _f(32, "LoRA/DoRA rank r (32 as in the DoRA/LLM-Adapters recipes; the GRASS paper's table uses 128)")
    lora_alpha: float | None = _f(None, "LoRA/DoRA scale numerator; the update is scaled by alpha / r (unset: 2 x lora_r)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA/DoRA input, in [0, 1)")
    lora_target_modules: str | None = _f(None, "comma-separated module names to adapt, e.g. q_proj,v_proj (unset: "
                                               "all-linear = every linear layer but the LM head)")
    merge_lora: bool = _f(False, "LoRA/DoRA: also save the adapter merged into the base weights, as final/merged/")
    # optimisation (checks: check_optimisation)
    lr: float | None = _f(None, "peak learning rate (AdamW); unset: the method's rate from the frontier "
                                "experiment's validation grids (docs/DEFAULTS.md): " + ", ".join(f"{m} {t.lr:.0e}".replace("e-0", "e-")
                                                                   for m, t in METHODS.items()))
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    warmup_steps: int = _f(0, "linear warm-up steps after the probe (given > 0, it wins over warmup_ratio, as in "
                              "the Trainer)")
    warmup_ratio: float = _f(0.05, "share of the optimizer updates spent on linear warm-up, in [0, 1) (rounded up to "
                                  "whole steps, as the Trainer)")
    lr_schedule: str = _f("cosine", "learning-rate shape after warm-up: constant, linear, cosine")
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
    # evaluation and output (checks: check_evaluation, check_output)
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
        # size at its start (grass_ft.run.resolve), as the Trainer's max_steps=-1
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
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: resolved once at the start (grass_ft.run.resolve)
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
BEST_METRICS = {"eval_loss": False, "eval_accuracy": True}  # metric -> greater is better
DATA_FORMATS = ("auto", "alpaca", "prompt_completion", "messages", "text")  # grass_ft.data.FORMATS + auto
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
REPORT_TO = ("none", "tensorboard", "wandb")


# The paper's settings where this project's defaults departed from them (docs/DEFAULTS.md), for what must mean the
# paper's GRASS whatever the defaults (benchmark arms, recorded runs): its layout (embeddings and head frozen) and
# its measuring probe (the first probe_steps steps read every block's gradient and update nothing).
PAPER_LAYOUT = {"train_embeddings": False, "train_head": False}
PAPER_PROBE = {"probe_mode": "measure"}


# Keys only the layer-sampling methods read (registry.with_sampling()); fft, lora and dora ignore them.
SAMPLING_KEYS = ("gamma", "tau", "alpha", "probe_steps", "probe_mode", "importance", "count_probe_steps",
                 "sample_interval", "update_interval", "train_embeddings", "train_head", "reset_state_on_switch")


def lora_targets(spec: str | None) -> list[str] | str:
    """``lora_target_modules`` as peft wants it: a list of names, or ``"all-linear"`` when unset."""
    if spec is None or spec.strip() == "all-linear":
        return "all-linear"
    return [t.strip() for t in spec.split(",") if t.strip()]
