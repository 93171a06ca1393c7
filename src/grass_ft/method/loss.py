"""Loss only where it is scored: the LM head and cross-entropy run at the supervised positions alone, in chunks.

``model(**batch).loss`` projects every position of every row through the LM head — a ``batch x seq x vocab``
fp32 tensor (plus its log-softmax and gradient) that, on small models with 32k–150k vocabularies, is a large
share of the peak memory and of the step — and then ignores the positions whose label is -100 (prompt, padding).
:func:`supervised_loss` runs the decoder body, shifts the labels as transformers' ``ForCausalLMLoss`` does, keeps
the positions whose next-token label is not -100, and projects those in chunks of :func:`chunk_positions`
positions, each chunk under non-reentrant :func:`torch.utils.checkpoint.checkpoint`, so no chunk's logits are
kept for backward (the head's matmul is recomputed per chunk in backward instead).

The loss equals ``model(**batch).loss``: the mean cross-entropy over the batch's supervised tokens, or their sum
divided by ``num_items_in_batch`` when one is given (the Trainer's gradient-accumulation form). Only the order
of the fp32 reduction differs (chunked partial sums, then one division), so results agree to fp32 rounding.

One rule differs on purpose: a batch with **no** supervised token gives a loss of exactly 0 whose gradients are
all zero (still connected to the graph, so ``backward()`` works under any front end), where transformers gives
NaN (0/0). The native loop skips the update of a step that has no supervised token (see
:meth:`grass_ft.method.step.StepRunner.train_step`).

Models: the head path is used for the model types in :data:`HEADS`, whose forwards were read and are
``logits = lm_head(h)`` followed by at most a logit scale or a final-logit softcap (implemented here, in the same
order and dtype). Anything else — another architecture, a custom ``loss_function``, MoE router losses, prompt-
learning peft adapters, extra inputs such as ``pixel_values`` — falls back to ``model(**batch).loss`` with a
one-time warning that says why. A peft LoRA/DoRA model works: the adapters live inside the decoder's modules,
and the head is called as a module, so an adapter on the LM head (not used by default) is applied too.

Under ``FakeTensorMode`` (memory estimation without a GPU) the supervised count is unknown, so every position is
treated as supervised: the chunk loop and the peak (one chunk's logits) are those of a fully supervised batch,
an upper bound on the real peak.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# fp32 logits per chunk: 2**23 elements = 32 MiB (170 positions at SmolLM2's 49,152-token vocabulary, 262 at
# LLaMA-2's 32,000); forward + backward of a chunk keep about four such tensors (logits, log-softmax, their grads)
CHUNK_ELEMENTS = 2**23
MIN_CHUNK_POSITIONS = 64

# model_type -> what the CausalLM forward does after ``logits = lm_head(hidden_states)`` (transformers 5.x source):
# None: nothing; "softcap": tanh(logits / c) * c with c = config.final_logit_softcapping when set;
# "scale": logits * model.logit_scale; "divide": logits / config.logits_scaling.
HEADS: dict[str, str | None] = {
    "llama": None, "mistral": None, "qwen2": None, "qwen3": None, "gemma": None, "phi": None, "phi3": None,
    "gpt_neox": None, "olmo": None, "olmo2": None, "starcoder2": None, "smollm3": None, "stablelm": None,
    "gemma2": "softcap", "gemma3_text": "softcap", "cohere": "scale", "granite": "divide",
}
# Batch keys the decoder body takes as the full forward does; anything else falls back to the full forward.
DECODER_KEYS = frozenset({"input_ids", "attention_mask", "position_ids", "inputs_embeds"})
_warned: set[str] = set()


def chunk_positions(vocab_size: int) -> int:
    """Positions per chunk: a chunk's fp32 logits stay within :data:`CHUNK_ELEMENTS` (at least 64 positions)."""
    return max(MIN_CHUNK_POSITIONS, CHUNK_ELEMENTS // max(1, vocab_size))


@dataclass
class HeadPath:
    """How one causal LM turns its last hidden states into logits."""

    decoder: nn.Module
    head: nn.Module
    kind: str | None  # see HEADS
    factor: float | None  # the softcap, scale or divisor of ``kind``
    vocab_size: int

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # a plain Linear head is applied functionally: the module is called once per chunk (and again in backward),
        # which module-hook tools such as MemTracker refuse ("multiple iterative calls"); a peft-wrapped head
        # (an adapter on lm_head) is called as the module, so its adapter applies
        if type(self.head) is nn.Linear:
            logits = F.linear(hidden, self.head.weight, self.head.bias)
        else:
            logits = self.head(hidden)
        if self.kind == "softcap" and self.factor is not None:  # Gemma-2/3: same ops, same dtype as their forward
            logits = torch.tanh(logits / self.factor) * self.factor
        elif self.kind == "scale":
            logits = logits * self.factor
        elif self.kind == "divide":
            logits = logits / self.factor
        return logits


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (adapters stay injected in its modules), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


def head_path(model: nn.Module) -> tuple[HeadPath | None, str]:
    """``(path, "")`` when the supervised-only loss reproduces ``model(**batch).loss``, else ``(None, why not)``."""
    if hasattr(model, "peft_config"):
        cfg = model.peft_config.get(getattr(model, "active_adapter", "default"))
        if cfg is not None and getattr(cfg, "is_prompt_learning", False):
            return None, "peft prompt-learning adapters prepend virtual tokens in the peft forward"
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in HEADS:
        return None, (f"model type {model_type!r} is not one whose head was checked to be lm_head(h) "
                      f"(grass_ft.loss.HEADS: {', '.join(sorted(HEADS))})")
    if "_loss_function" in vars(base) or getattr(base, "loss_type", None) not in (None, "ForCausalLM"):
        return None, "the model has a custom loss_function / loss_type"
    if getattr(config, "output_router_logits", False):
        return None, "the model adds a mixture-of-experts router loss"
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or decoder is base or head is None:
        return None, f"{type(base).__name__} has no separate decoder body and output embeddings"
    kind = HEADS[model_type]
    factor = {"softcap": getattr(config, "final_logit_softcapping", None),
              "scale": getattr(base, "logit_scale", None),
              "divide": getattr(config, "logits_scaling", None)}.get(kind) if kind else None
    if kind in ("scale", "divide") and factor is None:
        return None, f"{model_type} without its logit {kind} factor"
    return HeadPath(decoder, head, kind, factor, int(config.vocab_size)), ""


def _warn_fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"supervised-only loss falls back to the full forward: {reason}", stacklevel=3)


