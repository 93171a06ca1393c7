#!/usr/bin/env python
"""The one-GPU check (issues 12, 29): the CUDA paths no CPU test reaches, and measured memory beside the estimate,
end to end in at most 6 minutes on one H100-class GPU. ``benchmarks/gpu_check.sh`` (``make gpu-check``) runs it.

    bash benchmarks/gpu_check.sh            # a machine with a CUDA GPU; outputs in $OUT (default runs/gpu_check)
    bash benchmarks/gpu_check.sh --smoke    # the same arms on a CPU, each in its CPU form: the rehearsal

Each arm runs in its own process group under its own time bound, and all of them under the 6-minute deadline (an
arm that would start with less than 15 s left is skipped and says so); each prints one line, ``ok``, ``skip`` or
``fail``, and a summary line ends the run. The machine may be bare and offline: the package comes from this
checkout (``PYTHONPATH=src``), models are random-weight ones built from configs, and the hub is switched off.

| arm | bound | what it checks |
|---|---|---|
| import | 45 s | python, torch, CUDA and the device; grass_ft imported from this checkout's src/ |
| gpu_tests | 110 s | ``pytest -m gpu`` (every test of a CUDA path; the three selections below apart) |
| fused_adamw_resume | 45 s | fused AdamW: load-then-step and resume-then-step (issue 29, defect 1) |
| pure_bf16 | 40 s | bf16 without master weights: fft on fused AdamW, grass offloaded |
| pinning_fallback | 40 s | a failed cudaHostRegister: fallback, warned once, no stale CUDA error |
| memory_tinyllama | 130 s | peak memory of every method on TinyLlama-1.1B shapes against the estimator's records |
| step_7b | 110 s | one GRASS step on LLaMA-2-7B shapes, if the GPU and host memory allow it |

The memory arms run ``benchmarks/gpu_memory.py`` (bf16, batch 4 x 1024, gradient checkpointing, 2 warm-up steps
with GRASS's 1 probe step, then measured steps) and compare each peak with ``docs/results/memory_estimate.jsonl``.

Outputs (a few files, so that all of them come back from a lent machine): ``summary.json`` (every arm's status,
seconds, bound and figures; rewritten after each arm), ``gpu_check.txt`` (the lines printed) and ``logs.tar.gz``
(each arm's full output and the benchmark's reports). Exit code: 0 when no arm failed (skips allowed), 1 when one
failed, 2 for bad arguments or, without ``--smoke``, no CUDA device. Test hooks (tests/test_gpu_paths.py):
``GPU_CHECK_DEADLINE=S`` and ``GPU_CHECK_BOUNDS=arm=S,...`` replace the deadline and arms' bounds;
``GPU_CHECK_STALL=arm=S,...`` makes those arms start a child process (its pid appended to ``$OUT/stalled.pids``)
and wait S seconds before their work, so that a bound is passed on any machine, however fast.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the shared harness, however this runs
from harness import git_revision, latest, read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 360.0  # the whole check, summary included
RESERVE_S = 5.0  # kept back from the deadline for the summary and the archive
MIN_START_S = 15.0  # an arm is not started with less than this left
GIB = 2**30
ESTIMATES = ROOT / "docs" / "results" / "memory_estimate.jsonl"
SEPARATE = ("fused_adamw", "pure_bf16", "pinning_fallback")  # gpu tests that are arms of their own
TINY_METHODS = "fft,lora,dora,lisa,grass-no-offload,grass,grass-static,grass-head"
ARMS: list[tuple[str, float]] = [("import", 45), ("gpu_tests", 110), ("fused_adamw_resume", 45), ("pure_bf16", 40),
                                 ("pinning_fallback", 40), ("memory_tinyllama", 130), ("step_7b", 110)]


# -------------------------------------------------------------------------------- arms (each in its process)


def arm_import(smoke: bool, limit: float, work: Path) -> dict:
    fig: dict = {"python": sys.version.split()[0], "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE")}
    import torch

    fig.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if fig["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        fig.update(device=props.name, device_count=torch.cuda.device_count(),
                   device_gib=round(props.total_memory / GIB, 2), capability=f"{props.major}.{props.minor}")
    fig["host_available_gib"] = round(_host_available() / GIB, 1)
    import grass_ft

    fig["grass_ft"] = str(Path(grass_ft.__file__).resolve().parent)
    fig["commit"] = git_revision()
    for pkg in ("transformers", "peft"):
        try:
            fig[pkg] = __import__(pkg).__version__
        except ImportError:
            fig[pkg] = None
    if Path(fig["grass_ft"]) != ROOT / "src" / "grass_ft":
        return {"status": "fail", "note": f"grass_ft imported from {fig['grass_ft']}, not this checkout's src/", **fig}
    if not smoke and not fig["cuda_available"]:
        return {"status": "fail", "note": "no CUDA device is available (run with --smoke on a CPU)", **fig}
    where = f"{fig['device']} ({fig['device_gib']} GiB)" if fig["cuda_available"] else "no CUDA device (smoke)"
    return {"status": "ok", "note": f"commit {fig['commit']}, torch {fig['torch']}, {where}", **fig}


class _Outcomes:
    """A pytest plugin counting what each test did."""

    def __init__(self) -> None:
        self.passed, self.failed, self.skipped, self.failures = 0, 0, 0, []

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            self.failed += 1
            self.failures.append(report.nodeid)
        elif report.skipped:
            self.skipped += 1
        elif report.passed and report.when == "call":
            self.passed += 1


def _pytest(select: str, paths: list[str]) -> dict:
    import pytest

    counts = _Outcomes()
    rc = int(pytest.main([*paths, "-m", "gpu", "-k", select, "-q", "-rfEs", "-p", "no:cacheprovider",
                          "--rootdir", str(ROOT)], plugins=[counts]))
    fig = {"pytest_exit": rc, "passed": counts.passed, "failed": counts.failed, "skipped": counts.skipped,
           "failures": counts.failures, "selection": select}
    if rc == 5:
        return {"status": "fail", "note": f"-k {select!r} selected no test", **fig}
    if counts.failed or rc != 0:
        return {"status": "fail", "note": f"{counts.failed} failed: {', '.join(counts.failures)[:300]}", **fig}
    if counts.passed == 0:
        return {"status": "skip", "note": f"all {counts.skipped} selected tests skipped (no CUDA device)", **fig}
    return {"status": "ok", "note": f"{counts.passed} passed, {counts.skipped} skipped", **fig}


def arm_gpu_tests(smoke: bool, limit: float, work: Path) -> dict:
    return _pytest(" and ".join(f"not {s}" for s in SEPARATE), [str(ROOT / "tests")])


def arm_fused_adamw_resume(smoke: bool, limit: float, work: Path) -> dict:
    return _pytest("fused_adamw", [str(ROOT / "tests" / "test_gpu_paths.py")])


def arm_pure_bf16(smoke: bool, limit: float, work: Path) -> dict:
    return _pytest("pure_bf16", [str(ROOT / "tests" / "test_gpu_paths.py")])


def arm_pinning_fallback(smoke: bool, limit: float, work: Path) -> dict:
    return _pytest("pinning_fallback", [str(ROOT / "tests" / "test_gpu_paths.py")])


def estimates(path: Path = ESTIMATES) -> dict[tuple[str, str], dict]:
    """The estimator's records in gpu_memory.py's setting (checkpointing on, sdpa, batch 4 x 1024), by (model,
    arm); the last record of a key wins, as in benchmarks/memory_estimate.py."""
    def key(r: dict) -> tuple[str, str] | None:
        setting = (r.get("status") == "ok" and r.get("checkpointing") and r.get("attn") == "sdpa"
                   and (r.get("batch_size"), r.get("seq_len")) == (4, 1024))
        return (r["model"], r["arm"]) if setting else None

    return latest(read_jsonl(path), key)


def _gib(b: float | None) -> float | None:
    return None if b is None else round(b / GIB, 3)


def _gpu_memory(model: str, methods: str, smoke: bool, budget: float, arm_timeout: float, report: Path) -> list[dict]:
    """benchmarks/gpu_memory.py on one model, its records (one JSON line per method on its stdout)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_memory.py"), "--models", model, "--methods", methods,
           "--warmup", "2", "--probe-steps", "1", "--steps", "1" if smoke else "2", "--checkpointing", "on",
           "--budget", f"{budget:.0f}", "--arm-timeout", f"{arm_timeout:.0f}", "--out", str(report)]
    proc = subprocess.run(cmd + (["--smoke"] if smoke else []), stdout=subprocess.PIPE, text=True)
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]


