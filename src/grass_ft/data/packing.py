"""``packing=true``: several tokenised examples to a row (:func:`pack_features`), and whether the loaded model keeps
packed examples apart (:func:`check_packing`).

A packed row carries no attention mask, only position ids that restart at every example; transformers turns those
into a block-diagonal mask (sdpa, eager, flex) or variable-length kernels (flash attention). A model whose attention
ignores them would let every example attend to the ones before it in its row, and train on that silently. So the
run checks once, after loading, on the real model: the logits of an example packed behind another must equal its
logits alone. :func:`grass_ft.data.batches.collate` makes a packed row's position ids.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..base.errors import UserError

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


# Relative difference of the logits above which the example was not kept apart. Kept apart, the two forwards do the
# same arithmetic on the same values but for the length of the attention's reductions: fp32 rounding, ~1e-6; bf16 /
# fp16 round every op at 2^-8 / 2^-11 relative, a few percent at most through a deep model. Attending to the other
# example changes the logits by their own order (tested: > 0.1 on a tiny random model).
MIXED = 0.05


class PackingError(UserError, ValueError):
    """``packing=true`` with a model whose attention does not keep packed examples apart."""


@torch.no_grad()
def mixing(model) -> float:
    """The largest relative change of an example's logits when another example is packed before it."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, vocab, (1, 7), generator=gen), torch.randint(3, vocab, (1, 5), generator=gen)
    row = torch.cat([a, b], dim=1).to(device)
    pos = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device)
    was = model.training
    model.eval()
    try:
        packed = model(input_ids=row, position_ids=pos, use_cache=False).logits[0, 7:].float()
        alone = model(input_ids=b.to(device), position_ids=pos[:, 7:], use_cache=False).logits[0].float()
    finally:
        model.train(was)
    return float((packed - alone).abs().max() / alone.abs().max().clamp(min=1e-6))


def check_packing(model, cfg: TrainConfig) -> None:
    """Refuse ``packing=true`` (one line, before any step) when the model lets packed examples attend to each other.

    Raises:
        PackingError: naming the model, its attention implementation and what to do instead.
    """
    off = mixing(model)
    if off > MIXED:
        impl = getattr(model.config, "_attn_implementation", "?")
        raise PackingError(f"`packing` needs an attention that keeps packed examples apart, and model {cfg.model!r} "
                           f"with attn_implementation={impl} does not (an example's logits change by {off:.0%} when "
                           f"another is packed before it): set packing=false (examples padded, one per row), or "
                           f"attn_implementation=sdpa or flash_attention_2 if the model has them")
