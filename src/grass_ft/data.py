"""Training and evaluation data: LLM-Adapters JSON/JSONL files, generated word problems, the Alpaca prompt,
tokenisation with label masking, and a resumable shuffled batch stream.

An *example* is a dict in the LLM-Adapters schema: ``instruction``, ``input`` (may be empty), ``output`` (the
target text, e.g. a chain of thought ending in the answer) and ``answer`` (the gold answer used for scoring).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .tasks import gold_answer

IGNORE_INDEX = -100

# LLM-Adapters' Alpaca-style template (their finetune.py / evaluate.py `generate_prompt`).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

REQUIRED_KEYS = ("instruction", "output")


class DataError(UserError, ValueError):
    """A data file or generator spec that cannot be used; the message names the file, line and problem."""


def format_prompt(example: dict[str, Any]) -> str:
    """The Alpaca-style prompt for an example, ending just before the response."""
    if str(example.get("input") or "").strip():
        return PROMPT_WITH_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT_NO_INPUT.format(instruction=example["instruction"])


# --------------------------------------------------------------------------------------------------- files


def _check_example(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with keys instruction/input/output/answer, "
                        f"got {type(obj).__name__}")
    missing = [k for k in REQUIRED_KEYS if not isinstance(obj.get(k), str)]
    if missing:
        raise DataError(f"{where}: missing or non-string key(s) {', '.join(missing)} "
                        f"(LLM-Adapters schema: instruction, input, output, answer)")
    ex = {"instruction": obj["instruction"], "input": str(obj.get("input") or ""), "output": obj["output"]}
    # LLM-Adapters stores some golds as one-element lists ([2304.0], ["C"]): keep the element
    ex["answer"] = gold_answer(obj["answer"]) if obj.get("answer") is not None else ""
    for k, v in obj.items():  # keep extra fields (e.g. task) for reporting
        ex.setdefault(k, v)
    return ex


def load_json_examples(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON list or a JSONL file in the LLM-Adapters schema.

    Raises:
        DataError: the file is missing, empty, not valid JSON (with the line number), or an entry lacks
            ``instruction``/``output``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        examples = [_check_example(o, f"{path}: entry {i}") for i, o in enumerate(items)]
    else:
        examples = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object per "
                                f"line (JSONL) or a JSON list") from None
            examples.append(_check_example(obj, f"{path}:{lineno}"))
    if not examples:
        raise DataError(f"data file {path} holds no examples")
    return examples


# ----------------------------------------------------------------------------------------------- generators


def _rg_examples(name: str, n: int, seed: int, **kwargs: Any) -> list[dict[str, Any]]:
    """Word problems from reasoning-gym, as LLM-Adapters examples with a chain-of-thought target."""
    import reasoning_gym

    out = []
    for item in reasoning_gym.create_dataset(name, size=n, seed=seed, **kwargs):
        answer = str(item["answer"]).strip()
        cot = item.get("metadata", {}).get("answer_cot")
        output = cot.strip() if cot else f"The answer is {answer}"
        # LLM-Adapters math targets end in "The answer is N"; GSM8K's "#### N" is rewritten to that.
        if "####" in output:
            output = output.split("####")[0].rstrip() + f"\nThe answer is {answer}"
        out.append({"instruction": item["question"].strip(), "input": "", "output": output,
                    "answer": answer, "task": name})
    return out


EASY_ARITH = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ("+", "*"),
              "allow_parentheses": False, "allow_negation": False}

# name -> parts of (reasoning-gym dataset, share of examples, dataset options)
GENERATORS: dict[str, tuple[tuple[str, float, dict[str, Any]], ...]] = {
    "gsm_symbolic": (("gsm_symbolic", 1.0, {}),),
    "chain_sum": (("chain_sum", 1.0, {}),),
    "basic_arithmetic": (("basic_arithmetic", 1.0, {}),),
    # Single-digit sums and products: SmolLM2-135M gets about half right as loaded (docs/DEFAULTS.md).
    "easy_arith": (("basic_arithmetic", 1.0, EASY_ARITH),),
    # The default: GSM-style chain-of-thought problems mixed with single-digit arithmetic.
    "gsm-mix": (("gsm_symbolic", 0.25, {}), ("basic_arithmetic", 0.75, EASY_ARITH)),
}

# Disjoint seed ranges: train draws from seed, held-out from seed + EVAL_SEED_OFFSET.
EVAL_SEED_OFFSET = 1_000_003


def generate_examples(name: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` generated examples from a generator in :data:`GENERATORS`, shuffled deterministically."""
    if name not in GENERATORS:
        raise DataError(f"unknown data generator {name!r}; known: {', '.join(GENERATORS)} "
                        f"(or give a .json/.jsonl file)")
    parts = GENERATORS[name]
    out: list[dict[str, Any]] = []
    for i, (ds, share, options) in enumerate(parts):
        k = n - len(out) if i == len(parts) - 1 else int(round(n * share))
        out.extend(_rg_examples(ds, k, seed + 7919 * i, **options))
    random.Random(seed).shuffle(out)
    return out


