"""Batches of tokenised examples: right-padded (or packed, padding-free) by :func:`collate`, drawn by the seeded,
resumable :class:`BatchStream`."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .formats import IGNORE_INDEX

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
