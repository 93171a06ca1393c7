"""The output directory of a run: locked for the run, cleared of what the run replaces, written so that a failed
write never leaves anything half-done under a finished name (docs/RELIABILITY.md)."""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ..base.atomic import remove_dir, remove_stale_temporaries
from .checkpoint import CHECKPOINT_RE
from .messages import warn
from .preflight import FINISHED, PLOT_FILES, RUN_FILES, RunError

LOCK_NAME = ".grass-ft.lock"


@contextmanager
def output_dir_lock(out: Path):
    """Hold ``out`` for this run: a second run on the same directory (concurrent, on this host or over a shared
    filesystem with POSIX locks) is refused before it removes or writes anything.

    An exclusive ``flock`` on ``out/.grass-ft.lock``, which the kernel releases when the process ends, however it
    ends (a killed run leaves no stale lock: its file is taken over). The file is removed when the run ends; a
    lock taken on a file another run removed meanwhile is retried on the new one.
    """
    path = out / LOCK_NAME
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunError(f"`output_dir` {str(out)!r} is in use by another run ({holder}); wait for it to end or "
                           f"choose another output_dir") from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the run that held it removed the file between our open and our lock: lock the new one
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still holding the lock, so nobody has taken this file meanwhile
        f.close()  # releases the lock


def prepare_output_dir(path: str | Path, resuming: bool = False,
                       held: ExitStack | None = None, decide=None) -> Path:
    """Create ``path`` (after :func:`~grass_ft.run.preflight.preflight` allowed it) and clear what this run replaces.

    With ``held``, the directory is locked for the run (:func:`output_dir_lock`, released when ``held`` closes)
    before anything in it is removed, and ``decide()`` runs under the lock: the checks made before it (without the
    lock) may be stale, since another run may have finished there meanwhile (issue 28: the second run deleted the
    first's finished run). A directory this run created is removed again if the run leaves it empty.

    Removes the hidden temporaries a killed write left, then a previous run's outputs: all of them for a new
    run (the checks allowed that only for an empty directory or with ``overwrite_output_dir``); for a resumed
    run only ``final/``, ``summary.json`` and the evaluation files, so that a run that fails never looks finished.
    """
    out = Path(path)
    if held is not None and not out.exists():
        held.callback(_remove_if_empty, out)  # runs after the lock is released (an ExitStack unwinds in reverse)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"`output_dir` {str(out)!r} is not writable: {e.strerror}") from None
    if held is not None:
        held.enter_context(output_dir_lock(out))
    if decide is not None:
        decide()
    removed = remove_stale_temporaries(out)
    if removed:
        warn(f"removed {len(removed)} unfinished temporary file(s) a killed run left in {out}: {', '.join(removed)}")
    replaced = [*FINISHED, "eval.json", "predictions.jsonl"] if resuming else list(RUN_FILES)
    stale = [out / n for n in replaced]
    if not resuming:
        stale += [p for p in out.iterdir() if CHECKPOINT_RE.match(p.name)]
    if not resuming and any(p.exists() for p in stale):
        warn(f"overwrite_output_dir: replacing the previous run in {out} "
             f"({', '.join(p.name for p in stale if p.exists())})")
    if not resuming:
        stale += [out / n for n in PLOT_FILES]  # a new run's plots replace the old run's (or are left out, as it is)
    for path_ in stale:
        if path_.is_dir():
            remove_dir(path_)
        elif path_.exists():
            path_.unlink()
    return out


def _remove_if_empty(out: Path) -> None:
    """Remove ``out`` if nothing is in it (a run that failed before writing anything leaves no directory)."""
    try:
        out.rmdir()
    except OSError:
        pass  # not empty (the run wrote something, or another run did): kept


@contextmanager
def writing(path: Path):
    """A failed write (disk full, quota, permissions) becomes one line naming the path; nothing half-written
    stays under that name (the atomic helpers see to that)."""
    try:
        yield
    except OSError as e:
        interrupt = _interrupt_behind(e)
        if interrupt is not None:  # Ctrl-C mid-write (issue 28: "Bad file descriptor" from a torn-down file)
            raise interrupt from None
        raise RunError(f"cannot write {path}: {e.strerror or e}; earlier checkpoints are intact") from None


def _interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that an OSError was raised while handling (a second Ctrl-C, or the first one
    tearing down a file being written, turns into e.g. EBADF on close): the run was interrupted, not refused
    by the disk, and the interruption's own message says what is on disk."""
    seen = error.__context__
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return seen
        seen = seen.__context__
    return None
