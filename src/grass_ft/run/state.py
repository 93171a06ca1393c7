"""What the recipe's steps hand on to each other: the inputs the checks found, the method set up for training, the
running totals a checkpoint carries, and what the loop leaves for the finish."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..method.methods import Prepared
from ..method.step import StepRunner
from .divergence import DivergenceWatch


@dataclass
class Inputs:
    """What the checks before the model found: the checkpoint to resume, the tokenizer, the training features, the
    held-out examples, and whether the training data was generated (not a user's file or data set)."""
    checkpoint: Path | None
    tokenizer: Any
    features: list
    held_ex: list[dict]
    generated: bool = False


@dataclass
class MethodRun:
    """The method set up for training: the prepared model/optimizer/sampler, its scheduler and step runner, the
    divergence watch, the loss forward, the step budget and FSDP's reduce-scatter counter."""
    prepared: Prepared
    scheduler: Any
    runner: StepRunner
    watch: DivergenceWatch
    forward: Any
    n_steps: int
    reduce_scatter: Any = None
    warmup_steps: int = 0
    record: dict[str, Any] = field(default_factory=dict)  # config.yaml: every key as the run used it

    @property
    def model(self):
        return self.prepared.model  # lora/dora wrap the model in a peft model: train, save and evaluate that


@dataclass
class Totals:
    """The running totals a checkpoint carries: the next step, tokens, seconds, per-step losses."""
    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    bookkeeping_time: float = 0.0
    losses: list[float] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "train_time": self.train_time, "bookkeeping_time": self.bookkeeping_time,
                "losses": self.losses}


@dataclass
class LoopResult:
    """What the loop leaves for the finish: its wall time, the peaks of training and of the probe, and counts."""
    wall_s: float
    train_peak: int
    probe_peak: int | None
    n_trainable: int  # every parameter
    n_step_trainable: int  # those one (non-probe) step trains
    stopped_early: bool = False
