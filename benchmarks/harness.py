"""What the benchmark scripts share, in one place: this checkout's package on the path, run bookkeeping (the commit,
package versions, the machine), JSONL records (read whole, the last per key), summary statistics and plotting
(matplotlib, Agg), and report files.

The ledger (a locked append, the torn-line-tolerant read) and the paired intervals (Student's t, the paired
difference's confidence interval) live in quality.py, which frontier*.py import them from: the quality experiment's
queue runs on them now, so they move here, with their import paths kept, once its ledger is complete (issue 30).

    python benchmarks/harness.py --help
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Hashable, Iterable
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def use_checkout() -> None:
    """Import grass_ft from this checkout's ``src/`` when it is not installed (``pip install -e .``)."""
    try:
        import grass_ft  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))


# ------------------------------------------------------------------------------------------ run bookkeeping


def git_revision(dirty: bool = True) -> str:
    """This checkout's short commit, ``+dirty`` when tracked files have changed (``dirty``), or ``unknown``."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        changed = dirty and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                           capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if changed else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names: Iterable[str] = ("torch", "transformers", "peft"),
                     missing: str = "not installed") -> dict[str, str]:
    """The installed version of each package, ``missing`` for one that is not installed."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = missing
    return out


def cpu_name() -> str:
    """The CPU as the platform names it (its model, else the architecture)."""
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------- records


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSONL file (none when it is missing; a torn line skipped): the package's own reader, the
    one ``grass-ft plot`` reads runs with."""
    use_checkout()
    from grass_ft.run.report import read_jsonl as read

    return read(path)


def latest(records: Iterable[dict], key: Callable[[dict], Hashable | None]) -> dict[Hashable, dict]:
    """The last record of each ``key`` (records whose key is None are left out)."""
    out: dict[Hashable, dict] = {}
    for r in records:
        k = key(r)
        if k is not None:
            out[k] = r
    return out


def write_lines(path: Path, lines: list[str]) -> None:
    """A report's lines as a file, and one line on stderr naming it."""
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ statistics


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


# ------------------------------------------------------------------------------------------------ plotting


def pyplot():
    """``matplotlib.pyplot`` drawing to files (the Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int = 110) -> str:
    """A figure written (tight layout) and closed; returns its file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path.name


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
