"""When a run has ruined its model: the native loop's stopping rule, checked after each step is logged.

A step is *bad* when its loss or gradient norm is non-finite (the update was skipped) or when the model is
*stuck*: the loss sits at ln(vocabulary size), the cross-entropy of a uniform guess, with a zero or non-finite
gradient norm. That is what a far too large learning rate leaves (issue 13: ``lr=1e6`` gave loss ln(V) and
grad_norm 0 from step 2 while the run exited 0). The run stops with :class:`DivergenceError` after
``max_bad_steps`` bad steps in a row, and at the end it fails, instead of saving ``final/``, if it ended on bad
steps: every update step since the last good one was bad (issue 28: ``lr=1e30 max_grad_norm=0`` ended on a NaN step
after a good one and exited 0 with NaN weights, because the rule then demanded that *every* step was bad).

Independently of the losses, the weights themselves are checked (:func:`nonfinite_tensors`) before a checkpoint
or ``final/`` is written: a model with an inf or NaN weight is never saved as if it were sound.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..base.errors import DivergenceError

# A uniform distribution over V logits has cross-entropy ln(V) exactly; the loss computed in fp32 differs from
# it by a few ulps of logsumexp (relative ~1e-7). 1e-4 leaves room for that and is far tighter than any real
# model gets by chance: a randomly initialised one starts about 0.5% away.
UNIFORM_RTOL = 1e-4


def vocab_size(model) -> int | None:
    """Number of logits the model produces (rows of the LM head), or None when it cannot be told."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "vocab_size", None)


class DivergenceWatch:
    """Counts bad steps in a row and raises :class:`DivergenceError` naming the step and a hint.

    Args:
        max_bad_steps: bad steps in a row that stop the run.
        vocab: logits per token (None: the stuck check is off).
        lr: the configured peak learning rate, quoted in the hint.
    """

    def __init__(self, max_bad_steps: int, vocab: int | None, lr: float):
        self.max_bad_steps = max_bad_steps
        self.uniform_loss = math.log(vocab) if vocab and vocab > 1 else None
        self.lr = lr
        self.streak = 0
        self.streak_start: int | None = None
        self.updates = 0
        self.last: dict[str, Any] | None = None  # the latest bad step: step, loss, grad_norm, stuck
        self.last_good: int | None = None  # the latest update step that was not bad

    def is_stuck(self, loss: float, grad_norm: float | None) -> bool:
        if self.uniform_loss is None or grad_norm is None or not math.isfinite(loss):
            return False
        return (grad_norm == 0 or not math.isfinite(grad_norm)) and \
            abs(loss - self.uniform_loss) <= UNIFORM_RTOL * self.uniform_loss

    def observe(self, step: int, loss: float, grad_norm: float | None, probe: bool, skipped: bool) -> None:
        """Record one logged step; raises once ``max_bad_steps`` bad steps ran in a row."""
        if probe:
            return
        self.updates += 1
        stuck = self.is_stuck(loss, grad_norm)
        if not (skipped or stuck):
            self.streak, self.streak_start, self.last, self.last_good = 0, None, None, step
            return
        self.streak += 1
        self.streak_start = step if self.streak_start is None else self.streak_start
        self.last = {"step": step, "loss": loss, "grad_norm": grad_norm, "stuck": stuck}
        if self.streak >= self.max_bad_steps:
            raise DivergenceError(self._message())

    def check_end(self) -> None:
        """At the end of training: refuse to save a model that ended on bad steps (stuck, or non-finite since the
        last good step): a run shorter than ``max_bad_steps``, or one that went bad in its last steps, that never
        recovered. A bad step followed by a good one is only counted (``skipped_steps``)."""
        if self.last is not None:
            raise DivergenceError(self._message())

    def _message(self) -> str:
        last = self.last or {}
        good = f" (the last good step was {self.last_good})" if self.last_good is not None else ""
        hint = (f"lower `lr` (now {self.lr:g}), keep `max_grad_norm` > 0, or check the data for examples without "
                f"answer tokens; no final/ or summary.json was written{good}")
        if last.get("stuck"):
            gn = "zero" if last["grad_norm"] == 0 else "non-finite"
            return (f"training diverged at step {self.streak_start}: the loss is {last['loss']:.4f} = ln(vocabulary "
                    f"size), a uniform guess, with a {gn} gradient norm for {self.streak} step(s) up to step "
                    f"{last['step']}, so the model has stopped learning; {hint}")
        return (f"training diverged at step {self.streak_start}: {self.streak} consecutive step(s) up to step "
                f"{last.get('step')} had a non-finite loss or gradient norm; {hint}")

    def weights_message(self, step: int, first: str, n_bad: int, total: int) -> str:
        """The line for weights that are not finite after ``step``: which tensors, which step broke them (the
        last one that updated with a finite loss, when a bad streak followed it) and what to try."""
        broke = (f"step {self.last_good}'s update broke them (every later step had a non-finite loss or gradient)"
                 if self.last is not None and self.last_good is not None else
                 f"an update up to step {step} broke them")
        shown = first + (f" and {n_bad - 1} more" if n_bad > 1 else "")
        return (f"training diverged: after step {step} the weights are not finite ({n_bad} of {total} tensors: "
                f"{shown}); {broke}. Lower `lr` (now {self.lr:g}), keep `max_grad_norm` > 0 and `weight_decay` "
                f"small; no final/ or summary.json was written")

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "streak_start": self.streak_start, "updates": self.updates,
                "last": self.last, "last_good": self.last_good}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak, self.streak_start = int(state["streak"]), state["streak_start"]
        self.updates, self.last = int(state["updates"]), state["last"]
        self.last_good = state.get("last_good")  # absent from checkpoints written before issue 28


def nonfinite_tensors(named) -> list[str]:
    """Names of the tensors in ``named`` (``(name, tensor)`` pairs) holding an inf or NaN; a sharded (DTensor)
    parameter is read through its local shard, so this is no collective."""
    bad = []
    for name, t in named:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad.append(name)
    return bad
