"""The one error type for everything a user can cause, at the bottom of the import graph.

Bad configuration, data, model directories, checkpoints, output directories and runs that diverge all raise a
subclass of :class:`UserError`. The CLI prints its message as one line (a :class:`ConfigError` lists every
problem, one per line) and exits with code 2; the traceback appears only with ``--debug`` or
``GRASS_FT_DEBUG=1``. Anything else that escapes is a bug and keeps its traceback. See docs/RELIABILITY.md.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: the message names the key, value, file (and line) and what is allowed."""


class DivergenceError(UserError, RuntimeError):
    """Training diverged (non-finite loss or gradient, or a loss stuck at the uniform level): the message names
    the step and what to change. No ``final/`` or ``summary.json`` is written."""


def not_utf8(path, error: UnicodeDecodeError) -> str:
    """One line for a text file that is not UTF-8: the file, the line and byte offset of the first bad byte, and
    the encoding to save it in (a Latin-1 or Windows-1252 export is the usual cause)."""
    raw, at = error.object, error.start
    line = raw[:at].count(b"\n") + 1
    return f"{path}:{line}: not valid UTF-8 (byte 0x{raw[at]:02x} at offset {at}); save the file as UTF-8"