def _against_estimates(records: list[dict], model: str) -> list[dict]:
    est = estimates()
    rows = []
    for r in records:
        e = est.get((model, r["method"]), {})
        peak, e_peak = r.get("peak_gib"), _gib(e.get("train_peak"))
        rows.append({"method": r["method"], "status": r["status"], "error": r.get("error"),
                     "peak_gib": peak, "estimate_peak_gib": e_peak,
                     "measured_over_estimate": round(peak / e_peak, 3) if peak and e_peak else None,
                     "probe_peak_gib": r.get("probe_peak_gib"), "estimate_probe_peak_gib": _gib(e.get("probe_peak")),
                     "tokens_per_s": r.get("tokens_per_s"), "step_s": r.get("step_s"),
                     "opt_state_host_gib": r.get("opt_state_host_gib"), "wall_s": r.get("wall_s")})
    return rows


def _memory_status(rows: list[dict], what: str) -> dict:
    """fail when a method failed (an error, out of memory, a timeout) or none ran; methods gpu_memory.py skipped
    for lack of time are named, not failed."""
    ran = [r for r in rows if r["status"] != "skipped"]
    bad = [f"{r['method']} {r['status']}" for r in ran if r["status"] != "ok"]
    ratios = [r["measured_over_estimate"] for r in ran if r["measured_over_estimate"]]
    spread = f"; measured/estimate {min(ratios):.2f}-{max(ratios):.2f}" if ratios else "; no estimate to compare"
    skipped = [r["method"] for r in rows if r["status"] == "skipped"]
    spread += f"; skipped for time: {', '.join(skipped)}" if skipped else ""
    if not ran or bad:
        return {"status": "fail", "note": f"{what}: " + (", ".join(bad) if bad else "no method ran"), "rows": rows}
    return {"status": "ok", "note": f"{what}: {len(ran)} methods{spread}", "rows": rows}


