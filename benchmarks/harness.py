"""What the benchmark scripts share, in one place: this checkout's package on the path, run bookkeeping (the commit,
package versions, the machine), JSONL records (read whole, the last per key), the experiments' ledgers (a locked
append, the torn-line-tolerant read, a run's claim by a lock the kernel drops when its queue dies), summary
statistics (Student's t, the paired difference's 95 % interval) and plotting (matplotlib, Agg), and report files.

    python benchmarks/harness.py --help
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Hashable, Iterable
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "results"  # the experiments' ledgers and reports


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


# ------------------------------------------------------------------------------------------------- ledgers
# An experiment's ledger: one JSON line per finished run (read with :func:`read_jsonl`), appended under a lock by
# queues running side by side, each run claimed by a lock the kernel drops when its queue dies.


def append_record(record: dict, path: Path) -> None:
    """Append one line under an exclusive lock (two queues never interleave a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if f.tell() > 0:  # a torn last line (a killed append) gets its newline, so this record stands alone
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)


def git_commit() -> tuple[str, bool]:
    """This checkout's full commit and whether tracked files under src/ have changed (a record's provenance)."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no",
                                     "src"], capture_output=True, text=True).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def try_lock(path: Path):
    """An exclusive, non-blocking flock on ``path`` (held while the returned file is open), or None when another
    process (or another open of the file) holds it. The kernel drops it when the holder dies, so a killed queue
    leaves no stale claim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def claim_path(work: Path, key: str) -> Path:
    """The lock file that claims run ``key`` for one queue of the experiment working in ``work``."""
    return work / "claims" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".lock")


# ------------------------------------------------------------------------------------------------ statistics


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile by bisection on its CDF (Simpson's rule on the density): no scipy needed."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:  # P(T <= x) for x >= 0
        n = 2000
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_ci(diffs: list[float]) -> tuple[float, float, float] | None:
    """Mean of paired differences and its 95 % t-interval; None below two pairs."""
    n = len(diffs)
    if n < 2:
        return None
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return m, m - half, m + half


def fmt_ci(ci: tuple[float, float, float] | None, digits: int, scale: float = 1.0, mark: bool = True) -> str:
    """A mean and its interval as ``+m [+lo, +hi]``, scaled, marked where the interval excludes 0 (``mark``)."""
    if ci is None:
        return "–"
    m, lo, hi = (scale * v for v in ci)
    excl = " **excl. 0**" if mark and (lo > 0 or hi < 0) else ""
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{excl}"


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
