"""Answer rules for evaluation tasks, following LLM-Adapters (Hu et al., 2023).

Each task maps to one rule applied to the generated response (the text after ``### Response:``):

* **number** (gsm8k, svamp, addsub, multiarith, singleeq, mawps, and the reasoning-gym generators
  gsm_symbolic, basic_arithmetic, chain_sum): remove every comma, find all matches of ``-?\\d+\\.?\\d*`` and take
  the *last*; correct when ``|pred - gold| <= 0.001``. As in LLM-Adapters' ``extract_answer_number``, the
  pattern is applied to the raw text, so ``"5-3"`` yields ``5`` then ``-3`` (last: ``-3``), ``".5"`` yields
  ``5`` and a trailing full stop is kept (``"18."`` -> 18.0).
* **letter** (aqua): the *first* upper-case ``A``-``E`` anywhere in the response, exactly like LLM-Adapters'
  ``extract_answer_letter`` (``re.findall(r'A|B|C|D|E', ...)``). That regex also matches the capital of an
  ordinary word ("After ..." -> ``A``); we keep the quirk so numbers stay comparable with published tables.
* **label** (boolq, piqa, siqa, arc-e, arc-c, obqa, hellaswag, winogrande): the *first* occurrence of one of the
  task's labels (``true|false``, ``solution1|solution2``, ``answer1``-``answer5``, ``ending1``-``ending4``,
  ``option1|option2``), case-sensitive and not anchored to word boundaries, as in LLM-Adapters'
  ``commonsense_evaluate.py`` (so "True" does not match and "untrue" matches ``true``). Correct on exact
  string equality with the gold label.
* **bigbench** (our BIG-bench multiple-choice conversion, which may have more than five options): the first
  ``answer<k>`` for any positive integer ``k`` (``answer10`` is read whole, never as ``answer1``).

Choices of ours where LLM-Adapters is silent or unusable:

* Nothing found -> the extracted answer is ``None`` and the example is incorrect (LLM-Adapters returns
  ``inf`` / ``""`` which compares unequal to every gold).
* Gold answers stored as a one-element list (LLM-Adapters' ``dataset/gsm8k/test.json`` has ``[2304.0]``, AQuA
  ``["C"]``), or the ``str()`` of such a list, are reduced to their last element, as their older
  ``data.get('answer')[-1]`` did. Numeric golds are parsed with the same comma-stripping number rule; a gold
  with no number is a data error (``ValueError``), not a wrong prediction.
* Log-likelihood scoring (:data:`TASK_CHOICES`) uses the LLM-Adapters commonsense target
  ``"the correct answer is <label>"`` (:func:`choice_target`); AQuA has no such target (its outputs are chains
  of thought ending "The answer is (C)"), so it is generation-only.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from typing import Any

NUMBER_RE = re.compile(r"-?\d+\.?\d*")
NUMBER_TOLERANCE = 1e-3

# canonical task -> rule kind
_NUMERIC = ("gsm8k", "svamp", "addsub", "multiarith", "singleeq", "mawps",
            # reasoning-gym generators used by data.GENERATORS: integer answers, GSM-style outputs
            "gsm_symbolic", "basic_arithmetic", "chain_sum",
            "gsm_symbolic_split")  # gsm_symbolic from a subset of its templates (benchmarks/frontier_data.py)

# canonical task -> option labels, in LLM-Adapters' order. ARC and OBQA questions can have 3-5 options; the
# per-example list is read from the instruction's "Answer format:" line when present (see choices_for).
TASK_CHOICES: dict[str, list[str]] = {
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "siqa": ["answer1", "answer2", "answer3"],
    "arc-e": ["answer1", "answer2", "answer3", "answer4"],
    "arc-c": ["answer1", "answer2", "answer3", "answer4"],
    "obqa": ["answer1", "answer2", "answer3", "answer4"],
    "hellaswag": ["ending1", "ending2", "ending3", "ending4"],
    "winogrande": ["option1", "option2"],
}

# label regexes (first match wins); the answer1..answer5 alternation is LLM-Adapters' for SIQA/ARC/OBQA
_LABEL_RE: dict[str, re.Pattern[str]] = {
    "boolq": re.compile(r"true|false"),
    "piqa": re.compile(r"solution1|solution2"),
    "siqa": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "arc-e": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "arc-c": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "obqa": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "hellaswag": re.compile(r"ending1|ending2|ending3|ending4"),
    "winogrande": re.compile(r"option1|option2"),
    "bigbench": re.compile(r"answer[1-9]\d*"),
}
_LETTER_RE = re.compile(r"A|B|C|D|E")

KNOWN_TASKS: tuple[str, ...] = (*_NUMERIC, "aqua", *TASK_CHOICES, "bigbench")

# lower-cased alias -> canonical name; LLM-Adapters' dataset folder names plus lm-eval's spellings
_ALIASES: dict[str, str] = {
    **{t: t for t in KNOWN_TASKS},
    "social_i_qa": "siqa", "social_iqa": "siqa",
    "arc-easy": "arc-e", "arc_easy": "arc-e",
    "arc-challenge": "arc-c", "arc_challenge": "arc-c",
    "openbookqa": "obqa",
}

_ANSWER_FORMAT_RE = re.compile(r"Answer format:\s*([A-Za-z0-9]+(?:\s*/\s*[A-Za-z0-9]+)+)")


def canonical_task(name: str) -> str:
    """The canonical task name for ``name`` (case-insensitive; LLM-Adapters folder names are aliases).

    Raises:
        ValueError: no answer rule exists for ``name``; the message lists the known tasks.
    """
    key = str(name).strip().lower()
    if key not in _ALIASES:
        aliases = sorted(a for a, c in _ALIASES.items() if a != c)
        raise ValueError(f"no answer rule for task {name!r}; known tasks: {', '.join(KNOWN_TASKS)} "
                         f"(aliases, case-insensitive: {', '.join(aliases)})")
    return _ALIASES[key]


def example_task(example: dict[str, Any], default: str | None = None) -> str | None:
    """The one rule for an example's task: its ``task`` key, else ``default``; written as its canonical name when
    it has an answer rule (so ``GSM8K`` and ``gsm8k`` are one task everywhere), else as given."""
    name = example.get("task") or default
    return task_name(name) if name else None


def task_name(name: str) -> str:
    """``name`` as a task is written everywhere: canonical when it has an answer rule, else as given."""
    try:
        return canonical_task(name)
    except ValueError:
        return str(name)


def named_tasks(names: str | Iterable[str], present: Iterable[str | None]) -> tuple[set[str], str | None]:
    """The tasks a comma-separated list (or a list) names (:func:`task_name`), and the error line when
    one of them is not among the tasks ``present`` (``eval_loss_only_tasks``: a misspelt task must not pass silently).
    """
    raw = names.split(",") if isinstance(names, str) else list(names)
    wanted = {task_name(t.strip()) for t in raw if t.strip()}
    present = set(present)
    missing = sorted(wanted - present)
    if not missing:
        return wanted, None
    return wanted, (f"`eval_loss_only_tasks`: {', '.join(map(repr, missing))} is not a task of the held-out examples "
                    f"(their tasks: {', '.join(sorted(map(str, present)))})")


def is_numeric_task(task: str) -> bool:
    """True when ``task`` is scored by the last-number rule."""
    return canonical_task(task) in _NUMERIC


def extract_answer(task: str, text: str) -> str | float | None:
    """The answer LLM-Adapters' rule for ``task`` reads from a generated response.

    Returns:
        A float for numeric tasks, the label string (``"C"``, ``"answer2"``, ``"true"``) otherwise, or
        ``None`` when the response holds no answer.
    """
    task = canonical_task(task)
    if task in _NUMERIC:
        found = NUMBER_RE.findall(text.replace(",", ""))
        return float(found[-1]) if found else None
    pattern = _LETTER_RE if task == "aqua" else _LABEL_RE[task]
    m = pattern.search(text.strip())
    return m.group(0) if m else None


def gold_answer(raw: Any) -> str:
    """The gold answer as a string: a list (or the ``str`` of a list) gives its last element."""
    if isinstance(raw, str):
        s = raw.strip()
        if s.startswith("[") and s.endswith("]"):
            try:
                raw = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                return s
        else:
            return s
    if isinstance(raw, (list, tuple)):
        if not raw:
            return ""
        raw = raw[-1]
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return str(raw).strip()


def parse_gold(task: str, gold: Any) -> str | float:
    """The gold answer in the form :func:`extract_answer` returns for ``task``.

    Raises:
        ValueError: a numeric task's gold holds no number, or a label task's gold is empty.
    """
    task = canonical_task(task)
    g = gold_answer(gold)
    if task in _NUMERIC:
        found = NUMBER_RE.findall(g.replace(",", ""))
        if not found:
            raise ValueError(f"gold answer {gold!r} for task {task!r} holds no number")
        return float(found[-1])
    if not g:
        raise ValueError(f"gold answer for task {task!r} is empty; expected one of "
                         f"{TASK_CHOICES.get(task, 'A-E' if task == 'aqua' else 'answer<k>')}")
    return g


def answers_match(task: str, predicted: str | float | None, gold: str | float) -> bool:
    """Whether an extracted answer equals a parsed gold answer under ``task``'s rule."""
    if predicted is None:
        return False
    if canonical_task(task) in _NUMERIC:
        return abs(float(predicted) - float(gold)) <= NUMBER_TOLERANCE
    return predicted == gold


