"""``report_to``: the native loop's metrics, also sent to TensorBoard and/or Weights & Biases (offline mode).

``metrics.jsonl`` and ``layers.jsonl`` stay the source of truth; a sink receives the same numbers under tags a
TensorBoard or W&B user expects:

* ``train/<field>`` for every numeric field of a ``metrics.jsonl`` line (``train/loss``, ``train/lr``,
  ``train/grad_norm``, ``train/tokens_per_s``, ``train/optimizer_state_device_bytes``, ...);
* ``grass/active_blocks`` (how many blocks trained this step) and a histogram ``grass/active_block_ids`` of
  their indices, on GRASS / LISA update steps (a probe step, fft and lora train no sampled set);
* ``grass/mgn/block_<i>`` and ``grass/probs/block_<i>`` at every probe end and refresh (``layers.jsonl`` events).

Held-out evaluation stays in ``summary.json`` / ``eval.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SINKS = ("tensorboard", "wandb")


def requested(report_to: str) -> list[str]:
    """The sinks named in ``report_to`` (``none`` and blanks dropped)."""
    return [s.strip() for s in report_to.split(",") if s.strip() and s.strip() != "none"]


class MetricSinks:
    """Open writers for each sink of ``report_to`` under ``out`` (``out/tensorboard``, ``out/wandb``); does
    nothing when ``enabled`` is false (ranks other than 0) or no sink is requested."""

    def __init__(self, report_to: str, out: Path, config: dict[str, Any], enabled: bool = True,
                 resume_step: int = 0):
        self.tb = None
        self.wandb = None
        names = requested(report_to) if enabled else []
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events it is about to write again, as metrics.jsonl is truncated
            self.tb = SummaryWriter(log_dir=str(Path(out) / "tensorboard"), purge_step=resume_step or None)
        if "wandb" in names:
            import wandb

            self.wandb = wandb.init(project="grass-ft", name=Path(out).name, dir=str(out), mode="offline",
                                    config=config, resume="allow")

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_step(self, record: dict[str, Any] | None, events: list[dict[str, Any]], step: int) -> None:
        """One training step: its ``metrics.jsonl`` record (``None`` on a step that logs none) and its
        ``layers.jsonl`` events."""
        values: dict[str, float] = {}
        if record is not None:
            values = {f"train/{k}": float(v) for k, v in record.items()
                      if k != "step" and isinstance(v, (int, float)) and v is not None}
            active = record.get("active") or []
            if active:
                values["grass/active_blocks"] = float(len(active))
                if self.tb is not None:
                    import numpy as np

                    self.tb.add_histogram("grass/active_block_ids", np.asarray(active), step)
        for ev in events:
            if ev.get("event") in ("probe", "refresh"):
                values.update({f"grass/mgn/block_{i:02d}": float(m) for i, m in enumerate(ev.get("mgn", []))})
                values.update({f"grass/probs/block_{i:02d}": float(p) for i, p in enumerate(ev.get("probs", []))})
        if values:
            self._scalars(values, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
