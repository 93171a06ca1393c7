"""Rows from a source: local JSON/JSONL/Parquet/CSV files, data directories and hub data sets through ``datasets``,
each row checked against its format, every failure one line naming the file and the line or row.

Generated problems and LLM-Adapters files are alpaca rows: ``instruction``, ``input`` (may be empty), ``output``
(the target text, e.g. a chain of thought ending in the answer) and ``answer`` (the gold answer used for scoring).
Any row may carry ``answer`` and ``task`` for scoring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..base.errors import not_utf8
from ..base.tasks import gold_answer
from .formats import DataError, FormatError, check_row, detect_format, tagged
from .generators import GENERATORS

REQUIRED_KEYS = ("instruction", "output")


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
            check_row(row, fmt)
        except FormatError as e:
            raise DataError(f"{_row_where(spec, i, json_where)}: {e}") from None


def resolve_format(requested: str, columns, spec: str) -> str:
    """``requested``, or for ``auto`` the format the columns name (:func:`grass_ft.data.formats.detect_format`)."""
    if requested != "auto":
        return requested
    try:
        return detect_format(columns, str(spec))
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


def load_examples(spec: str, data_format: str = "auto", split: str = "test",
                  config: str | None = None) -> list[dict[str, Any]]:
    """Every row of a local file or directory or hub data set for evaluation, its format tagged
    (:func:`grass_ft.data.formats.tagged`).
    JSON and JSONL files are read directly (an evaluation set needs no tokenisation cache).

    Raises:
        DataError: as :func:`load_rows`.
    """
    if _is_json(spec):
        fmt, rows, _ = _json_rows(spec, data_format)
        return [tagged(r, fmt) for r in rows]
    ds, fmt = load_rows(spec, data_format, split, config)
    return [tagged(r, fmt) for r in ds]
