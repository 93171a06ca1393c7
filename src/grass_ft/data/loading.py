"""The data of a run, read and normalised once: the training rows and the held-out examples of a configuration
(:func:`load_data`), and ``grass-ft validate``'s look at the first rows of each source.

A generator gives ``train_samples`` problems and, from disjoint seeds, ``eval_samples`` held-out ones; a file,
directory or hub data set is held out of when ``eval_data`` is unset, or ``eval_data`` gives the held-out examples.
Every training row and held-out example leaves here as a canonical example (:mod:`grass_ft.data.examples`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import holds_out
from .examples import Example, normalise
from .formats import DataError, FormatError
from .generators import EVAL_SEED_OFFSET, generate_examples
from .sources import load_examples, load_rows, preview_rows, source_kind
from .tokenize import check_renders, set_chat_template


@dataclass
class LoadedData:
    """Training rows (a ``datasets.Dataset``) and held-out examples (dicts), every one a canonical example
    (:mod:`grass_ft.data.examples`), the training data's format, and the kind of its source (``generator``,
    ``file``, ``dir`` or ``hub``: :func:`grass_ft.data.sources.source_kind`)."""

    train: Any
    held: list[dict[str, Any]]
    format: str
    source: str = "file"

    def first_rows(self) -> list[dict[str, Any]]:
        """The first training row and every held-out one (for the chat-template check)."""
        return [Example(r) for r in self.train.select(range(min(1, len(self.train))))] + self.held


def load_data(cfg) -> LoadedData:
    """Training and held-out data for a :class:`~grass_ft.config.TrainConfig`, read (:func:`read`), then each row
    normalised once into a canonical example whose task defaults to ``cfg.task``."""
    import datasets

    task = getattr(cfg, "task", None)  # any object with the data keys will do
    source, train, fmt, held = read(cfg)
    if isinstance(train, list):  # generated rows
        train = datasets.Dataset.from_list([normalise(r, fmt, task) for r in train])
    else:
        train = train.map(normalise, fn_kwargs={"fmt": fmt, "task": task}, desc="normalise")
    return LoadedData(train, [normalise(r, f, task) for r, f in held], fmt, source)


def read(cfg) -> tuple[str, Any, str, list[tuple[dict[str, Any], str | None]]]:
    """The rows of a configuration as written: ``(source kind, training rows, their format, held-out rows each with
    its format)`` (None: the row carries it, ``_format``).

    A generator gives ``train_samples`` problems from ``seed`` and ``eval_samples`` from a disjoint seed. A
    file, directory or hub data set is used whole for training unless ``eval_data`` is absent, in which case
    ``eval_samples`` rows (after a seeded shuffle) are held out. ``eval_data`` (any source; ``eval_split`` for a
    hub data set or directory) gives its first ``eval_samples`` rows.
    """
    n_eval, source = cfg.eval_samples, source_kind(cfg.data)
    held: list[tuple[dict[str, Any], str | None]] = []
    if source == "generator":
        train, fmt = generate_examples(cfg.data, cfg.train_samples, cfg.seed), "alpaca"
        if holds_out(cfg) and n_eval:
            held = [(r, fmt) for r in generate_examples(cfg.data, n_eval, cfg.seed + EVAL_SEED_OFFSET)]
    else:
        train, fmt = load_rows(cfg.data, cfg.data_format, cfg.data_split, cfg.data_config)
        if holds_out(cfg) and n_eval > 0:
            if len(train) <= n_eval:
                raise DataError(f"data {cfg.data} has {len(train)} examples, too few to hold out "
                                f"eval_samples={n_eval}; give eval_data=FILE or lower eval_samples")
            order = list(range(len(train)))
            random.Random(cfg.seed).shuffle(order)
            held = [(r, fmt) for r in train.select(order[-n_eval:])]
            train = train.select(order[:-n_eval])
    if not holds_out(cfg) and n_eval > 0:
        if source_kind(cfg.eval_data) == "generator":
            held = [(r, "alpaca") for r in generate_examples(cfg.eval_data, n_eval, cfg.seed + EVAL_SEED_OFFSET)]
        else:
            held = [(r, None) for r in
                    load_examples(cfg.eval_data, cfg.data_format, cfg.eval_split, cfg.data_config)[:n_eval]]
    return source, train, fmt, held


# ------------------------------------------------------------------------------------------------ validate


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
            set_chat_template(tokenizer, cfg.chat_template)
        except FormatError as e:
            raise DataError(str(e)) from None
        for spec, fmt, rows in checked:
            for i, row in enumerate(rows):
                try:
                    check_renders(row, fmt, tokenizer, cfg.model)
                except FormatError as e:
                    raise DataError(f"{spec}: row {i + 1}: {e}") from None
    fmt, rows = checked[0][1], checked[0][2]
    return f", format {fmt}, first {len(rows)} rows checked" if rows else ""
