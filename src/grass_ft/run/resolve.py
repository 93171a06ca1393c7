"""What a run settles at its start, once, and records: ``dtype=auto``, ``num_train_epochs`` -> ``max_steps``,
``warmup_ratio`` -> ``warmup_steps``, and the value every unset key took (config.yaml holds no null).

The rules are the Trainer's where it has one (docs/RECIPE.md):

- ``max_steps`` given explicitly wins over ``num_train_epochs``; left unset it is 30, or with
  ``num_train_epochs`` set, ``ceil(epochs x updates per epoch)``, an update per epoch being
  ``floor(rows / (batch_size x processes)) // grad_accum`` (at least 1). Rows are examples, or packed rows with
  ``packing``; the stream drops the ragged tail of every epoch, as the Trainer's ``dataloader_drop_last``.
- ``warmup_steps > 0`` wins; otherwise ``ceil(warmup_ratio x updates)``.
- ``dtype=auto``: bfloat16 on a GPU that supports it, float16 on one that does not, float32 on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import HOLDOUT, TrainConfig
from ..model.load import resolve_dtype  # noqa: F401 - settled here at a run's start; lives with model loading
from ..base.registry import traits


def updates_per_epoch(rows: int, cfg: TrainConfig, world_size: int) -> int:
    """Optimizer steps in one pass over ``rows`` training rows (full batches only, as the stream draws them)."""
    batches = rows // (cfg.batch_size * world_size)
    return max(1, batches // cfg.grad_accum)


def steps_for_epochs(epochs: float, rows: int, cfg: TrainConfig, world_size: int) -> int:
    """``max_steps`` of ``epochs`` passes: the Trainer's ``ceil(num_train_epochs * num_update_steps_per_epoch)``."""
    return max(1, math.ceil(epochs * updates_per_epoch(rows, cfg, world_size)))


def epochs_of(cfg: TrainConfig, rows: int, world_size: int) -> float:
    """The passes over the data that ``max_steps`` makes (what config.yaml records for an unset
    ``num_train_epochs``)."""
    return round(cfg.max_steps / updates_per_epoch(rows, cfg, world_size), 4)


def resolve_steps(cfg: TrainConfig, rows: int, world_size: int) -> TrainConfig:
    """``cfg`` with ``max_steps`` set from ``num_train_epochs`` when only the epochs were given."""
    if cfg.max_steps is not None:
        return cfg
    return replace(cfg, max_steps=steps_for_epochs(cfg.num_train_epochs, rows, cfg, world_size))


def resolve_warmup(cfg: TrainConfig, total_updates: int) -> int:
    """Warm-up steps: ``warmup_steps`` when > 0, else ``warmup_ratio`` of the updates, rounded up (the Trainer's
    ``get_warmup_steps``)."""
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * total_updates)


def short_run_warning(cfg: TrainConfig, rows: int, world_size: int, from_file: bool) -> str | None:
    """One line when a run on a user's data will see less than one pass over it with ``max_steps`` left at its
    default and no epochs asked for (30 steps over a 50k-row file); None otherwise (a ``max_steps`` the user typed
    is their choice)."""
    from ..config import DEFAULT_MAX_STEPS

    if not from_file or cfg.num_train_epochs is not None or cfg.max_steps != DEFAULT_MAX_STEPS:
        return None
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    seen = cfg.max_steps * per_step
    if seen >= rows:
        return None
    what = "packed rows" if cfg.packing else "training examples"
    return (f"max_steps={cfg.max_steps} x {per_step} rows a step = {seen} of the data's {rows} {what} "
            f"({seen / rows:.1%} of one epoch); num_train_epochs=1 makes one full pass")


def both_warmups_warning(cfg: TrainConfig) -> str | None:
    if cfg.warmup_steps > 0 and cfg.warmup_ratio > 0:
        return (f"warmup_steps={cfg.warmup_steps} and warmup_ratio={cfg.warmup_ratio} both set: warmup_steps wins, "
                f"as in the Trainer")
    return None


def load_best(cfg: TrainConfig) -> bool:
    """``load_best_model_at_end``: as given, or on when early stopping is (the Trainer requires the pair)."""
    if cfg.load_best_model_at_end is not None:
        return cfg.load_best_model_at_end
    return cfg.early_stopping_patience > 0


def filled(cfg: TrainConfig, *, rows: int, world_size: int, out: Path, layers_attribute: str | None = None,
           attn_implementation: str | None = None, chat_template: str | None = None,
           budgets: tuple[str, str] | None = None) -> dict[str, Any]:
    """config.yaml's contents: every key of ``cfg`` with the value the run used, no null anywhere.

    ``gamma`` stays ``auto`` for a method that samples no layers (it reads none); ``device_memory`` /
    ``host_memory`` are the budgets auto planned with, else the machine's (``budgets``).
    """
    from ..config import lora_targets
    from ..method.methods import resolved_offload

    d = cfg.to_dict()
    sampling = bool(traits(cfg.method).sampling)
    if cfg.num_train_epochs is None:
        d["num_train_epochs"] = epochs_of(cfg, rows, world_size)
    d["offload"] = resolved_offload(cfg)
    d["lora_alpha"] = cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_r
    d["lora_target_modules"] = ",".join(t) if isinstance(t := lora_targets(cfg.lora_target_modules), list) else t
    d["load_best_model_at_end"] = load_best(cfg)
    d["eval_data"] = cfg.eval_data if cfg.eval_data is not None else HOLDOUT
    d["data_config"] = cfg.data_config if cfg.data_config is not None else "none"
    d["chat_template"] = cfg.chat_template if cfg.chat_template is not None else (chat_template or "none")
    d["layers_attribute"] = cfg.layers_attribute or layers_attribute or "none"
    if cfg.attn_implementation == "auto" and attn_implementation:
        d["attn_implementation"] = attn_implementation
    d["run_name"] = cfg.run_name or Path(out).name
    d["resume"] = cfg.resume if cfg.resume is not None else "none"
    if not sampling and cfg.gamma == "auto":
        d["gamma"] = "auto"  # a method that samples no layers reads no gamma: auto is its value, not a null
    if budgets is not None:
        d["device_memory"] = cfg.device_memory or budgets[0]
        d["host_memory"] = cfg.host_memory or budgets[1]
    missing = [k for k, v in d.items() if v is None]
    if missing:  # a key added to TrainConfig without a resolution here would write a null: fail loudly in the tests
        raise RuntimeError(f"config.yaml would hold null for {missing}: resolve them in grass_ft.recipe.filled")
    return d


def machine_budgets(device_type: str) -> tuple[str, str]:
    """The device and host memory of this machine as the planner reads them (for config.yaml when auto did not
    plan), formatted as sizes."""
    from ..planner import detect_budgets
    from ..planner.sizes import format_size

    b = detect_budgets(None, None, device_type)
    return format_size(b.device), format_size(b.host)


def unresolved(cfg: TrainConfig) -> set[str]:
    """Keys this configuration leaves to be resolved at the start of the run (compared with a checkpoint's record
    only once resolved: :func:`grass_ft.run.preflight.resolve_resume`)."""
    keys = {k for k, v in cfg.to_dict().items() if v is None}
    if cfg.dtype == "auto":
        keys.add("dtype")
    if cfg.attn_implementation == "auto":
        keys.add("attn_implementation")
    if cfg.warmup_steps == 0 and cfg.warmup_ratio > 0:
        keys.add("warmup_steps")
    if cfg.max_steps is None:
        keys.add("max_steps")
    return keys