def arm_memory_tinyllama(smoke: bool, limit: float, work: Path) -> dict:
    # the smoke rehearses the arm with one method; every method's CPU form is in tests/test_benchmark_smoke.py
    methods = "grass" if smoke else TINY_METHODS
    records = _gpu_memory("tinyllama", methods, smoke, limit - 10, 35, work / "gpu_memory_tinyllama.md")
    model = "smoke-tiny" if smoke else "tinyllama"
    return _memory_status(_against_estimates(records, model), "smoke model (no estimate)" if smoke else
                          "TinyLlama-1.1B")


def _host_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def arm_step_7b(smoke: bool, limit: float, work: Path) -> dict:
    """One GRASS step on LLaMA-2-7B shapes where the GPU holds the estimated peak (+10 %: the allocator's rounding
    and cuBLAS/SDPA workspaces) and the host the offloaded state (fp32 moments and masters, pinned) + 8 GiB."""
    e = estimates().get(("llama2-7b", "grass"))
    if e is None:
        return {"status": "fail", "note": f"no llama2-7b grass record in {ESTIMATES.name}"}
    need_gpu = 1.10 * max(e["train_peak"], e.get("probe_peak") or 0)
    need_host = e["host_bytes"] + 8 * GIB
    import torch

    have_gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    have_host = _host_available()
    fig = {"need_gpu_gib": _gib(need_gpu), "have_gpu_gib": _gib(have_gpu), "need_host_gib": _gib(need_host),
           "have_host_gib": _gib(have_host), "estimate_peak_gib": _gib(e["train_peak"])}
    fits = have_gpu >= need_gpu and have_host >= need_host
    if smoke:  # the decision as it would be here, then the same run on the tiny model
        records = _gpu_memory("llama2-7b", "grass", True, limit - 5, limit - 10, work / "gpu_memory_7b_smoke.md")
        out = _memory_status(_against_estimates(records, "smoke-tiny"), "smoke model")
        return {**out, "note": out["note"] + f" (a 7B step here: {'would run' if fits else 'would be skipped'})",
                **fig}
    if limit < 60:
        return {"status": "skip", "note": f"{limit:.0f} s left: too little for a 7B step (about 60 s)", **fig}
    if not fits:
        return {"status": "skip", "note": f"needs {fig['need_gpu_gib']:.1f} GiB GPU and {fig['need_host_gib']:.1f} "
                                          f"GiB free host memory; has {fig['have_gpu_gib']:.1f} and "
                                          f"{fig['have_host_gib']:.1f}", **fig}
    records = _gpu_memory("llama2-7b", "grass", False, limit - 10, limit - 15, work / "gpu_memory_llama2-7b.md")
    return {**_memory_status(_against_estimates(records, "llama2-7b"), "LLaMA-2-7B grass"), **fig}


ARM_FUNCTIONS = {name: globals()[f"arm_{name}"] for name, _ in ARMS}


# ------------------------------------------------------------------------------------------- orchestration


def _env() -> dict[str, str]:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else ""), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}


