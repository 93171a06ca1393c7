"""``report_to``: the native loop's metrics, also sent to TensorBoard and/or Weights & Biases.

``metrics.jsonl`` and ``layers.jsonl`` stay the source of truth; a sink receives the same numbers under tags a
TensorBoard or W&B user expects:

* ``train/<field>`` for every numeric field of a ``metrics.jsonl`` line (``train/loss``, ``train/lr``,
  ``train/grad_norm``, ``train/tokens_per_s``, ``train/optimizer_state_device_bytes``, ...);
* ``grass/active_blocks`` (how many blocks trained this step) and a histogram ``grass/active_block_ids`` of
  their indices, on GRASS / LISA update steps (a probe step, fft and lora train no sampled set);
* ``grass/mgn/block_<i>`` and ``grass/probs/block_<i>`` at every probe end and refresh (``layers.jsonl`` events).

* ``eval/loss``, ``eval/accuracy`` at every evaluation during training (``eval_steps``), the Trainer's tags.

W&B is configured the way its users configure it (as the Trainer's ``WandbCallback``): ``WANDB_PROJECT`` (default
``grass-ft``), ``WANDB_ENTITY``, ``WANDB_MODE`` and the rest of wandb's environment are read by ``wandb.init``
itself; the run's name is ``run_name``. Offline mode is chosen only when the environment says so, or when
nothing can be reached: no W&B credentials (``WANDB_API_KEY`` or ``wandb login``'s netrc entry), or the W&B host
does not answer; a warning line then says how to upload the run later (``wandb sync``).

The before/after evaluation stays in ``summary.json`` / ``eval.json``.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

SINKS = ("tensorboard", "wandb")


def requested(report_to: str) -> list[str]:
    """The sinks named in ``report_to`` (``none`` and blanks dropped)."""
    return [s.strip() for s in report_to.split(",") if s.strip() and s.strip() != "none"]


class MetricSinks:
    """Open writers for each sink of ``report_to`` under ``out`` (``out/tensorboard``, ``out/wandb``); does
    nothing when ``enabled`` is false (ranks other than 0) or no sink is requested."""

    def __init__(self, report_to: str, out: Path, config: dict[str, Any], enabled: bool = True,
                 resume_step: int = 0, run_name: str | None = None):
        self.tb = None
        self.wandb = None
        names = requested(report_to) if enabled else []
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events it is about to write again, as metrics.jsonl is truncated
            self.tb = SummaryWriter(log_dir=str(Path(out) / "tensorboard"), purge_step=resume_step or None)
        if "wandb" in names:
            import wandb

            mode, why = wandb_mode(os.environ)
            if why:
                print(f"grass-ft: warning: wandb logs offline into {Path(out) / 'wandb'}: {why}; `wandb sync "
                      f"{Path(out) / 'wandb'}` uploads it later", file=sys.stderr)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT") or "grass-ft",
                                    name=run_name or Path(out).name, dir=str(out), config=config, resume="allow",
                                    **({"mode": mode} if mode else {}))

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

    def log_eval(self, record: dict[str, Any], step: int) -> None:
        """An evaluation during training (its ``metrics.jsonl`` line): ``eval/loss``, ``eval/accuracy``."""
        values = {f"eval/{k.removeprefix('eval_')}": float(v) for k, v in record.items()
                  if k in ("eval_loss", "eval_accuracy") and isinstance(v, (int, float))}
        if values:
            self._scalars(values, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def wandb_mode(env: dict[str, str] | os._Environ, timeout: float = 3.0) -> tuple[str | None, str | None]:
    """``(mode, why)`` for ``wandb.init``: ``(None, None)`` leaves the mode to wandb (``WANDB_MODE`` set, or
    credentials and a reachable host); ``("offline", why)`` when nothing can be reached."""
    if env.get("WANDB_MODE"):
        return None, None  # the user's word: online, offline or disabled, read by wandb.init itself
    base = env.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    host = urlparse(base).hostname or "api.wandb.ai"
    if not env.get("WANDB_API_KEY") and not _netrc_has(host):
        return "offline", "no W&B credentials (WANDB_API_KEY, or `wandb login`)"
    port = urlparse(base).port or (443 if base.startswith("https") else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return "offline", f"{host} cannot be reached ({type(e).__name__})"
    return None, None


def _netrc_has(host: str) -> bool:
    import netrc

    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
