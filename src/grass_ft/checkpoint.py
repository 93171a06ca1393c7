"""Atomic checkpoints of the native loop, and exact resume.

A checkpoint ``output_dir/checkpoint-N`` (N = completed steps) holds:
``model.safetensors`` (weights, tied tensors once), ``optimizer.pt`` (state keyed by parameter name),
``scheduler.pt``, ``grass_state.pt`` (sampler: MGN, window sums, probabilities, active set, generator state;
runner counters; torch RNG states) and ``trainer_state.json`` (step, data position, running totals).
It is written into a hidden temporary directory and renamed into place, so a directory named
``checkpoint-N`` is always complete and ``resume=auto`` can never pick a half-written one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from .atomic import atomic_dir
from .export import write_loadable

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
REQUIRED = ("model.safetensors", "optimizer.pt", "scheduler.pt", "grass_state.pt", "trainer_state.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the path and what is wrong."""


# ------------------------------------------------------------------------------- name-keyed optimizer state


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Any]:
    """The optimizer's state dict with per-parameter state keyed by parameter name.

    Our offloading optimizer already keys by name; a plain torch optimizer's positional state is translated
    through the model's parameter names, so a checkpoint survives a change of the trainable set.
    """
    if hasattr(optimizer, "memory_report"):
        return {"format": "by-name", "state_dict": optimizer.state_dict()}
    name_of = {id(p): n for n, p in model.named_parameters()}
    state = {name_of[id(p)]: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "param_names": [name_of[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"format": "torch-by-name", "state": state, "param_groups": groups}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                                 saved: dict[str, Any], where: str) -> None:
    if saved["format"] == "by-name":
        optimizer.load_state_dict(saved["state_dict"])
        return
    params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params.items()}
    expected = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved_names = [n for g in saved["param_groups"] for n in g["param_names"]]
    missing = sorted(set(expected) - set(saved_names))
    unexpected = sorted(set(saved_names) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: optimizer state does not match this run's parameters; missing: "
                              f"{missing or 'none'}; unexpected: {unexpected or 'none'}")
    for group, sg in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in sg.items() if k != "param_names"})
    optimizer.state.clear()
    for name, s in saved["state"].items():
        p = params[name]
        optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()}


# ----------------------------------------------------------------------------------------------- save / find


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, extra_state: dict[str, Any],
                    trainer_state: dict[str, Any], save_total_limit: int, tokenizer=None) -> Path:
    """Write ``checkpoint-<step>`` atomically, then keep only the newest ``save_total_limit``. With the
    config, generation config and tokenizer beside the weights, ``from_pretrained`` opens it (export.py)."""
    final = out / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        write_loadable(model, tokenizer, tmp)
        torch.save(optimizer_state_by_name(optimizer, model), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(extra_state, tmp / "grass_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=1))
    if save_total_limit > 0:
        for old in list_checkpoints(out)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are hidden and never match)."""
    found = []
    for p in out.iterdir() if out.is_dir() else []:
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in REQUIRED):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    """``resume=auto``: the newest complete checkpoint in ``out`` (None if there is none);
    ``resume=PATH``: that checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if not path.is_dir() or missing:
        raise CheckpointError(f"`resume` {resume!r} is not a complete checkpoint"
                              + (f" (missing {', '.join(missing)})" if path.is_dir() else " (no such directory)"))
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights, optimizer and scheduler in place; returns ``(trainer_state, extra_state)``."""
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}/model.safetensors does not match the model; missing: {sorted(missing)[:5]}, "
                              f"unexpected: {sorted(unexpected)[:5]}")
    load_optimizer_state_by_name(optimizer, model, torch.load(path / "optimizer.pt", weights_only=True),
                                 str(path / "optimizer.pt"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    extra = torch.load(path / "grass_state.pt", weights_only=True)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    return trainer_state, extra


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def truncate_jsonl(path: Path, before_step: int) -> None:
    """Keep the lines of a metrics/layers log whose ``step`` is below ``before_step`` (resume continues it)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < before_step]
    path.write_text("".join(ln + "\n" for ln in keep))
