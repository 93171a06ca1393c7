"""LoRA and DoRA baselines through peft (no hand-written adapters): wrap a model, save the merged weights.

The ``lora`` and ``dora`` registrations in :mod:`grass_ft.method.methods` call :func:`wrap_peft`; the training loop
saves the adapter with the model's own ``save_pretrained`` (peft writes ``adapter_model.safetensors`` and
``adapter_config.json``) and, with ``merge_lora``, calls :func:`save_merged` for a stand-alone model directory.

Defaults (see docs/COMPARE.md): r = 32, alpha = 2r, dropout 0.05 follow the DoRA / LLM-Adapters recipes on the
same math and commonsense data; the target is every linear layer but the LM head (peft's ``"all-linear"``),
which QLoRA found necessary to match full fine-tuning.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from ..base.atomic import atomic_dir
from ..config import TrainConfig, lora_targets
from ..model.load import PACKAGED, ModelError


def wrap_peft(model: nn.Module, cfg: TrainConfig, dora: bool) -> nn.Module:
    """``get_peft_model`` with the run's LoRA keys; only the adapter (and DoRA's magnitudes) requires grad.

    Raises:
        ModelError: no module of the model matches ``lora_target_modules`` (the message lists the linear ones).
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(cfg.lora_target_modules)
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_r
    config = LoraConfig(r=cfg.lora_r, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                        use_dora=dora, bias="none", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            # peft 0.21 asks transformers 5 `is_gradient_checkpointing`, deprecated there; nothing for users to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ModelError(f"`lora_target_modules` {cfg.lora_target_modules!r} matches no module of "
                         f"{type(model).__name__}; its linear modules are {', '.join(linear)}") from None
    # adapter_config.json names the base by what the user typed (a packaged name stays a name, a local
    # directory becomes absolute), so `grass-ft eval model=final/` finds it from any working directory.
    spec = cfg.model
    if spec not in PACKAGED and Path(spec).expanduser().is_dir():
        spec = str(Path(spec).expanduser().resolve())
    for c in peft_model.peft_config.values():
        c.base_model_name_or_path = spec
    return peft_model


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_merged(model: nn.Module, tokenizer, final_dir: Path) -> Path:
    """Merge the adapter into the base weights and save a plain model directory as ``final_dir/merged``.

    ``merge_and_unload`` works in place (no second copy of the model in memory), so ``model`` must not be used
    afterwards; call this after the last evaluation. Written to a temporary name and renamed, like ``final/``.
    """
    merged = model.merge_and_unload()
    target = final_dir / "merged"
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target
