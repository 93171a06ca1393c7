"""The module-level call trace of one ``grass-ft train`` (issue 30): which grass_ft modules a run enters, in order.

Runs ``grass-ft train`` in this process under ``sys.setprofile`` and records every call that goes from one grass_ft
module into another (the caller is the nearest grass_ft frame, so calls made for us by ``datasets`` or torch count
as our own module's). By default the run is the default run on a tiny model saved on the fly (a 4-block Llama and a
character tokenizer, as the tests build theirs: tests/tiny.py) with a few examples of the default data, so it takes
seconds; ``key=value`` arguments are passed to ``grass-ft train`` and win over those.

    python tools/call_trace.py                  # the stages of the data path and each evaluation
    python tools/call_trace.py --all            # every module entry, consecutive repeats counted
    python tools/call_trace.py data=FILE.jsonl  # another run

The data path is read as four stages, each a module of :mod:`grass_ft.data`: load (``sources``, ``generators``) ->
normalise (``examples``) -> tokenize (``tokenize``) -> batch (``batches``, ``packing``). :func:`check` is what
tests/test_layout.py asserts: the stages are entered in that order, nothing goes back to loading or normalising once
tokenisation has begun (no format told, no task resolved, no row normalised again), and the run enters the evaluation
package once per evaluation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STAGES = {"data.sources": "load", "data.generators": "load", "data.examples": "normalise",
          "data.tokenize": "tokenize", "data.batches": "batch", "data.packing": "batch"}
ORDER = ("load", "normalise", "tokenize", "batch")
# The decisions the loader makes once per example: none of them may run again after tokenisation has begun.
DECISIONS = {("data.formats", "detect_format"), ("data.formats", "check_row"), ("data.formats", "format_prompt"),
             ("data.formats", "chat_messages"), ("data.examples", "normalise"), ("data.formats", "tagged"),
             ("data.examples", "row_format"), ("base.tasks", "example_task")}
SMALL = ["train_samples=16", "eval_samples=4", "max_steps=2", "max_new_tokens=4", "batch_size=4",
         "eval_batch_size=4", "save_steps=0"]


@dataclass
class Trace:
    """The module entries of one run: ``(caller, callee, function)``, modules without the ``grass_ft.`` prefix."""

    entries: list[tuple[str, str, str]] = field(default_factory=list)

    def evaluations(self) -> list[tuple[int, int]]:
        """``(first, last)`` entry index of each evaluation: from the run's call of
        :func:`grass_ft.evaluation.evaluate.evaluate` (the one entry point) to the last entry made from inside the
        evaluation package (or from the data and answer-rule modules it calls)."""
        spans, start = [], None
        inside = ("evaluation.", "data.", "base.")
        for i, (caller, callee, fn) in enumerate(self.entries):
            if start is None and (callee, fn) == ("evaluation.evaluate", "evaluate") and not caller.startswith(inside):
                start = i
            elif start is not None and not caller.startswith(inside):
                spans.append((start, i - 1))
                start = None
        if start is not None:
            spans.append((start, len(self.entries) - 1))
        return spans


def trace_run(argv: list[str]) -> Trace:
    """``grass-ft train ARGV`` in this process, traced (the run's own exit status must be 0)."""
    from grass_ft.cli import main

    trace = Trace()

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        if not callee.startswith("grass_ft."):
            return
        up = frame.f_back
        while up is not None and not up.f_globals.get("__name__", "").startswith("grass_ft."):
            up = up.f_back
        caller = up.f_globals["__name__"] if up is not None else "(outside)"
        if caller != callee and frame.f_code.co_name != "<module>":  # a module run at import is no call
            trace.entries.append((caller.removeprefix("grass_ft."), callee.removeprefix("grass_ft."),
                                  frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        code = main(["train", "--quiet", *argv])
    finally:
        sys.setprofile(None)
    if code != 0:
        raise SystemExit(f"grass-ft train {' '.join(argv)} exited {code}")
    return trace


def check(trace: Trace) -> list[str]:
    """What breaks the one pass through the data (empty: nothing). See the module docstring."""
    problems, reached = [], -1
    evals = trace.evaluations()
    in_eval = {i for a, b in evals for i in range(a, b + 1)}
    tokenised = next((i for i, (_, callee, _) in enumerate(trace.entries) if callee == "data.tokenize"), None)
    for i, (caller, callee, fn) in enumerate(trace.entries):
        stage = STAGES.get(callee)
        if stage is not None and i not in in_eval:
            if ORDER.index(stage) < reached:
                problems.append(f"entry {i}: {caller} -> {callee}.{fn} goes back to {stage} after {ORDER[reached]}")
            reached = max(reached, ORDER.index(stage))
        if tokenised is not None and i > tokenised and (callee, fn) in DECISIONS:
            problems.append(f"entry {i}: {caller} -> {callee}.{fn} decides again after tokenisation began")
        if i in in_eval and callee.startswith("data.") and stage not in ("tokenize", "batch"):
            problems.append(f"entry {i}: an evaluation enters {callee}.{fn}")
    first = [s for s in ORDER if any(STAGES.get(c) == s for _, c, _ in trace.entries)]
    if first != list(ORDER):
        problems.append(f"the data stages entered: {first}, expected {list(ORDER)}")
    return problems


def collapsed(entries: list[tuple[str, str, str]]) -> list[str]:
    """One line per run of equal ``caller -> callee`` entries."""
    lines: list[str] = []
    last, count = None, 0
    for caller, callee, fn in [*entries, ("", "", "")]:
        if (caller, callee) == last:
            count += 1
            continue
        if last is not None:
            lines.append(f"{last[0]} -> {last[1]}" + (f" x{count}" if count > 1 else "") + f"  ({first_fn})")
        last, count, first_fn = (caller, callee), 1, fn
    return lines


def report(trace: Trace, every: bool = False) -> list[str]:
    """The lines printed: every entry (``every``), or the data path's stages in order and each evaluation's
    entries. A stage's line counts the entries into its module, consecutive ones together, from whichever module
    (the loader, the recipe, the loop); helpers the stages consult (``data.formats``, ``base.tasks``) are left out
    here and shown by ``--all``."""
    if every:
        return collapsed(trace.entries)
    evals = trace.evaluations()
    in_eval = {i for a, b in evals for i in range(a, b + 1)}
    path = [(STAGES[m], m, f) for i, (_, m, f) in enumerate(trace.entries) if i not in in_eval and m in STAGES]
    lines = ["the data path (entries into the stages of grass_ft.data, outside the evaluations):"]
    lines += [f"  {line}" for line in collapsed(path)]
    for k, (a, b) in enumerate(evals, 1):
        lines.append(f"evaluation {k} (entries {a}-{b}):")
        lines += [f"  {line}" for line in collapsed(trace.entries[a:b + 1])]
    problems = check(trace)
    lines.append(f"{len(evals)} evaluations; " + ("one pass through the data: no stage entered out of order, no decision "
                                                  "made again" if not problems else "; ".join(problems)))
    return lines


def tiny_model(path: Path) -> Path:
    """The tests' tiny Llama and character tokenizer (tests/tiny.py), saved as a model directory."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save_tiny_model

    return save_tiny_model(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every module entry, not only the data path and evaluations")
    ap.add_argument("overrides", nargs="*", help="key=value for grass-ft train")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        given = {a.split("=", 1)[0] for a in args.overrides}
        model = [] if "model" in given else [f"model={tiny_model(Path(tmp) / 'model')}"]
        run = [*model, *[a for a in SMALL if a.split("=", 1)[0] not in given], f"output_dir={Path(tmp) / 'run'}",
               *args.overrides]
        trace = trace_run(run)
    print("\n".join(report(trace, args.all)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
