"""Make a checkpoint directory open with the usual tools: ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` (or, for a LoRA/DoRA run, ``peft.PeftModel.from_pretrained``).

A checkpoint's weights are ``model.safetensors`` keyed by the model's parameter names — for a transformers
model the names ``from_pretrained`` expects (a tied LM head saved once, as ``save_pretrained`` does) — so what
it lacks is the metadata written here beside them.
"""

from __future__ import annotations

from pathlib import Path


def write_loadable(model, tokenizer, directory: str | Path) -> None:
    """Write ``config.json``, ``generation_config.json`` and the tokenizer files into ``directory`` (each unless
    already there); a peft model gets its adapter (``adapter_config.json``, ``adapter_model.safetensors``)."""
    directory = Path(directory)
    if hasattr(model, "peft_config"):
        if not (directory / "adapter_config.json").is_file():
            # the vocabulary is never resized, and "auto" would look a packaged base name up on the hub
            model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    elif not (directory / "config.json").is_file():
        model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and not (directory / "generation_config.json").is_file():
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