def is_file_spec(spec: str) -> bool:
    return spec.endswith((".json", ".jsonl")) or Path(spec).is_file()


def load_train_eval(data: str, eval_data: str | None, n_train: int, n_eval: int,
                    seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training examples and held-out examples.

    A generator gives ``n_train`` problems from ``seed`` and ``n_eval`` from a disjoint seed. A file is used
    whole for training unless ``eval_data`` is absent, in which case the last ``n_eval`` examples (after a
    seeded shuffle) are held out.
    """
    if is_file_spec(data):
        train = load_json_examples(data)
        if eval_data is None and n_eval > 0:
            random.Random(seed).shuffle(train)
            if len(train) <= n_eval:
                raise DataError(f"data file {data} has {len(train)} examples, too few to hold out "
                                f"eval_samples={n_eval}; give eval_data=FILE or lower eval_samples")
            train, held = train[:-n_eval], train[-n_eval:]
        else:
            held = []
    else:
        train = generate_examples(data, n_train, seed)
        held = generate_examples(data, n_eval, seed + EVAL_SEED_OFFSET) if (eval_data is None and n_eval) else []
    if eval_data is not None and n_eval > 0:
        held = (load_json_examples(eval_data) if is_file_spec(eval_data)
                else generate_examples(eval_data, n_eval, seed + EVAL_SEED_OFFSET))[:n_eval]
    return train, held


# ------------------------------------------------------------------------------------------- tokenisation


def tokenize_example(tokenizer, example: dict[str, Any], max_seq_len: int,
                     train_on_inputs: bool = False) -> dict[str, list[int]]:
    """Token ids of prompt + output + EOS, with the prompt's labels masked unless ``train_on_inputs``."""
    prompt_ids = tokenizer(format_prompt(example), add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_seq_len]
    labels = list(ids) if train_on_inputs else ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_seq_len]
    return {"input_ids": ids, "labels": labels}


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenised examples into a training batch."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


GROUP_BATCHES = 16


@dataclass
class BatchStream:
    """An endless, seeded, shuffled stream of batches over tokenised examples; its position can be saved.

    Each epoch is a fresh permutation from ``seed + epoch``, so the stream is a pure function of
    ``(seed, epoch, index)`` and resuming needs only those numbers. ``rank``/``world_size`` shard every
    batch so that the global batch is the same for any number of processes.
    """

    features: list[dict[str, list[int]]]
    batch_size: int
    pad_id: int
    seed: int = 0
    epoch: int = 0
    index: int = 0
    rank: int = 0
    world_size: int = 1

    group_by_length: bool = True
    _cached: tuple = field(default=(None, None), init=False, repr=False, compare=False)  # ((seed, epoch), order)

    def _order(self) -> list[int]:
        """This epoch's example order: a seeded shuffle; with ``group_by_length``, each run of
        ``GROUP_BATCHES`` batches is sorted by length and its batches shuffled again, so a batch pads little
        (as transformers' ``group_by_length``). Full batches only; the ragged tail is dropped."""
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.features)))
        rng.shuffle(order)
        if not self.group_by_length:
            return order
        span = self.batch_size * GROUP_BATCHES
        batches = []
        for start in range(0, len(order) - self.batch_size + 1, span):
            chunk = sorted(order[start:start + span], key=lambda i: -len(self.features[i]["input_ids"]))
            batches += [chunk[j:j + self.batch_size] for j in range(0, len(chunk) - self.batch_size + 1,
                                                                     self.batch_size)]
        rng.shuffle(batches)
        return [i for b in batches for i in b]

    def _epoch_order(self) -> list[int]:
        """:meth:`_order` computed once per (seed, epoch), not at every batch."""
        key = (self.seed, self.epoch)
        if self._cached[0] != key:
            self._cached = (key, self._order())
        return self._cached[1]

    def next_batch(self) -> dict[str, torch.Tensor]:
        order = self._epoch_order()
        if self.index + self.batch_size > len(order):  # drop the ragged tail: every batch is full-size
            self.epoch, self.index = self.epoch + 1, 0
            order = self._epoch_order()
        chosen = order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        mine = chosen[self.rank::self.world_size]
        return collate([self.features[i] for i in mine], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