def _chunk_loss_sum(path: HeadPath, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # fp32 cross-entropy on the model-dtype logits, as ForCausalLMLoss upcasts them
    return F.cross_entropy(path.logits(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def head_loss(path: HeadPath, hidden: torch.Tensor, labels: torch.Tensor | None = None, *,
              shift_labels: torch.Tensor | None = None, num_items_in_batch: torch.Tensor | int | None = None,
              chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``path``'s head over the supervised positions of ``hidden`` (``batch x seq x hidden``).

    ``labels`` are shifted as transformers does (position t predicts ``labels[t + 1]``); pre-shifted
    ``shift_labels`` are used as given. Reduced as ``ForCausalLMLoss``: sum / ``num_items_in_batch`` when given,
    else sum / number of supervised tokens (0 when there are none, see the module docstring).
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.size(-1))
    mask = targets != IGNORE_INDEX
    if _is_fake(targets):
        # no data under FakeTensorMode: score every position (the peak is one chunk's logits either way)
        index = torch.arange(targets.numel(), device=targets.device)
    else:
        index = mask.nonzero().squeeze(1)  # the one host sync: the number of supervised positions
    hidden_sel, targets_sel = flat.index_select(0, index), targets.index_select(0, index)
    n = hidden_sel.size(0)
    step = chunk_size or chunk_positions(path.vocab_size)
    total = None
    # range(.., max(n, 1)): a batch without a supervised token still runs one empty chunk, so the loss (0) stays
    # connected to the head and the hidden states and every gradient is a zero rather than missing
    for start in range(0, max(n, 1), step):
        part = checkpoint(_chunk_loss_sum, path, hidden_sel[start:start + step], targets_sel[start:start + step],
                          use_reentrant=False)
        total = part if total is None else total + part
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / mask.sum().clamp(min=1)


def has_supervised_token(batch: dict[str, torch.Tensor]) -> bool:
    """Whether ``batch`` scores any token (a batch without ``labels`` counts as scored: its forward decides)."""
    if "labels" not in batch:
        return True
    return bool((batch["labels"][..., 1:] != IGNORE_INDEX).any())  # a host sync, like the loop's loss read


def _split(batch: dict) -> tuple[dict, dict] | None:
    """``(decoder inputs, loss inputs)``, or None when the batch has keys only the full forward knows."""
    present = {k: v for k, v in batch.items() if v is not None}
    loss_keys = {k: present.pop(k) for k in ("labels", "shift_labels") if k in present}
    present.pop("use_cache", None)
    if "labels" not in loss_keys and "shift_labels" not in loss_keys:
        return None
    if not set(present) <= DECODER_KEYS:
        return None
    return present, loss_keys


def _loss(model: nn.Module, batch: dict, num_items_in_batch, chunk_size: int | None,
          full: Callable[..., object]) -> torch.Tensor:
    path, reason = head_path(model)
    parts = _split(batch) if path is not None else None
    if path is None or parts is None:
        _warn_fallback(reason or f"batch keys {sorted(batch)} are not only {sorted(DECODER_KEYS | {'labels'})}")
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return full(**batch, **extra).loss
    inputs, targets = parts
    hidden = path.decoder(**inputs, use_cache=False)[0]
    return head_loss(path, hidden, targets.get("labels"), shift_labels=targets.get("shift_labels"),
                     num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)


def supervised_loss(model: nn.Module, batch: dict[str, torch.Tensor], *,
                    num_items_in_batch: torch.Tensor | int | None = None,
                    chunk_size: int | None = None) -> torch.Tensor:
    """``model(**batch).loss`` with the LM head and cross-entropy run only at supervised positions, in chunks.

    Args:
        model: a transformers causal LM, or a peft model wrapping one.
        batch: ``input_ids`` (or ``inputs_embeds``), ``attention_mask``, ``labels`` (-100 = not scored), optionally
            ``position_ids`` / ``shift_labels``.
        num_items_in_batch: divide the summed loss by this instead of the batch's supervised count (the Trainer
            passes the count over all accumulated micro-batches).
        chunk_size: positions per head chunk (default :func:`chunk_positions` of the vocabulary).

    Returns:
        The scalar loss; 0 with all-zero gradients when no position is supervised.
    """
    return _loss(model, batch, num_items_in_batch, chunk_size, full=model)


def full_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(**batch).loss``: every position through the LM head (``supervised_only_loss=false``)."""
    return model(**batch).loss


def loss_forward(supervised_only: bool) -> Callable[[nn.Module, dict], torch.Tensor]:
    """The native loop's ``forward(model, micro_batch) -> loss`` for the ``supervised_only_loss`` setting."""
    return supervised_loss if supervised_only else full_loss


def enable_supervised_loss(model: nn.Module, chunk_size: int | None = None) -> nn.Module:
    """Make ``model``'s training forward compute :func:`supervised_loss` (for ``transformers.Trainer``).

    Patches the forward of the transformers model (inside a peft wrapper, if any; call before or after
    ``get_peft_model``). A call in training mode with ``labels`` and only decoder inputs returns a
    ``CausalLMOutputWithPast`` with the loss and **no logits**; any other call (evaluation, generation, extra
    inputs such as TRL's ``fused_lm_head``) runs the forward as before. The signature is kept, so the Trainer's
    column filtering and ``num_items_in_batch`` handling see the original. Returns ``model``.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    target = unwrap_peft(model)
    if getattr(target, "_grass_supervised_loss", False):
        return model
    prior = vars(target).get("forward")  # another library's patch, kept in the chain

    @functools.wraps(type(target).forward)
    def forward(self, *args, **kwargs):
        full = prior if prior is not None else types.MethodType(type(self).forward, self)
        if args or not self.training or kwargs.get("labels") is None:
            return full(*args, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        if _split(kwargs) is None:
            kwargs["num_items_in_batch"] = num_items
            return full(**{k: v for k, v in kwargs.items() if v is not None})
        return CausalLMOutputWithPast(loss=_loss(self, kwargs, num_items, chunk_size, full=full))

    target.forward = types.MethodType(forward, target)
    target._grass_supervised_loss = True
    return model
