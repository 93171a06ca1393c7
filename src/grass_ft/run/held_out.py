"""The run's held-out evaluations: before training, every ``eval_steps`` while training (the best so far, early
stopping), after training, and later of a finished run's model (``grass-ft eval model=RUN/final``). Each goes
through :func:`grass_ft.evaluation.evaluate`, the one entry point of every evaluation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig, build_config
from ..data.formats import DataError
from ..data.loading import load_data
from ..data.tokenize import prepare_tokenizer
from ..evaluation.evaluate import evaluate, load_for_eval, write_eval
from ..parallel.distributed import Distributed
from .checkpoint import CHECKPOINT_RE
from .early_stopping import eval_record
from .logging_sinks import MetricSinks
from .state import MethodRun


def evaluate_model(model, tokenizer, examples: list[dict], cfg: TrainConfig, desc: str) -> dict[str, Any]:
    """Held-out eval loss (overall and per task) and accuracy through :func:`grass_ft.evaluation.evaluate.evaluate`,
    the entry point ``grass-ft eval`` uses too; tasks in ``eval_loss_only_tasks`` get an eval loss only."""
    from transformers.utils import logging as hf_logging

    # a bar unless --quiet (as transformers' own bars), on rank 0 only (with fsdp every rank runs the evaluation)
    progress = hf_logging.is_progress_bar_enabled() and _rank() == 0
    res = evaluate(model, tokenizer, examples, task=cfg.task, loss_only=cfg.eval_loss_only_tasks,
                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, max_seq_len=cfg.max_seq_len,
                   progress=progress)
    return {**res, "label": desc} if res else {}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def evaluate_during(dist: Distributed, out: Path, run: MethodRun, best, step: int, metrics_f, sinks: MetricSinks,
                    evaluate) -> bool:
    """The held-out evaluation after ``step + 1`` steps (rank 0; the others wait), by ``evaluate(model, label)``
    (the recipe's): a metrics.jsonl line and the
    loggers' ``eval/*``, the best weights kept when asked. Returns whether early stopping ends the run (every rank
    gets rank 0's verdict). The random state is left as it was, so the draws and the data order do not depend on
    whether the run evaluates (tested)."""
    stop = None
    if dist.is_main:
        t0 = time.perf_counter()
        devices = [next(run.model.parameters()).device] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            result = evaluate(run.model, f"step {step + 1}")
        record = eval_record(step, result, time.perf_counter() - t0)
        if best.observe(step + 1, result) and best.keep:
            best.save_weights(out, run.model, step + 1)
        record.update(best_metric=best.value, best_step=best.step)
        metrics_f.write(json.dumps(record) + "\n")
        sinks.log_eval(record, step)
        stop = best.should_stop
    stopped = bool(dist.from_main(stop))
    dist.barrier()
    return stopped


# ------------------------------------------------------------------------------- a finished run's model


def run_of(model_path: str | Path) -> Path | None:
    """The training run a model directory belongs to (its ``final/`` or a ``checkpoint-N`` beside the run's
    ``config.yaml``), or None."""
    p = Path(model_path)
    if (p.name == "final" or CHECKPOINT_RE.match(p.name)) and (p.parent / "config.yaml").is_file():
        return p.parent
    return None


def evaluate_run_model(model_path: str | Path, output_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Evaluate a run's model (``final/`` or a checkpoint) on that run's held-out examples, with its evaluation
    settings, exactly as the run's own evaluation after training does; writes ``eval.json`` and
    ``predictions.jsonl``. What ``grass-ft eval model=RUN/final`` does without ``data=`` (issue 28: an
    evaluation cut short after ``final/`` was written is finished this way).

    Raises:
        DataError: the run holds out no examples (``eval_samples=0``), or its data cannot be read any more.
    """

    run = run_of(model_path)
    cfg = build_config(str(run / "config.yaml"))
    held = load_data(cfg).held if cfg.eval_samples else []
    if not held:
        raise DataError(f"the run in {run} holds out no examples (eval_samples=0); give data=FILE (and task=NAME) "
                        f"to evaluate {model_path} on")
    model, tokenizer = load_for_eval(model_path)
    prepare_tokenizer(tokenizer, cfg.chat_template, held, cfg.model)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    result = evaluate(model, tokenizer, held, task=cfg.task, loss_only=cfg.eval_loss_only_tasks,
                      max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, max_seq_len=cfg.max_seq_len,
                      progress=progress)
    result.update(label="after", model=str(model_path), data=cfg.data if cfg.held_out_split else cfg.eval_data,
                  wall_time_s=round(time.perf_counter() - start, 3))
    write_eval(output_dir, result)
    return result
