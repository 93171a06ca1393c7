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