def is_correct(task: str, generated_text: str, gold: Any) -> bool:
    """Whether ``generated_text`` answers correctly under LLM-Adapters' rule for ``task``.

    Args:
        task: a task name or alias (see :func:`canonical_task`).
        generated_text: the model's response (without the prompt).
        gold: the gold answer: a number or number string for math tasks, a label otherwise; a one-element
            list is accepted.
    """
    return answers_match(task, extract_answer(task, generated_text), parse_gold(task, gold))


def is_valid_label(task: str, label: str) -> bool:
    """Whether ``label`` is a whole option label that ``task``'s rule can read (``answer3`` for arc-e)."""
    task = canonical_task(task)
    pattern = _LETTER_RE if task == "aqua" else _LABEL_RE.get(task)
    return pattern is not None and pattern.fullmatch(label) is not None


def choice_target(label: str) -> str:
    """The response LLM-Adapters' commonsense data trains on for ``label``, scored in log-likelihood mode."""
    return f"the correct answer is {label}"


def choices_for(example: dict[str, Any], task: str) -> list[str]:
    """Option labels for one multiple-choice example.

    Taken, in order, from the example's ``choices`` list, from the instruction's ``Answer format: a/b/c`` line
    (when every label there fits the task's rule), or from :data:`TASK_CHOICES`.

    Raises:
        ValueError: the task has no fixed options (a numeric task or AQuA) and the example gives none.
    """
    task = canonical_task(task)
    if example.get("choices"):
        return [str(c) for c in example["choices"]]
    found = _ANSWER_FORMAT_RE.findall(str(example.get("instruction", "")))
    if found and task in _LABEL_RE:
        labels = [s.strip() for s in found[-1].split("/")]
        if all(is_valid_label(task, lab) for lab in labels):
            return labels
    if task in TASK_CHOICES:
        return list(TASK_CHOICES[task])
    raise ValueError(f"task {task!r} has no fixed answer options, so it cannot be scored by log-likelihood; "
                     f"use mode='generate' (multiple-choice tasks: {', '.join(TASK_CHOICES)}, bigbench)")
