"""Atomic checkpoints of the native loop, and exact resume.

A checkpoint ``output_dir/checkpoint-N`` (N = completed steps) holds:
``model.safetensors`` (weights, tied tensors once), ``optimizer.pt`` (state keyed by parameter name),
``scheduler.pt``, ``grass_state.pt`` (sampler: MGN, window sums, probabilities, active set, generator state;
runner counters; torch RNG states) and ``trainer_state.json`` (step, data position, running totals).
It is written into a hidden temporary directory and renamed into place, so a directory named
``checkpoint-N`` is always complete and ``resume=auto`` can never pick a half-written one.

With ``fsdp=true`` the weights and optimizer state are sharded over the ranks and go through
``torch.distributed.checkpoint`` (DCP) instead: ``.metadata`` and one ``__<rank>_0.distcp`` file per rank replace
``model.safetensors`` and ``optimizer.pt``; every rank writes its shards into the same temporary directory, rank 0
the rest, and rank 0 renames it into place (:func:`save_sharded_checkpoint`).

``trainer_state.json`` also records the run that wrote it (``run``: every configuration key that changes the
trained weights, see :func:`run_keys`, plus the number of processes) and the size of every file (``files``).
Resume refuses a checkpoint whose run differs from this one, naming the keys; ``resume=auto`` skips a damaged
checkpoint (a file missing, truncated or unreadable) with a warning and takes the next older one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ..base.atomic import atomic_dir, remove_dir
from ..base.errors import UserError
from ..model.export import write_loadable

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
REQUIRED = ("model.safetensors", "optimizer.pt", "scheduler.pt", "grass_state.pt", "trainer_state.json")
REQUIRED_DCP = (".metadata", "scheduler.pt", "grass_state.pt", "trainer_state.json")  # fsdp=true (and *.distcp)


def required_files(path: Path) -> tuple[str, ...]:
    """The files a checkpoint must hold: a sharded (DCP) one is known by its ``.metadata``."""
    return REQUIRED_DCP if (path / ".metadata").is_file() else REQUIRED


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed from; the message names the path and what is wrong."""


# Keys that change only what is evaluated, logged or saved (or how fast), never the trained weights: a resumed
# run may change them. Every other configuration key (including ones added later) must match the checkpoint.
NOT_RUN_KEYS = frozenset({
    "output_dir", "resume", "overwrite_output_dir", "eval_data", "task", "eval_samples", "eval_batch_size",
    "eval_before", "eval_loss_only_tasks", "max_new_tokens", "logging_steps", "save_steps", "save_total_limit",
    "max_bad_steps", "gradient_checkpointing", "merge_lora", "device_memory", "host_memory", "memory_margin",
    "run_name", "save_dtype", "eval_steps", "early_stopping_patience",
})


def run_keys(config: dict[str, Any], world_size: int = 1) -> dict[str, Any]:
    """The values that define a run (what a checkpoint records and resume compares): every configuration key
    but :data:`NOT_RUN_KEYS`, with local ``model``/``data`` paths made absolute, and ``world_size`` (the global
    batch is ``batch_size`` x processes)."""
    run = {k: v for k, v in config.items() if k not in NOT_RUN_KEYS}
    for k in ("model", "data"):
        if isinstance(run.get(k), str) and Path(run[k]).exists():
            run[k] = str(Path(run[k]).resolve())
    fingerprint = data_fingerprint(run.get("data"))
    return {**run, "world_size": world_size, **({"data_sha256": fingerprint} if fingerprint else {})}


