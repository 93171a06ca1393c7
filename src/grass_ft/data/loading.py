"""Training and evaluation data: local files and hub data sets through ``datasets``, generated word problems,
the Alpaca prompt, tokenisation with label masking (``datasets.map``, cached), and a resumable batch stream.

An *example* is a row in one of the formats of :mod:`grass_ft.formats` (alpaca, prompt_completion, messages,
text). Generated problems and LLM-Adapters files are alpaca rows: ``instruction``, ``input`` (may be empty),
``output`` (the target text, e.g. a chain of thought ending in the answer) and ``answer`` (the gold answer used
for scoring). Any row may carry ``answer`` and ``task`` for scoring.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch

from . import formats
from ..base.errors import UserError, not_utf8
from .formats import IGNORE_INDEX, FormatError
from ..base.tasks import gold_answer
from ..config import holds_out

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


def read_json_objects(path: str | Path) -> list[tuple[str, Any]]:
    """``(where, object)`` for each entry of a JSON list or line of a JSONL file; ``where`` is ``FILE:LINE``
    (JSONL) or ``FILE: entry I`` (JSON list), for error messages.

    Raises:
        DataError: the file is missing, empty or not valid JSON (with the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    text = read_utf8(path)
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        out = [(f"{path}: entry {i}", o) for i, o in enumerate(items)]
    else:
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object per "
                                f"line (JSONL) or a JSON list") from None
    if not out:
        raise DataError(f"data file {path} holds no examples")
    return out


def read_utf8(path: Path) -> str:
    """The text of a data file: UTF-8, with or without the byte-order mark Windows tools write (Excel, Notepad).

    Raises:
        DataError: the file is not UTF-8, naming the line, the byte offset and the encoding to save it in.
    """
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(not_utf8(path, e)) from None


