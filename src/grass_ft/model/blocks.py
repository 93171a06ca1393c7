"""Which parameters belong to which decoder block (:class:`BlockLayout`), found by the known paths of each model
family's block list, and activation checkpointing that works with frozen lower blocks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .load import ModelError

# Where each supported architecture keeps its decoder-block list (tried in order). Llama, Qwen2, Mistral, Gemma,
# Phi, GPT-2, GPT-J, Falcon, GPT-NeoX and OPT are each tested as a tiny random model (tests/test_families.py:
# blocks found, every parameter assigned once, tied and untied heads, GRASS steps, and the supervised-only loss:
# chunked for the families in grass_ft.method.loss.HEADS, a full forward with a warning for GPT-2, GPT-J, Falcon and
# OPT); the Gemma3 multimodal path is not tested.
BLOCK_PATHS = (
    "model.layers",            # Llama, Qwen2, Mistral, Gemma, Gemma3 (text), Phi, Phi-3
    "model.language_model.layers",  # Gemma3 multimodal wrapper
    "transformer.h",           # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",         # GPT-NeoX, Pythia
    "model.decoder.layers",    # OPT
    "layers",                  # bare decoder stacks
)


def _get_attr(root: nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def find_blocks(model: nn.Module, layers_attribute: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(dotted path, ModuleList)`` of the model's decoder blocks.

    Raises:
        ModelError: ``layers_attribute`` does not name a ModuleList, or none of the known paths match.
    """
    for path in [layers_attribute] if layers_attribute else BLOCK_PATHS:
        obj = _get_attr(model, path)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return path, obj
    if layers_attribute:
        raise ModelError(f"`layers_attribute` {layers_attribute!r} does not name a non-empty nn.ModuleList "
                         f"in {type(model).__name__}")
    raise ModelError(f"cannot find the decoder blocks of {type(model).__name__} (tried {', '.join(BLOCK_PATHS)}); "
                     f"set `layers_attribute` to the dotted path of its block list, e.g. layers_attribute=model.layers")


@dataclass
class BlockLayout:
    """Which parameter names belong to which decoder block, and which are embeddings / head / other.

    Tied parameters (one tensor under two names) appear once, under the first name
    ``model.named_parameters()`` yields.
    """

    prefix: str
    num_blocks: int
    blocks: list[list[str]]
    embeddings: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)   # final norm + LM head (when not tied)
    tied_head: list[str] = field(default_factory=list)  # the input embedding that is also the LM head (when tied)
    other: list[str] = field(default_factory=list)
    numel: list[int] = field(default_factory=list)  # parameters per block

    def block_of(self, name: str) -> int | None:
        m = re.match(re.escape(self.prefix) + r"\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    def group_key(self, name: str) -> str:
        """Optimizer group of a parameter: its block (``<prefix>.<i>``) or its own name."""
        b = self.block_of(name)
        return f"{self.prefix}.{b}" if b is not None else name


def block_layout(model: nn.Module, layers_attribute: str | None = None) -> BlockLayout:
    prefix, blocks = find_blocks(model, layers_attribute)
    layout = BlockLayout(prefix=prefix, num_blocks=len(blocks), blocks=[[] for _ in blocks])
    numel = [0] * len(blocks)
    input_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_ids = {id(p) for p in input_emb.parameters()} if input_emb is not None else set()
    for name, p in model.named_parameters():  # named_parameters() already yields a tied tensor once
        b = layout.block_of(name)
        if b is not None:
            layout.blocks[b].append(name)
            numel[b] += p.numel()
        elif id(p) in emb_ids or re.search(r"(embed|wte|wpe|embed_positions)", name):
            layout.embeddings.append(name)
        elif re.search(r"(lm_head|embed_out|norm|ln_f|final_layer_norm)", name):
            layout.head.append(name)
        else:
            layout.other.append(name)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(out_emb, "weight", None)
    if head_weight is not None and id(head_weight) in emb_ids:  # tied: the head is an embedding parameter
        layout.tied_head = [n for n, p in model.named_parameters() if p is head_weight]
    layout.numel = numel
    return layout


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing, which works when the lowest blocks and the input do not require
    grad (reentrant checkpointing fails there: transformers #21381, BAdam #2)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also registers a hook that makes the embeddings' output require grad (needed only by
    # reentrant checkpointing); with it, backward runs through every frozen block down to the input.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    model.config.use_cache = False
