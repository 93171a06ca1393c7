"""Every check a run can make before it loads model weights or writes anything, so that a bad input fails in
seconds with one line and a previous run in ``output_dir`` is left as it was.

``grass-ft train`` and ``grass-ft validate`` run the same checks (:func:`preflight`): the output directory, the
checkpoint to resume from, the data (read, format, task names, gold answers, size against one batch) and the
model source (directory layout and config, or a hub id). The checks that need the tokenizer (answers cut off
by ``max_seq_len``) follow in :func:`supervised_features`, still before the model loads. docs/RELIABILITY.md
lists what each failure looks like.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import data as data_mod
from .checkpoint import CHECKPOINT_RE, check_same_run, checkpoint_run, find_checkpoint, run_keys
from ..config import ConfigError, TrainConfig, ignored_keys_warning
from ..base.errors import UserError
from ..model.load import check_model_source

# Keys method=auto / gamma=auto may set (grass_ft.planner.memory.Setting.overrides), and the rate that follows.
AUTO_SETS = frozenset({"method", "gamma", "lr", "offload", "gradient_checkpointing", "train_embeddings", "train_head",
                       "reset_state_on_switch", "master_weights", "lora_r"})

# What a run writes into output_dir; a directory holding any of these (or a checkpoint) holds a run.
RUN_FILES = ("config.yaml", "plan.json", "metrics.jsonl", "layers.jsonl", "summary.json", "final", "eval.json",
             "predictions.jsonl", "best")
PLOT_FILES = ("loss.png", "active_blocks.png", "mgn.png")  # drawn at the end of a run; replaced with it, not listed
FINISHED = ("summary.json", "final")


class RunError(UserError, RuntimeError):
    """A run that cannot start or continue; the message says why and what to change."""


@dataclass
class Preflight:
    """What the checks found and the run reuses: the checkpoint to resume from and the examples."""

    checkpoint: Path | None = None
    loaded: data_mod.LoadedData | None = None  # training rows, held-out examples and the data format
    warnings: list[str] = field(default_factory=list)


def previous_run(out: Path) -> list[str]:
    """Names in ``out`` that a previous run wrote (what this run would replace), in a stable order."""
    if not out.is_dir():
        return []
    names = [n for n in RUN_FILES if (out / n).exists()]
    return names + sorted((p.name for p in out.iterdir() if CHECKPOINT_RE.match(p.name)),
                          key=lambda n: int(n.split("-")[1]))


def check_output_dir(cfg: TrainConfig) -> None:
    """``output_dir`` can be written and holds no run this one would destroy without being told to.

    A directory holding a run is refused unless ``overwrite_output_dir=true`` (as the Hugging Face example
    scripts do) or ``resume`` continues it; a finished run (``summary.json`` or ``final/``) is never resumed
    over without ``overwrite_output_dir=true``.
    """
    out = Path(cfg.output_dir)
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "Not a directory" if not existing.is_dir() else "Permission denied"
        raise RunError(f"`output_dir` {str(out)!r} is not writable: {why} ({existing})")
    held = previous_run(out)
    if not held or cfg.overwrite_output_dir:
        return
    shown = ", ".join(n + "/" if (out / n).is_dir() else n for n in held[:6]) + (", ..." if len(held) > 6 else "")
    finished = [n for n in FINISHED if n in held]
    if cfg.resume and finished:
        raise RunError(f"`output_dir` {str(out)!r} holds a finished run ({', '.join(finished)}); there is nothing "
                       f"to resume. Pass overwrite_output_dir=true to train it again, or choose another output_dir")
    if not cfg.resume:
        raise RunError(f"`output_dir` {str(out)!r} already holds a run ({shown}); pass overwrite_output_dir=true "
                       f"to replace it, resume=auto to continue it, or choose another output_dir")


def resolve_resume(cfg: TrainConfig, world_size: int, warnings: list[str]) -> Path | None:
    """The checkpoint this run resumes from (None: start fresh), after checking it belongs to this run."""
    checkpoint = find_checkpoint(Path(cfg.output_dir), cfg.resume, warnings)
    if checkpoint is not None:
        from .resolve import unresolved

        later = unresolved(cfg)  # compared once the run has resolved them (grass_ft.run.train._run_train)
        current = {k: v for k, v in run_keys(cfg.to_dict(), world_size).items() if k not in later}
        if cfg.auto:  # the keys auto sets are compared after the recorded choice is applied (grass_ft.planner.resolve)
            current = {k: v for k, v in current.items() if k not in AUTO_SETS}
        check_same_run(checkpoint, checkpoint_run(checkpoint), current)
    return checkpoint


def check_held_out(cfg: TrainConfig, held: list[dict[str, Any]], loss_only: set[str]) -> None:
    """Every held-out example that will be generated has a task with an answer rule and a gold it can read
    (else evaluation would fail after training, losing the run's summary)."""
    from ..base.tasks import canonical_task, parse_gold

    source = cfg.data if cfg.held_out_split else cfg.eval_data
    for i, ex in enumerate(held):
        task = str(ex.get("task") or cfg.task)
        if task in loss_only:
            continue
        if not str(ex.get("answer") or "").strip():
            raise data_mod.DataError(f"{source}: held-out example {i}: {no_answer_hint(ex, task)}")
        try:
            parse_gold(canonical_task(task), ex.get("answer", ""))
        except ValueError as e:
            raise data_mod.DataError(f"{source}: held-out example {i}: {e}") from None


def check_loss_only_tasks(cfg: TrainConfig, held: list[dict[str, Any]]) -> None:
    """Every task ``eval_loss_only_tasks`` names is a task of the held-out examples: a misspelt one fails here,
    before the model loads, not after training.

    Raises:
        ConfigError: naming the tasks that are not among them, and theirs.
    """
    from ..base.tasks import named_tasks

    _, error = named_tasks(cfg.eval_loss_only_tasks, {ex["_task"] or None for ex in held})
    if error and held:
        raise ConfigError([error])


def no_answer_hint(example: dict[str, Any], task: str) -> str:
    """Why a held-out example without a gold answer cannot be scored, and the two ways on: an ``answer`` field (for
    rows that have a prompt), or scoring the held-out loss only."""
    from ..data.examples import has_prompt

    fmt = example["_format"]
    loss_only = f"eval_loss_only_tasks={task} to score the held-out loss only (or eval_samples=0)"
    if not has_prompt(example):
        return (f"format {fmt} rows have no prompt to answer, so task={task} cannot score them; set {loss_only}")
    return (f"no gold answer to score it by task={task} (format {fmt} rows carry none): add an `answer` field to "
            f"the rows (and set task= to its answer rule), or set {loss_only}")


def check_batch(n: int, cfg: TrainConfig, world_size: int, what: str = "training examples") -> None:
    """At least one full batch: each step takes ``batch_size`` x processes examples."""
    need = cfg.batch_size * world_size
    if n < need:
        procs = f" x {world_size} processes" if world_size > 1 else ""
        raise data_mod.DataError(f"{cfg.data}: {n} {what}, fewer than one batch (batch_size={cfg.batch_size}{procs} "
                                 f"= {need}); lower batch_size or add examples")


def _load_data(cfg: TrainConfig, world_size: int, generate: bool) -> data_mod.LoadedData | None:
    if not generate and data_mod.source_kind(cfg.data) == "generator":
        return None  # validate: a known generator name is all there is to check
    loaded = data_mod.load_data(cfg)
    check_batch(len(loaded.train), cfg, world_size)
    check_held_out(cfg, loaded.held, {t.strip() for t in cfg.eval_loss_only_tasks.split(",") if t.strip()})
    return loaded


def preflight(cfg: TrainConfig, world_size: int = 1, check_dir: bool = True, generate: bool = True) -> Preflight:
    """Run every check that needs no model weights and writes nothing; report every failure at once.

    Args:
        cfg: the validated configuration.
        world_size: processes of this run (a batch takes ``batch_size`` x ``world_size`` examples).
        check_dir: check ``output_dir`` (rank 0 of a multi-process run; the others only read).
        generate: generate examples when ``data`` is a generator (``validate`` checks only the name).

    Raises:
        UserError: the one failure, or a :class:`ConfigError` listing several.
    """
    pf = Preflight()
    errors: list[UserError] = []

    def attempt(check, *args):
        try:
            return check(*args)
        except UserError as e:
            errors.append(e)
            return None

    if check_dir:
        attempt(check_output_dir, cfg)
    pf.checkpoint = attempt(resolve_resume, cfg, world_size, pf.warnings)
    if (ignored := ignored_keys_warning(cfg)) is not None:
        pf.warnings.append(ignored)
    pf.loaded = attempt(_load_data, cfg, world_size, generate)
    attempt(check_model_source, cfg.model)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigError([str(e) for e in errors])
    return pf


def check_token_ids(features, cfg: TrainConfig) -> None:
    """Every token id the tokenizer produced has a row in the model's embedding (a tokenizer from another model,
    or one with added tokens the model was never resized for, fails here, not as an IndexError mid-step).

    Raises:
        ModelError: naming the largest id, the model's vocabulary size and the fix.
    """
    from ..model.load import ModelError, vocab_size_hint

    vocab = vocab_size_hint(cfg.model)
    ids = features["input_ids"] if hasattr(features, "select") else [f["input_ids"] for f in features]
    top = max((max(row) for row in ids if len(row)), default=-1)
    if vocab is not None and top >= vocab:
        raise ModelError(f"the tokenizer of model {cfg.model!r} produces token id {top}, but the model's vocabulary "
                         f"has {vocab} rows (vocab_size in its config.json): the tokenizer does not belong to this "
                         f"model; use the tokenizer files saved with the model (or resize its embeddings first)")


def supervised_features(features: list[dict[str, list[int]]], cfg: TrainConfig,
                        world_size: int) -> tuple[list[dict[str, list[int]]], str | None]:
    """Drop tokenised examples whose answer ``max_seq_len`` cut off entirely (no label left to learn from:
    such a batch has a 0/0 loss); returns the rest and a warning naming how many were dropped.

    Raises:
        DataError: no example keeps an answer token, or fewer than one batch do.
    """
    # the model predicts token t+1 from position t, so a label at position 0 is never scored
    keep = [i for i, labels in enumerate(features["labels"] if hasattr(features, "select")
                                         else [f["labels"] for f in features])
            if any(lab != data_mod.IGNORE_INDEX for lab in labels[1:])]
    kept = features.select(keep) if hasattr(features, "select") else [features[i] for i in keep]
    dropped = len(features) - len(kept)
    if not kept:
        raise data_mod.DataError(f"{cfg.data}: all {len(features)} training examples lose their whole answer to "
                                 f"truncation at max_seq_len={cfg.max_seq_len} (the prompt fills it), so every "
                                 f"label is masked and there is nothing to learn; raise max_seq_len")
    check_batch(len(kept), cfg, world_size, "training examples keep answer tokens after truncation")
    warning = (f"{dropped} of {len(features)} training examples lose their whole answer to truncation at "
               f"max_seq_len={cfg.max_seq_len} and are left out" if dropped else None)
    return kept, warning