def data_fingerprint(spec: Any) -> str | None:
    """SHA-256 (first 16 hex digits) of a local data file's bytes, or of a data directory's files (names and
    bytes); None for a generator or hub data set, which the other run keys pin. The same path with other contents
    (issue 28: an edited file under resume=auto) is another run."""
    p = Path(spec) if isinstance(spec, str) else None
    if p is None or not p.exists():
        return None
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return _hash_files(str(p), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=8)
def _hash_files(root: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    """The hash of the files in ``stamp`` (path, size, mtime): read once per process while none of them changes
    (a run records it in every checkpoint)."""
    h = hashlib.sha256()
    for path, _, _ in stamp:
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def check_same_run(path: Path, recorded: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming every key whose value differs between ``recorded`` (from the
    checkpoint) and ``current`` (this run); keys only one side knows are compared with nothing."""
    if recorded is None:
        raise CheckpointError(f"{path} does not record the run that wrote it (written by an older grass-ft), so "
                              f"resuming from it cannot be checked; start a new run")
    diff = [f"{k}={recorded[k]!r} there, {current[k]!r} here" + (" (the data file changed since the run began)"
                                                                   if k == "data_sha256" else "")
            for k in current if k in recorded and recorded[k] != current[k]]
    if diff:
        raise CheckpointError(f"{path} belongs to a different run: {'; '.join(diff)}. Resume with the "
                              f"checkpoint's values, or start a new run (another output_dir, or "
                              f"overwrite_output_dir=true)")


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
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, s in saved["state"].items():
        p = params[name]
        optimizer.state[p] = {k: place_state(k, v, p, group_of[id(p)]) for k, v in s.items()}


def place_state(key: str, value: Any, param: torch.Tensor, group: dict[str, Any]) -> Any:
    """A loaded torch-optimizer state value, on the device and in the dtype the optimizer kind expects
    (``torch.optim.Optimizer.load_state_dict``'s own policy; our loader bypasses it to key state by name).

    ``step`` stays a CPU scalar for the per-tensor and foreach AdamW, but fused and capturable AdamW keep it on
    the parameter's device in fp32 and refuse a CPU one beside CUDA parameters; every other tensor goes to the
    parameter's device, in its dtype when it is floating point.
    """
    if not torch.is_tensor(value):
        return value
    if key == "step":
        if group.get("fused") or group.get("capturable"):
            return value.to(device=param.device, dtype=torch.float32)
        return value
    if param.is_floating_point():
        return value.to(device=param.device, dtype=param.dtype)
    return value.to(device=param.device)


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
        files = {f: (tmp / f).stat().st_size for f in REQUIRED if f != "trainer_state.json"}
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step, "files": files},
                                                           indent=1))
    if save_total_limit > 0:
        for old in list_checkpoints(out)[:-save_total_limit]:
            remove_dir(old)  # disappears at once: a kill mid-delete leaves no half checkpoint under its name
    return final


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are hidden and never match)."""
    found = []
    for p in out.iterdir() if out.is_dir() else []:
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in required_files(p)):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (a file missing, truncated or unreadable), or None if it looks sound.

    Reads only headers and sizes, not the tensors: enough to catch a truncated copy or a killed ``cp``.
    """
    if not path.is_dir():
        return "no such directory"
    missing = [f for f in required_files(path) if not (path / f).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        int(state["step"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        return f"trainer_state.json is unreadable ({type(e).__name__})"
    for f, size in (state.get("files") or {}).items():
        if not (path / f).is_file():
            return f"missing {f}"
        if (path / f).stat().st_size != size:
            return f"{f} has {(path / f).stat().st_size} bytes, {size} were written"
    if required_files(path) is REQUIRED_DCP:  # the shards' sizes were checked above; DCP reads them on load
        for f in ("scheduler.pt", "grass_state.pt"):
            if not zipfile.is_zipfile(path / f):
                return f"{f} is not a complete torch.save archive"
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as st:
            st.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        return f"model.safetensors is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    for f in ("optimizer.pt", "scheduler.pt", "grass_state.pt"):
        if not zipfile.is_zipfile(path / f):  # torch.save writes a zip archive whose directory is at the end
            return f"{f} is not a complete torch.save archive"
    return None


def find_checkpoint(out: Path, resume: str | None, warnings: list[str] | None = None) -> Path | None:
    """``resume=auto``: the newest sound checkpoint in ``out`` (None if there is none; a damaged newer one is
    skipped with a message appended to ``warnings``); ``resume=PATH``: that checkpoint, which must be sound.

    Raises:
        CheckpointError: ``resume=PATH`` is not a sound checkpoint, or ``resume=auto`` finds checkpoints and
            every one of them is damaged.
    """
    if not resume:
        return None
    if resume == "auto":
        found = sorted((int(m.group(1)), p) for p in (out.iterdir() if out.is_dir() else [])
                       if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir())
        damaged = []
        for _, p in reversed(found):
            problem = checkpoint_problem(p)
            if problem is None:
                if damaged and warnings is not None:
                    warnings.append(f"skipping damaged {'; '.join(damaged)}; resuming from {p}")
                return p
            damaged.append(f"{p} ({problem})")
        if damaged:
            raise CheckpointError(f"`resume=auto`: every checkpoint in {out} is damaged: {'; '.join(damaged)}; "
                                  f"give resume=PATH, or start over with overwrite_output_dir=true")
        return None
    path = Path(resume)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"`resume` {resume!r} is not a complete checkpoint ({problem})")
    return path


def checkpoint_run(path: Path) -> dict[str, Any] | None:
    """The run keys a checkpoint recorded (None for one written before they were recorded)."""
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("run")


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights, optimizer and scheduler in place; returns ``(trainer_state, extra_state)``."""
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except Exception as e:  # noqa: BLE001 - damage the header check could not see (a corrupted tensor block)
        raise CheckpointError(f"{path}/model.safetensors cannot be read: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}/model.safetensors does not match the model; missing: {sorted(missing)[:5]}, "
                              f"unexpected: {sorted(unexpected)[:5]}")
    loaded = {}
    for f in ("optimizer.pt", "scheduler.pt", "grass_state.pt"):
        try:
            loaded[f] = torch.load(path / f, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged archive raises RuntimeError, EOFError, pickle errors
            raise CheckpointError(f"{path}/{f} cannot be read: {str(e).splitlines()[0]}") from None
    load_optimizer_state_by_name(optimizer, model, loaded["optimizer.pt"], str(path / "optimizer.pt"))
    scheduler.load_state_dict(loaded["scheduler.pt"])
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    return trainer_state, loaded["grass_state.pt"]


def rng_state() -> dict[str, Any]:
    """This process's random state: torch's CPU generator and, once CUDA is in use, its current device's (only
    that one: another process, or another GPU count on resume, owns the others)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states() -> dict[str, Any]:
    """Every rank's :func:`rng_state`, in rank order, for a checkpoint. Under torch.distributed it is a
    collective: every rank calls it, though rank 0 alone may write the checkpoint."""
    import torch.distributed as dist

    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"per_rank": [mine]}
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return {"per_rank": states}


def set_rng_state(state: dict[str, Any], rank: int | None = None, world_size: int | None = None) -> str | None:
    """Restore this rank's random state from :func:`gather_rng_states`'s record (or an older checkpoint's
    ``{"torch", "cuda": [every GPU's]}``, read as rank 0's). ``rank``/``world_size`` default to torch.distributed's.

    Returns a warning for the caller to show when the checkpoint was written by another number of processes:
    rank r then takes saved rank r mod N's state, so random draws and the data order differ from an
    uninterrupted run.
    """
    import torch.distributed as dist

    if rank is None or world_size is None:
        on = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
    if "per_rank" in state:
        saved = state["per_rank"]
    else:  # written before per-rank states: rank 0's, with the CUDA state of every GPU it saw
        cuda = state.get("cuda")
        saved = [{"torch": state["torch"], **({"cuda": cuda} if cuda is not None else {})}]
    mine = saved[rank % len(saved)]
    torch.set_rng_state(mine["torch"])
    cuda = mine.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # the old record: every GPU's, though this run may see fewer
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    if len(saved) != world_size:
        return (f"the checkpoint holds the random state of {len(saved)} process(es) and this run has {world_size}: "
                f"each rank resumes from saved rank (its rank mod {len(saved)}), so random draws and the data order "
                f"differ from an uninterrupted run")
    return None


def truncate_jsonl(path: Path, before_step: int) -> None:
    """Keep the lines of a metrics/layers log whose ``step`` is below ``before_step`` (resume continues it)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < before_step]
    path.write_text("".join(ln + "\n" for ln in keep))


# ------------------------------------------------------------------------------- sharded (fsdp=true), DCP


def save_sharded_checkpoint(out: Path, step: int, model, optimizer, scheduler, extra_state: dict[str, Any],
                            trainer_state: dict[str, Any], save_total_limit: int, is_main: bool) -> Path:
    """Every rank: write ``checkpoint-<step>`` of an FSDP2 model through DCP, atomically (rank 0 renames).

    The optimizer must be :class:`~grass_ft.method.offload.LayerwiseOffloadAdamW` (``fsdp`` always makes it): its
    per-rank state is saved as DTensors of the parameters' placement; which names have which state, and the
    param groups (the same on every rank), go into ``grass_state.pt``.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from ..parallel.fsdp import optimizer_state_to_dtensors

    final = out / f"checkpoint-{step}"
    with atomic_dir(final) if is_main else nullcontext() as tmp:
        box = [str(tmp) if is_main else None]
        dist.broadcast_object_list(box, src=0)  # the temporary name rank 0 drew, for every rank to write into
        tmp = Path(box[0])
        osd = optimizer.state_dict()
        params = dict(model.named_parameters())
        dcp.save({"model": get_model_state_dict(model),
                  "optimizer": optimizer_state_to_dtensors(osd["state"], params)}, checkpoint_id=str(tmp))
        if is_main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({**extra_state, "optimizer_layout": {n: sorted(e) for n, e in osd["state"].items()},
                        "optimizer_groups": osd["param_groups"]}, tmp / "grass_state.pt")
            files = {f.name: f.stat().st_size for f in tmp.iterdir()}
            (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step, "files": files},
                                                               indent=1))
        dist.barrier()  # every rank's shards are written before rank 0 renames the directory into place
    if is_main and save_total_limit > 0:
        for old in list_checkpoints(out)[:-save_total_limit]:
            remove_dir(old)
    dist.barrier()  # no rank goes on (and may be killed) before the checkpoint exists under its name
    return final


def load_sharded_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every rank: restore an FSDP2 model, its optimizer and scheduler from a DCP checkpoint, in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from ..parallel.fsdp import optimizer_state_from_dtensors, optimizer_state_template

    if required_files(path) is not REQUIRED_DCP:
        raise CheckpointError(f"{path} was written without fsdp (model.safetensors); resume it without fsdp")
    try:
        extra = torch.load(path / "grass_state.pt", weights_only=True)
        sched = torch.load(path / "scheduler.pt", weights_only=True)
        params = dict(model.named_parameters())
        state = {"model": get_model_state_dict(model),
                 "optimizer": optimizer_state_template(extra["optimizer_layout"], params)}
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 - DCP and torch.load raise many types for a damaged checkpoint
        raise CheckpointError(f"{path} cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None
    set_model_state_dict(model, state["model"])
    optimizer.load_state_dict({"state": optimizer_state_from_dtensors(state["optimizer"]),
                               "param_groups": extra["optimizer_groups"]})
    scheduler.load_state_dict(sched)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    return trainer_state, extra
