"""Evaluation during training: the best evaluation so far, its weights, and early stopping (``eval_steps``,
``metric_for_best_model``, ``load_best_model_at_end``, ``early_stopping_patience``).

The Trainer's rules: an evaluation is better when its metric is strictly better than the best so far (lower for a
loss, higher for an accuracy; ``EarlyStoppingCallback`` with its default threshold of 0), early stopping ends the run
after ``early_stopping_patience`` evaluations in a row that were not better, and ``load_best_model_at_end`` puts the
best evaluation's weights in ``final/``. Where the Trainer keeps the best weights in its checkpoints (and so requires
``save_steps`` to be a multiple of ``eval_steps``), this run keeps them in ``best/`` in the output directory, written
at every improvement (one copy of the model on disk), so any ``save_steps`` works.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..base.atomic import atomic_dir, remove_dir
from ..config import BEST_METRICS, TrainConfig
from ..base.errors import UserError

BEST_DIR = "best"


def metric_value(result: dict[str, Any], metric: str) -> float | None:
    """``eval_loss`` or ``eval_accuracy`` of an evaluation result (None: the evaluation has no such figure)."""
    return result.get("eval_loss") if metric == "eval_loss" else result.get("accuracy")


def eval_record(step: int, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The metrics.jsonl line of an evaluation during training (the Trainer's ``eval_*`` names)."""
    return {"step": step, "eval_loss": result.get("eval_loss"), "eval_accuracy": result.get("accuracy"),
            "eval_loss_per_task": result.get("eval_loss_per_task"), "eval_n": result.get("n"), "eval_s": seconds}


class BestTracker:
    """The best evaluation so far and the count of evaluations since (the Trainer's ``best_metric``,
    ``best_model_checkpoint`` and ``EarlyStoppingCallback`` counter in one place)."""

    def __init__(self, cfg: TrainConfig):
        from .resolve import load_best

        self.metric = cfg.metric_for_best_model
        self.greater = BEST_METRICS.get(self.metric, False)
        self.patience = cfg.early_stopping_patience
        self.keep = load_best(cfg)
        self.value: float | None = None
        self.step: int | None = None
        self.result: dict[str, Any] | None = None
        self.bad_evals = 0

    def better(self, value: float | None) -> bool:
        if value is None:
            return False
        if self.value is None:
            return True
        return value > self.value if self.greater else value < self.value

    def observe(self, step: int, result: dict[str, Any]) -> bool:
        """Record the evaluation after ``step`` steps; returns whether it is the best so far.

        Raises:
            UserError: the metric is not among the evaluation's figures (eval_accuracy with no example scored by
                an answer rule).
        """
        value = metric_value(result, self.metric)
        if value is None:
            raise UserError(f"`metric_for_best_model` is {self.metric}, but the evaluation gives none (no held-out "
                            f"example is scored by an answer rule); use metric_for_best_model=eval_loss")
        if self.better(value):
            self.value, self.step, self.bad_evals = value, step, 0
            self.result = {k: v for k, v in result.items()}
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def save_weights(self, out: Path, model: torch.nn.Module, step: int) -> None:
        """``best/``: the model's weights after ``step`` steps (replacing the previous best's)."""
        from safetensors.torch import save_model

        path = out / BEST_DIR
        if path.exists():
            remove_dir(path)
        with atomic_dir(path) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            (tmp / "step.json").write_text(json.dumps({"step": step, "metric": self.metric, "value": self.value}))

    def load_weights(self, out: Path, model: torch.nn.Module) -> None:
        from safetensors.torch import load_model

        load_model(model, str(out / BEST_DIR / "model.safetensors"))

    def saved_step(self, out: Path) -> int | None:
        try:
            return int(json.loads((out / BEST_DIR / "step.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            return None

    def state_dict(self) -> dict[str, Any]:
        result = None if self.result is None else {k: v for k, v in self.result.items() if k != "predictions"}
        return {"value": self.value, "step": self.step, "bad_evals": self.bad_evals, "result": result,
                "predictions": None if self.result is None else self.result.get("predictions")}

    def load_state_dict(self, state: dict[str, Any] | None, out: Path) -> str | None:
        """Restore from a checkpoint; returns a warning when ``best/`` no longer holds the recorded best (a later
        improvement replaced it before the run was cut), in which case the best starts again from the resume."""
        if not state or state.get("step") is None:
            return None
        if self.keep and self.saved_step(out) != state["step"]:
            return (f"best/ no longer holds the best evaluation recorded at step {state['step']} (a later one "
                    f"replaced it before the run was cut); the best is tracked again from the resume")
        self.value, self.step, self.bad_evals = state["value"], state["step"], int(state["bad_evals"])
        self.result = {**(state.get("result") or {}), "predictions": state.get("predictions") or []}
        return None