def load_json_examples(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON list or a JSONL file in the LLM-Adapters (alpaca) schema.

    Raises:
        DataError: the file is missing, empty, not valid JSON (with the line number), or an entry lacks
            ``instruction``/``output``.
    """
    return [_check_example(o, where) for where, o in read_json_objects(path)]


# ------------------------------------------------------------------------------------- any source: datasets


DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def source_kind(spec: str) -> str:
    """``generator``, ``file``, ``dir`` or ``hub`` (anything else: a data set id on the Hugging Face hub)."""
    if spec in GENERATORS:
        return "generator"
    p = Path(spec).expanduser()
    if p.is_dir():
        return "dir"
    if p.is_file() or p.suffix in DATA_SUFFIXES:
        return "file"
    return "hub"


def _check_hub_spec(spec: str) -> None:
    """A name that is no generator, file or directory must look like a hub data set id and exist there.

    A bare name is almost always a mistyped generator or path (hub data sets are ``org/name``); one quick lookup
    decides for ``org/name``, so a typo fails at once instead of after the hub client's retries. With
    ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, ``datasets`` reads its cache and no lookup is made.
    """
    import difflib
    import os

    if "/" not in spec:
        close = difflib.get_close_matches(spec, list(GENERATORS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"unknown data generator {spec!r}; known: {', '.join(GENERATORS)}{hint}; `data` may also be "
                        f"a .json/.jsonl/.parquet/.csv file, a directory, or a hub data set id (org/name)")
    if any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    import huggingface_hub

    try:
        huggingface_hub.dataset_info(spec, timeout=10)
    except (huggingface_hub.errors.RepositoryNotFoundError, huggingface_hub.errors.HFValidationError):
        raise DataError(f"data {spec!r} is no generator, local file or directory, and no such data set exists on "
                        f"the hub") from None
    except huggingface_hub.errors.GatedRepoError:
        return  # exists; datasets reports the access problem itself
    except Exception as e:  # noqa: BLE001 - connection errors come in many types
        raise DataError(f"data {spec!r} is no generator, local file or directory, and the hub cannot be reached to "
                        f"look it up ({type(e).__name__}); set HF_HUB_OFFLINE=1 to use a cached copy") from None


def _load_dataset(spec: str, split: str, config: str | None, streaming: bool = False):
    """A ``datasets`` table from a local file, directory or hub id; every failure becomes one DataError line."""
    import datasets

    kind = source_kind(spec)
    if kind == "hub":
        _check_hub_spec(spec)
    try:
        if kind == "file":
            path = Path(spec).expanduser()
            if not path.is_file():
                raise DataError(f"data file {spec} does not exist")
            if path.suffix not in DATA_SUFFIXES:
                raise DataError(f"data file {spec}: unsupported type {path.suffix or '(none)'}; use "
                                f"{', '.join(DATA_SUFFIXES)}")
            if path.suffix == ".csv":
                read_utf8(path)  # datasets' own error for another encoding names neither the file nor the byte
            return datasets.load_dataset(DATA_SUFFIXES[path.suffix], data_files=str(path), split="train",
                                         streaming=streaming)
        return datasets.load_dataset(str(Path(spec).expanduser()) if kind == "dir" else spec, config,
                                     split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types (hub, arrow, split); report one line
        where = {"dir": "data directory", "file": "data file", "hub": "hub data set"}[kind]
        hint = (" (no such local file or directory either; the hub may be unreachable from this machine)"
                if kind == "hub" else "")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{where} {spec!r} (split {split!r}) cannot be loaded: {msg}{hint}") from None


def _row_where(spec: str, i: int, json_where: list[str] | None) -> str:
    return json_where[i] if json_where is not None else f"{spec}: row {i + 1}"


def check_rows(rows, fmt: str, spec: str, json_where: list[str] | None = None) -> None:
    """Raise DataError naming the file and row of the first row that does not fit ``fmt``."""
    for i, row in enumerate(rows):
        try:
            formats.check_row(row, fmt)
        except FormatError as e:
            raise DataError(f"{_row_where(spec, i, json_where)}: {e}") from None


def resolve_format(requested: str, columns, spec: str) -> str:
    """``requested``, or for ``auto`` the format the columns name (:func:`grass_ft.formats.detect_format`)."""
    if requested != "auto":
        return requested
    try:
        return formats.detect_format(columns, str(spec))
    except FormatError as e:
        raise DataError(str(e)) from None


def _json_rows(spec: str, data_format: str, n: int | None = None) -> tuple[str, list[Any], list[str]]:
    """``(format, objects, where)`` of a JSON/JSONL file (the first ``n`` entries), every entry checked."""
    objects = read_json_objects(spec)[:n]
    first = objects[0][1]
    fmt = resolve_format(data_format, first.keys() if isinstance(first, dict) else [], spec)
    rows, where = [o for _, o in objects], [w for w, _ in objects]
    check_rows(rows, fmt, spec, where)
    return fmt, rows, where


def _is_json(spec: str) -> bool:
    return source_kind(spec) == "file" and Path(spec).suffix in (".json", ".jsonl")


def load_rows(spec: str, data_format: str = "auto", split: str = "train", config: str | None = None):
    """``(dataset, format)``: every row of a local file or directory or hub data set, checked against its
    format. JSON and JSONL files are first read line by line, so that an error names the line."""
    if _is_json(spec):
        _json_rows(spec, data_format)  # line-precise errors before datasets reads the file
    ds = _load_dataset(spec, split, config)
    if len(ds) == 0:
        raise DataError(f"data {spec!r} (split {split!r}) holds no examples")
    fmt = resolve_format(data_format, ds.column_names, spec)
    if not _is_json(spec):
        check_rows(ds, fmt, spec)
    return ds, fmt


def preview_rows(spec: str, data_format: str = "auto", split: str = "train", config: str | None = None,
                 n: int = 100) -> tuple[str, list[dict[str, Any]]]:
    """Check the first ``n`` rows of ``spec`` (streamed: a hub data set is not downloaded whole), for
    ``grass-ft validate``. Returns ``(format, rows)``; a generator gives ``("alpaca", [])``.

    Raises:
        DataError: the source cannot be opened, its format cannot be told, or a row does not fit (naming it).
    """
    kind = source_kind(spec)
    if kind == "generator":
        return "alpaca", []
    if _is_json(spec):
        return _json_rows(spec, data_format, n)[:2]
    stream = _load_dataset(spec, split, config, streaming=True)
    try:
        rows = list(stream.take(n))
    except Exception as e:  # noqa: BLE001 - streaming raises on first read, with many types
        raise DataError(f"data {spec!r} cannot be read: {str(e).strip().splitlines()[0]}") from None
    if not rows:
        raise DataError(f"data {spec!r} (split {split!r}) holds no examples")
    fmt = resolve_format(data_format, rows[0].keys(), spec)
    check_rows(rows, fmt, spec)
    return fmt, rows


def _local_tokenizer(model: str):
    """The tokenizer of a local model directory or a prepared packaged model, else None (nothing downloaded)."""
    from ..model.load import PACKAGED, cache_dir

    path = cache_dir() / model if model in PACKAGED else Path(model).expanduser()
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def check_data_sources(cfg, n: int = 100) -> str:
    """``grass-ft validate``: check the first ``n`` rows of ``data`` and ``eval_data`` against their format and,
    when the model's tokenizer is on disk, render them as training will (chat template present and usable).
    Returns a note such as ``", format messages, first 100 rows checked"``.

    Raises:
        DataError: as :func:`preview_rows`, or a row the tokenizer cannot render (naming it).
    """
    sources = [(cfg.data, cfg.data_split)] + ([(cfg.eval_data, cfg.eval_split)] if not holds_out(cfg) else [])
    checked = [(spec, *preview_rows(spec, cfg.data_format, split, cfg.data_config, n)) for spec, split in sources]
    tokenizer = _local_tokenizer(cfg.model) if any(rows for _, _, rows in checked) else None
    if tokenizer is not None:
        try:
            formats.set_chat_template(tokenizer, cfg.chat_template)
        except FormatError as e:
            raise DataError(str(e)) from None
        for spec, fmt, rows in checked:
            for i, row in enumerate(rows):
                try:
                    formats.check_renders(row, fmt, tokenizer, cfg.model)
                except FormatError as e:
                    raise DataError(f"{spec}: row {i + 1}: {e}") from None
    fmt, rows = checked[0][1], checked[0][2]
    return f", format {fmt}, first {len(rows)} rows checked" if rows else ""


def load_examples(spec: str, data_format: str = "auto", split: str = "test",
                  config: str | None = None) -> list[dict[str, Any]]:
    """Every row of a local file or directory or hub data set as evaluation examples (:func:`as_example`).
    JSON and JSONL files are read directly (an evaluation set needs no tokenisation cache).

    Raises:
        DataError: as :func:`load_rows`.
    """
    if _is_json(spec):
        fmt, rows, _ = _json_rows(spec, data_format)
        return [as_example(r, fmt) for r in rows]
    ds, fmt = load_rows(spec, data_format, split, config)
    return [as_example(r, fmt) for r in ds]


def as_example(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A loaded row as an evaluation example: its format under ``_format``, the gold ``answer`` normalised."""
    ex = {k: v for k, v in row.items() if v is not None}
    ex["_format"] = fmt
    if fmt == "alpaca":
        ex["input"] = str(ex.get("input") or "")
    ex["answer"] = gold_answer(ex["answer"]) if ex.get("answer") is not None else ""
    return ex


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


@dataclass
class LoadedData:
    """Training rows (a ``datasets.Dataset``), held-out examples (dicts, see :func:`as_example`) and the
    training data's format."""

    train: Any
    held: list[dict[str, Any]]
    format: str

    def first_rows(self) -> list[dict[str, Any]]:
        """The first training row and every held-out one, as examples (for the chat-template check)."""
        return [as_example(r, self.format) for r in self.train.select(range(min(1, len(self.train))))] + self.held


def load_data(cfg) -> LoadedData:
    """Training and held-out data for a :class:`~grass_ft.config.TrainConfig`.

    A generator gives ``train_samples`` problems from ``seed`` and ``eval_samples`` from a disjoint seed. A
    file, directory or hub data set is used whole for training unless ``eval_data`` is absent, in which case
    ``eval_samples`` rows (after a seeded shuffle) are held out. ``eval_data`` (any source; ``eval_split`` for a
    hub data set or directory) gives its first ``eval_samples`` rows.
    """
    import datasets

    n_eval = cfg.eval_samples
    if source_kind(cfg.data) == "generator":
        train = datasets.Dataset.from_list(generate_examples(cfg.data, cfg.train_samples, cfg.seed))
        fmt = "alpaca"
        held = (generate_examples(cfg.data, n_eval, cfg.seed + EVAL_SEED_OFFSET)
                if (holds_out(cfg) and n_eval) else [])
        held = [as_example(ex, fmt) for ex in held]
    else:
        train, fmt = load_rows(cfg.data, cfg.data_format, cfg.data_split, cfg.data_config)
        held = []
        if holds_out(cfg) and n_eval > 0:
            if len(train) <= n_eval:
                raise DataError(f"data {cfg.data} has {len(train)} examples, too few to hold out "
                                f"eval_samples={n_eval}; give eval_data=FILE or lower eval_samples")
            order = list(range(len(train)))
            random.Random(cfg.seed).shuffle(order)
            held = [as_example(r, fmt) for r in train.select(order[-n_eval:])]
            train = train.select(order[:-n_eval])
    if not holds_out(cfg) and n_eval > 0:
        if source_kind(cfg.eval_data) == "generator":
            held = [as_example(ex, "alpaca")
                    for ex in generate_examples(cfg.eval_data, n_eval, cfg.seed + EVAL_SEED_OFFSET)]
        else:
            held = load_examples(cfg.eval_data, cfg.data_format, cfg.eval_split, cfg.data_config)[:n_eval]
    return LoadedData(train, held, fmt)


# ------------------------------------------------------------------------------------------- tokenisation


def prepare_tokenizer(tokenizer, chat_template: str | None, examples: Sequence[dict[str, Any]], model: str) -> None:
    """Install ``chat_template=`` on the tokenizer (a Jinja file or the template text) and check that the chat
    rows among ``examples`` (see :func:`as_example`) have a template to render them.

    Raises:
        DataError: a chat-format row and no chat template, or a missing template file.
    """
    try:
        formats.set_chat_template(tokenizer, chat_template)
        if any(formats.is_chat(r, formats.row_format(r)) for r in examples):
            formats.require_chat_template(tokenizer, model)
    except FormatError as e:
        raise DataError(str(e)) from None


def tokenize_example(tokenizer, example: dict[str, Any], max_seq_len: int,
                     train_on_inputs: bool = False) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one example in any format (:func:`grass_ft.formats.encode`): the
    prompt's labels masked unless ``train_on_inputs``."""
    try:
        return formats.encode(example, tokenizer, max_seq_len, train_on_inputs)
    except FormatError as e:
        raise DataError(str(e)) from None


def tokenize_dataset(ds, tokenizer, fmt: str, max_seq_len: int, train_on_inputs: bool = False):
    """Tokenise a ``datasets.Dataset`` with ``Dataset.map``, which caches the result next to a file-backed
    data set (a rerun with the same data, tokenizer and settings reads it back). Returns a Dataset of
    ``input_ids`` and ``labels``."""
    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        return formats.encode(row, tokenizer, max_seq_len, train_on_inputs, fmt)

    try:
        return ds.map(encode, remove_columns=ds.column_names, desc="tokenise")
    except FormatError as e:
        raise DataError(str(e)) from None


def pack_features(features, max_len: int) -> list[dict[str, list[int]]]:
    """Tokenised examples packed into rows of at most ``max_len`` tokens, TRL's ``packing=True`` (its default
    strategy, best-fit decreasing: longest example first, each into the fullest row it still fits; no example is
    split). Each row keeps ``seq_lengths``, from which :func:`collate` restarts the position ids per example."""
    import bisect

    ids = features["input_ids"] if hasattr(features, "column_names") else [f["input_ids"] for f in features]
    labels = features["labels"] if hasattr(features, "column_names") else [f["labels"] for f in features]
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the best fit is the first with room >= length
    for i in order:
        n = min(len(ids[i]), max_len)
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
            if room - n > 0:
                bisect.insort(free, (room - n, row))
        else:
            rows.append([i])
            if max_len - n > 0:
                bisect.insort(free, (max_len - n, len(rows) - 1))
    packed = []
    for members in rows:
        row_ids, row_labels, lengths = [], [], []
        for i in members:
            row_ids += list(ids[i][:max_len])
            row_labels += list(labels[i][:max_len])
            lengths.append(min(len(ids[i]), max_len))
        packed.append({"input_ids": row_ids, "labels": row_labels, "seq_lengths": lengths})
    return packed


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenised examples into a training batch with an attention mask; or, for packed rows (they carry
    ``seq_lengths``: :func:`pack_features`), the batch TRL's padding-free collator makes: no attention mask,
    position ids that restart at every example (transformers reads them as example boundaries: a block-diagonal
    mask with sdpa and eager, varlen with flash attention), the label of every example's first token masked so that
    no token is predicted from another example's, and ``num_tokens``, the real tokens (padding left out)."""
    packed = bool(features) and "seq_lengths" in features[0]
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    where = torch.zeros((len(features), width), dtype=torch.long)  # the attention mask, or the position ids
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        where[i, :n] = torch.cat([torch.arange(k) for k in f["seq_lengths"]]) if packed else 1
    if not packed:
        return {"input_ids": ids, "attention_mask": where, "labels": labels}
    labels[where == 0] = IGNORE_INDEX  # TRL: labels[position_ids == 0] = -100 (padding is position 0 too)
    return {"input_ids": ids, "position_ids": where, "labels": labels,
            "num_tokens": torch.tensor(sum(len(f["input_ids"]) for f in features))}


GROUP_BATCHES = 16


@dataclass
class BatchStream:
    """An endless, seeded, shuffled stream of batches over tokenised examples; its position can be saved.

    Each epoch is a fresh permutation from ``seed + epoch``, so the stream is a pure function of
    ``(seed, epoch, index)`` and resuming needs only those numbers. ``rank``/``world_size`` shard every
    batch so that the global batch is the same for any number of processes.
    """

    features: Sequence[dict[str, list[int]]]  # a list or a tokenised datasets.Dataset
    batch_size: int
    pad_id: int
    seed: int = 0
    epoch: int = 0
    index: int = 0
    rank: int = 0
    world_size: int = 1

    group_by_length: bool = True
    _cached: tuple = field(default=(None, None), init=False, repr=False, compare=False)  # ((seed, epoch), order)
    _lengths: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

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
        if len(self._lengths) != len(self.features):  # once: reading a Dataset row decodes it
            ids = (self.features["input_ids"] if hasattr(self.features, "column_names")  # a datasets.Dataset
                   else [f["input_ids"] for f in self.features])
            self._lengths = [len(x) for x in ids]
        batches = []
        for start in range(0, len(order) - self.batch_size + 1, span):
            chunk = sorted(order[start:start + span], key=lambda i: -self._lengths[i])
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
