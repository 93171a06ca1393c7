"""Loaders for evaluation sets, each returning examples in the LLM-Adapters schema with a ``task`` key.

Supported sources:

* one LLM-Adapters JSON list or JSONL file (:func:`load_eval_file`);
* LLM-Adapters' ``dataset/<name>/test.json`` layout, several tasks at once, the task read from the folder name
  (:func:`load_eval_sets`);
* a BIG-bench multiple-choice ``task.json`` (examples with ``input`` and ``target_scores``), converted to the
  LLM-Adapters commonsense format (:func:`load_bigbench`);
* a generator name from :data:`grass_ft.data.GENERATORS`, drawn from held-out seeds (:func:`load_eval_data`).

Gold answers stored as one-element lists (LLM-Adapters' math test files) are reduced to their last element.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .. import data as data_mod
from ..data.formats import DataError
from ..base.tasks import canonical_task, choice_target, gold_answer, is_valid_label

log = logging.getLogger(__name__)


def _finish(examples: list[dict[str, Any]], task: str | None, override: bool) -> list[dict[str, Any]]:
    out = []
    for ex in examples:
        ex = dict(ex)
        ex["answer"] = gold_answer(ex.get("answer", ""))
        if task is not None and (override or not ex.get("task")):
            ex["task"] = task
        out.append(ex)
    return out


def load_eval_file(path: str | Path, task: str | None = None) -> list[dict[str, Any]]:
    """Examples from one data file in any format of docs/DATA.md (LLM-Adapters JSON/JSONL, messages, ...).

    Args:
        path: the file (``.json``, ``.jsonl``, ``.parquet``, ``.csv``).
        task: task name (or alias) for examples without a ``task`` key; examples that carry one keep it.

    Raises:
        DataError: the file cannot be read (see :func:`grass_ft.data.load_examples`).
        ValueError: ``task`` has no answer rule.
    """
    canon = canonical_task(task) if task is not None else None
    return _finish(data_mod.load_examples(str(path)), canon, override=False)


def load_eval_sets(path: str | Path, tasks: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Test sets from LLM-Adapters' ``dataset/<name>/test.json`` layout, keyed by canonical task name.

    ``path`` is the folder holding the task folders (``path/<name>/test.json``) or one task folder itself
    (``path/test.json``). The folder name gives the task (``ARC-Easy`` -> ``arc-e``) and overrides any ``task``
    key in the file.

    Args:
        path: the dataset folder.
        tasks: task names or aliases to load; ``None`` loads every folder whose name is a known task
            (others are skipped with a warning).

    Raises:
        DataError: ``path`` is not a folder, holds no test sets, or lacks a requested task.
        ValueError: a name in ``tasks`` has no answer rule.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"evaluation folder {root} does not exist or is not a folder")
    folders = [root] if (root / "test.json").is_file() else sorted(
        d for d in root.iterdir() if d.is_dir() and (d / "test.json").is_file())
    found: dict[str, Path] = {}
    skipped = []
    for d in folders:
        try:
            found[canonical_task(d.name)] = d / "test.json"
        except ValueError:
            skipped.append(d.name)
    wanted = [canonical_task(t) for t in tasks] if tasks is not None else list(found)
    missing = [t for t in wanted if t not in found]
    if missing or not wanted:
        have = ", ".join(f"{found[t].parent.name} ({t})" for t in found) or "none"
        raise DataError(f"evaluation folder {root}: no <task>/test.json for {', '.join(missing) or 'any task'}; "
                        f"found: {have}" + (f"; skipped folders without an answer rule: {', '.join(skipped)}"
                                            if skipped else ""))
    if skipped and tasks is None:
        log.warning("skipped test sets without an answer rule: %s", ", ".join(skipped))
    return {t: _finish(data_mod.load_json_examples(found[t]), t, override=True) for t in wanted}


# LLM-Adapters' commonsense wording for questions with numbered answers (ARC, OBQA, SIQA).
_MC_INSTRUCTION = "Please choose the correct answer to the question: {question}\n\n{options}\n\nAnswer format: {fmt}"


def bigbench_to_example(item: dict[str, Any], task: str, where: str) -> dict[str, Any] | None:
    """One BIG-bench multiple-choice example in the LLM-Adapters commonsense format.

    Options keep ``target_scores`` order and become ``Answer1: ... Answer2: ...``; the gold is ``answer<k>`` for
    the option with the highest score. Returns ``None`` when several options share the highest score (the
    gold would be ambiguous).

    Raises:
        DataError: the item lacks ``input`` or a ``target_scores`` mapping with at least two options.
    """
    scores = item.get("target_scores") if isinstance(item, dict) else None
    if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(item.get("input"), str):
        raise DataError(f"{where}: expected a multiple-choice example with 'input' (text) and 'target_scores' "
                        f"(at least two options); generative BIG-bench tasks are not supported")
    options = list(scores)
    values = [float(scores[o]) for o in options]
    best = max(values)
    if values.count(best) > 1:
        return None
    k = values.index(best) + 1
    labels = [f"answer{i}" for i in range(1, len(options) + 1)]
    instruction = _MC_INSTRUCTION.format(
        question=item["input"].strip(),
        options=" ".join(f"Answer{i}: {str(o).strip()}" for i, o in enumerate(options, start=1)),
        fmt="/".join(labels))
    return {"instruction": instruction, "input": "", "output": choice_target(f"answer{k}"),
            "answer": f"answer{k}", "task": task, "choices": labels}


def load_bigbench(path: str | Path, task: str = "bigbench") -> list[dict[str, Any]]:
    """A BIG-bench ``task.json`` (or a folder holding one) as LLM-Adapters commonsense examples.

    Args:
        path: the ``task.json`` file or its folder.
        task: the answer rule to score with; the default ``bigbench`` reads ``answer<k>`` for any ``k``. A
            commonsense task (``siqa``, ``arc-e``, ...) may be given when every example's options fit its labels.

    Raises:
        DataError: the file is missing, not JSON, not multiple-choice, or no example has a unique best option;
            or an example has more options than ``task``'s labels allow.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "task.json"
    if not p.is_file():
        raise DataError(f"BIG-bench task file {p} does not exist")
    try:
        obj = json.loads(data_mod.read_utf8(p))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("examples"), list):
        raise DataError(f"{p}: expected a BIG-bench task object with an 'examples' list")
    canon = canonical_task(task)
    out, ambiguous = [], 0
    for i, item in enumerate(obj["examples"]):
        ex = bigbench_to_example(item, canon, f"{p}: example {i}")
        if ex is None:
            ambiguous += 1
            continue
        if not all(is_valid_label(canon, c) for c in ex["choices"]):
            raise DataError(f"{p}: example {i} has {len(ex['choices'])} options, which task {task!r} cannot "
                            f"score; use task='bigbench' (any number of options)")
        out.append(ex)
    if ambiguous:
        log.warning("%s: skipped %d example(s) whose highest target score is shared", p, ambiguous)
    if not out:
        raise DataError(f"{p}: no multiple-choice example with a unique correct option")
    return out


