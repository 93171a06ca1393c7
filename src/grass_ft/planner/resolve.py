"""``method=auto`` and ``gamma=auto``: resolved once, at the start of a run, by the plan of the device at hand.

The choice is one logged line, written to ``plan.json`` in the output directory (what was chosen, the prediction,
the budgets), to config.yaml (the resolved keys, and the budgets used as ``device_memory`` / ``host_memory``) and
to summary.json. A resumed run takes the choice its ``plan.json`` recorded and does not plan again: the free
memory of the device may have changed, the run must not. After the first step the real peak is logged beside the
prediction (:func:`peak_line`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..base.registry import traits
from .sizes import GiB, detect_budgets, format_size
from .table import NothingFits, build_plan, nothing_fits_message

PLAN_FILE = "plan.json"


def _recorded(cfg: TrainConfig) -> dict[str, Any] | None:
    """The choice a run being resumed recorded (its output directory's plan.json), if any."""
    if not cfg.resume:
        return None
    where = Path(cfg.output_dir) if cfg.resume == "auto" else Path(cfg.resume).parent
    path = where / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resolve(cfg: TrainConfig, device_type: str, world_size: int = 1) -> tuple[TrainConfig, dict[str, Any] | None]:
    """``cfg`` with ``method`` / ``gamma`` resolved (and ``lr`` when unset), and the record of the choice; unchanged
    and None when neither is ``auto``.

    Raises:
        NothingFits: no setting fits; the message names the smallest and what it needs.
    """
    if not cfg.auto:
        return cfg, None
    recorded = _recorded(cfg)
    if recorded is not None:
        chosen = recorded["resolved"]
        return _apply(cfg, chosen, recorded["device_memory"], recorded["host_memory"]), {**recorded, "resumed": True}
    budgets = detect_budgets(cfg.device_memory, cfg.host_memory, device_type)
    plan = build_plan(cfg, budgets, world_size=world_size if cfg.fsdp else 1, margin=cfg.memory_margin)
    row = plan.recommended
    if row is None:
        raise NothingFits(nothing_fits_message(plan, cfg))
    chosen = row.setting.overrides()
    if cfg.method != "auto":  # gamma=auto alone: the method's other keys stay as given
        chosen = {"gamma": chosen["gamma"]}
    record = {"asked": {"method": cfg.method, "gamma": cfg.gamma}, "resolved": chosen, "label": row.setting.label,
              "predicted_device_bytes": row.prediction.device, "predicted_host_bytes": row.prediction.host,
              "predicted_parts_bytes": row.prediction.parts, "peak_phase": row.prediction.phase,
              "device_memory": format_size(budgets.device), "host_memory": format_size(budgets.host),
              "device_memory_source": budgets.device_source, "host_memory_source": budgets.host_source,
              "margin": cfg.memory_margin}
    return _apply(cfg, chosen, record["device_memory"], record["host_memory"]), record


def _apply(cfg: TrainConfig, chosen: dict[str, Any], device_memory: str, host_memory: str) -> TrainConfig:
    out = dataclasses.replace(cfg, **chosen, device_memory=device_memory, host_memory=host_memory)
    if cfg.lr is None:  # the chosen method's own rate, as an explicit method would have had
        out.lr = traits(out.method).lr
    return out


def choice_line(record: dict[str, Any]) -> str:
    """The one logged line: what auto chose, what it predicts, and within which budgets."""
    keys = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in record["resolved"].items())
    how = "kept from plan.json (resumed run)" if record.get("resumed") else \
        f"the most capable setting that fits device_memory={record['device_memory']} and " \
        f"host_memory={record['host_memory']} with {record['margin']:.0%} to spare"
    return (f"auto: {keys} -- {how}; predicted peak {record['predicted_device_bytes'] / GiB:.2f} GiB on the device, "
            f"{record['predicted_host_bytes'] / GiB:.2f} GiB on the host (grass-ft plan shows every setting)")


def write_record(out: Path, record: dict[str, Any]) -> None:
    from ..base.atomic import write_json_atomic

    write_json_atomic(out / PLAN_FILE, {k: v for k, v in record.items() if k != "resumed"})


def peak_line(record: dict[str, Any] | None, measured: int, device_type: str) -> tuple[str, bool]:
    """``(line, warn)``: the measured peak after the first step beside the prediction. On a GPU more than 10% off
    is a warning; on a CPU the process's peak RSS includes the Python runtime and the loaded libraries, so both
    are logged without one."""
    predicted = record["predicted_device_bytes"]
    what = "torch.cuda.max_memory_allocated" if device_type == "cuda" else "peak RSS of the process"
    line = (f"memory after the first step: {measured / GiB:.2f} GiB ({what}) against the planner's "
            f"{predicted / GiB:.2f} GiB")
    off = abs(measured - predicted) / max(1, predicted)
    if device_type == "cuda" and off > 0.10:
        return (f"{line}: {off:.0%} off the prediction; please report it with `grass-ft plan ... format=json` "
                f"(docs/PLAN.md)", True)
    return line, False
