"""Write a directory or file so that it appears complete or not at all (temporary name, then rename).

Temporary names start with a dot and a known prefix (``.final-``, ``.checkpoint-12-``, ``.summary.json.tmp``,
``.trash-``), so a process killed mid-write (SIGKILL, power loss) leaves only hidden debris that the next run in
the same output directory removes (:func:`remove_stale_temporaries`), never a directory that looks finished.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# what atomic_dir / write_json_atomic / remove_dir leave behind when killed; nothing else is ever removed
STALE_RE = re.compile(r"^\.(final|merged|checkpoint-\d+|trash)-[A-Za-z0-9_]{4,}$|^\.[\w.-]+\.json\.tmp$")


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``target``; on success it replaces ``target`` by a rename.

    If the body raises (or the process dies), ``target`` is untouched and no directory named like it exists, so
    a half-written model or checkpoint is never mistaken for a finished one. The directory gets the mode any
    other new directory would (0755 under the usual umask), not ``mkdtemp``'s private 0700.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        _usual_modes(tmp)
        if target.exists():
            remove_dir(target)
        tmp.rename(target)  # atomic on one filesystem
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _usual_modes(root: Path) -> None:
    """Give every file under ``root`` the mode a new file gets (0644 under umask 022): writers that go through a
    private temporary file (transformers' ``save_pretrained`` writes ``model.safetensors`` so) leave 0600, which
    other users of a shared run directory cannot read (issue 28)."""
    mode = 0o666 & ~_umask()
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and (p.stat().st_mode & 0o777) != mode:
            p.chmod(mode)


def remove_dir(path: Path) -> None:
    """Delete a directory so that it disappears at once: rename to a hidden name, then delete that.

    A process killed while deleting leaves a hidden ``.trash-*`` directory, never a half-deleted one under the
    original name (a checkpoint missing files that ``resume=auto`` could pick).
    """
    trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=path.parent))
    path.rename(trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temporaries(directory: Path) -> list[str]:
    """Remove what a killed write left in ``directory`` (names matching :data:`STALE_RE`); returns the names.

    Only the run that owns ``directory`` may call this (two runs never share an output directory).
    """
    removed = []
    for p in directory.iterdir() if directory.is_dir() else []:
        if STALE_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, so that it is valid JSON (null, never NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (non-finite floats become null) under a temporary name, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=1, allow_nan=False))
    os.replace(tmp, path)