def _is_bigbench_file(p: Path) -> bool:
    if p.name == "task.json":
        return True
    if p.suffix != ".json":
        return False
    with p.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    return head.startswith("{") and '"examples"' in head


def load_eval_data(spec: str | Path, task: str | None = None, n: int | None = None,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Evaluation examples from any supported source, at most ``n`` per task.

    Args:
        spec: a JSON/JSONL file, an LLM-Adapters dataset folder, a BIG-bench ``task.json`` (or its folder), or
            a generator name from :data:`grass_ft.data.GENERATORS`.
        task: task name for examples without one; for a dataset folder, the single task to load (``None``: all);
            for a BIG-bench file, the answer rule (default ``bigbench``); ignored for generators, whose
            examples carry their reasoning-gym dataset name.
        n: keep the first ``n`` examples of each task (``None``: all). Required for generators.
        seed: generator seed; examples come from ``seed + data.EVAL_SEED_OFFSET``, disjoint from training.

    Raises:
        DataError: ``spec`` names nothing loadable (the message lists what is accepted), or a file is bad.
    """
    if n is not None and n < 1:
        raise DataError(f"eval_samples must be a positive number of examples or None (all), got {n}")
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        if (p / "task.json").is_file():
            examples = load_bigbench(p, task or "bigbench")
        else:
            sets = load_eval_sets(p, [task] if task else None)
            return [ex for exs in sets.values() for ex in exs[:n]]
    elif p.is_file():
        examples = load_bigbench(p, task or "bigbench") if _is_bigbench_file(p) else load_eval_file(p, task)
    elif s in data_mod.GENERATORS:
        if n is None:
            raise DataError(f"generator {s!r} needs a number of examples (eval_samples)")
        return data_mod.generate_examples(s, n, seed + data_mod.EVAL_SEED_OFFSET)
    else:
        raise DataError(f"evaluation data {s!r} is neither a file, a folder nor a generator; give a .json/.jsonl "
                        f"file, an LLM-Adapters dataset folder (<task>/test.json), a BIG-bench task.json, or one "
                        f"of: {', '.join(data_mod.GENERATORS)}")
    if n is None:
        return examples
    # first n of each task, keeping file order
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        t = str(ex.get("task"))
        if seen.get(t, 0) < n:
            seen[t] = seen.get(t, 0) + 1
            out.append(ex)
    return out