def _run_arm(name: str, limit: float, smoke: bool, work: Path) -> tuple[str, str, dict, int | None]:
    """Runs one arm in its own process group, killed (with whatever it started) at ``limit``."""
    result = work / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_arm", name, "--_limit", f"{limit:.0f}",
           "--_work", str(work)] + (["--smoke"] if smoke else [])
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return "fail", f"timed out after {limit:.0f} s", {}, None
    if not result.is_file():
        return "fail", f"exited with code {rc} without a result (see its log)", {}, rc
    fig = json.loads(result.read_text())
    return fig.pop("status"), fig.pop("note", ""), fig, rc


def _per_arm(variable: str) -> dict[str, float]:
    """A test hook's ``arm=S,...`` value as {arm: seconds}."""
    return {k: float(v) for k, _, v in (x.partition("=") for x in os.environ.get(variable, "").split(",") if x)}


def _stall(arm: str, out: Path) -> None:
    """The test hook GPU_CHECK_STALL: a child that outlives this arm unless the arm's group is killed, then S s."""
    seconds = _per_arm("GPU_CHECK_STALL").get(arm, 0.0)
    if seconds > 0:
        child = subprocess.Popen(["sleep", f"{seconds + 60:.0f}"])
        with open(out / "stalled.pids", "a") as f:
            f.write(f"{child.pid}\n")
        time.sleep(seconds)


def _archive(out: Path, work: Path) -> None:
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for f in sorted(work.iterdir()):
            tar.add(f, arcname=f.name)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"gpu_check: {message} (allowed: --smoke)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    ap = _OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the CPU rehearsal: the same arms, each in its CPU form")
    ap.add_argument("--_arm", help=argparse.SUPPRESS)
    ap.add_argument("--_limit", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--_work", help=argparse.SUPPRESS)
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args._arm:  # one arm, in its own process: its result as JSON for the orchestrator
        work = Path(args._work)
        _stall(args._arm, work.parent)
        res = ARM_FUNCTIONS[args._arm](args.smoke, args._limit, work)
        (work / f"{args._arm}.json").write_text(json.dumps(res, indent=1, default=str))
        return 0

    out = Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    work = out / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    deadline = float(os.environ.get("GPU_CHECK_DEADLINE") or DEADLINE_S)
    bounds = _per_arm("GPU_CHECK_BOUNDS")
    t0 = time.monotonic()
    summary = {"check": "gpu_check", "mode": "smoke (CPU)" if args.smoke else "CUDA",
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "commit": None, "deadline_s": deadline, "arms": []}  # the commit: from the import arm
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        (out / "gpu_check.txt").write_text("\n".join(lines) + "\n")

    say(f"[gpu_check] {summary['mode']}, {summary['date']}, deadline {deadline:.0f} s")
    import_failed = False
    for name, bound in ARMS:
        bound = bounds.get(name, bound)
        left = deadline - RESERVE_S - (time.monotonic() - t0)
        started = time.monotonic()
        limit = min(bound, left)
        if import_failed:
            status, note, fig, rc = "skip", "the import check failed", {}, None
        elif left < MIN_START_S:
            status, note, fig, rc = "skip", f"{max(left, 0):.0f} s left of the {deadline:.0f} s deadline", {}, None
        else:
            status, note, fig, rc = _run_arm(name, limit, args.smoke, work)
        seconds = time.monotonic() - started
        import_failed = import_failed or (name == "import" and status == "fail")
        summary["commit"] = summary["commit"] or fig.get("commit")
        summary["arms"].append({"arm": name, "status": status, "seconds": round(seconds, 1), "bound_s": bound,
                                "limit_s": round(max(limit, 0), 1), "exit": rc, "note": note, **fig})
        say(f"[gpu_check] {name}: {status} ({seconds:.0f} s of {max(limit, 0):.0f} s)" + (f": {note}" if note else ""))
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    counts = {s: sum(a["status"] == s for a in summary["arms"]) for s in ("ok", "skip", "fail")}
    total = time.monotonic() - t0
    summary.update(total_s=round(total, 1), **counts)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _archive(out, work)
    shutil.rmtree(work, ignore_errors=True)
    say(f"[gpu_check] summary: {counts['ok']} ok, {counts['skip']} skip, {counts['fail']} fail in {total:.0f} s "
        f"(deadline {deadline:.0f} s); figures in {out / 'summary.json'}, logs in {out / 'logs.tar.gz'}")
    if import_failed and not args.smoke and not summary["arms"][0].get("cuda_available", True):
        return 2
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
