"""A model's shape from its config.json alone: parameter counts per decoder block, embeddings and head, built on
the ``meta`` device (no weights, no memory), so planning a 70B run needs no 140 GB on disk."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..model.blocks import block_layout

from ..model.load import PACKAGED, ModelError, resolve_model_path


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a causal LM, grouped as grass-ft's optimizer and sampler group them.

    Attributes:
        block_numel: parameters of each decoder block.
        embed_numel: the input embedding (with tied embeddings, this is also the LM head).
        head_numel: final norm plus an untied LM head.
        other_numel: parameters in no block, embedding or head (trained by fft only).
        linears: ``(in, out, name)`` of every linear layer a LoRA ``all-linear`` target adapts in one block.
        outer_linears: the same outside the blocks (the LM head is never adapted).
    """

    model_type: str
    num_blocks: int
    block_numel: tuple[int, ...]
    embed_numel: int
    head_numel: int
    other_numel: int
    tied: bool
    hidden: int
    vocab: int
    linears: tuple[tuple[int, int, str], ...]
    outer_linears: tuple[tuple[int, int, str], ...]

    @property
    def numel(self) -> int:
        return sum(self.block_numel) + self.embed_numel + self.head_numel + self.other_numel

    def lora_numel(self, rank: int, targets: list[str] | str = "all-linear", dora: bool = False) -> int:
        """Adapter parameters of ``get_peft_model`` with rank ``rank`` (A: r x in, B: out x r, DoRA's magnitude:
        out) over every block's matching linear layers and those outside the blocks."""
        def count(linears):
            picked = [(i, o) for i, o, n in linears if targets == "all-linear" or n in targets]
            return sum(rank * (i + o) + (o if dora else 0) for i, o in picked)

        return self.num_blocks * count(self.linears) + count(self.outer_linears)

    def lora_layers(self, targets: list[str] | str = "all-linear") -> tuple[tuple[int, int, str], ...]:
        return tuple(x for x in self.linears if targets == "all-linear" or x[2] in targets)


def load_model_config(spec: str):
    """The ``transformers`` config of a packaged name, a local directory (``config.json`` is all it needs) or a
    hub id (from the local hub cache when the hub is unreachable).

    Raises:
        ModelError: one line naming the path and what is missing.
    """
    from transformers import AutoConfig

    path = resolve_model_path(spec) if spec in PACKAGED else spec
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"model directory {local} has no config.json (planning needs only that file)")
        try:
            json.loads((local / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"{local / 'config.json'} is not valid JSON: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.from_pretrained(str(local) if local.exists() else spec)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad or unknown config
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if local.exists() else " (not a local directory; the model hub may be unreachable)"
        raise ModelError(f"cannot read the config of model {spec!r}: {first}{where}") from None


def build_meta(config, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The causal LM of ``config`` on the meta device: every parameter's shape and dtype, no memory."""
    import copy

    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # a copy: from_config writes the dtype into the config it is given
            return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
        except Exception as e:  # noqa: BLE001 - an architecture AutoModelForCausalLM does not know
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"transformers cannot build a causal LM from this config "
                             f"({getattr(config, 'model_type', '?')}): {first}") from None


def model_shape(config, layers_attribute: str | None = None) -> ModelShape:
    """Counts of the model ``config`` describes (see :class:`ModelShape`).

    Raises:
        ModelError: the decoder blocks are not found (set ``layers_attribute``).
    """
    model = build_meta(config)
    layout = block_layout(model, layers_attribute)
    params = dict(model.named_parameters())
    embed = sum(params[n].numel() for n in layout.embeddings)
    head = sum(params[n].numel() for n in layout.head)
    other = sum(params[n].numel() for n in layout.other)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    block0 = f"{layout.prefix}.0."
    linears, outer = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod is not out_emb:
            entry = (mod.in_features, mod.out_features, name.rsplit(".", 1)[-1])
            if name.startswith(block0):
                linears.append(entry)
            elif layout.block_of(name + ".") is None:
                outer.append(entry)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(model_type=str(getattr(config, "model_type", "?")), num_blocks=layout.num_blocks,
                      block_numel=tuple(layout.numel), embed_numel=embed, head_numel=head, other_numel=other,
                      tied=bool(layout.tied_head), hidden=int(getattr(text, "hidden_size", 0)),
                      vocab=int(getattr(text, "vocab_size", 0)), linears=tuple(linears), outer_linears=tuple(outer))
