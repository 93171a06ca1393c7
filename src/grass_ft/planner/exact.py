"""``grass-ft plan exact=true``: the device peak of one setting from grass-ft's real training step on the whole
model, on fake tensors, for a setting the analytic model does not cover (or to check it on a new architecture).

The model is built from its config in the setting's dtype under ``FakeTensorMode``; the method is prepared as
``grass-ft train`` prepares it (``methods.prepare``), with the draws forced to the planner's worst case (block 0
and the top blocks); ``steps`` training steps run through ``StepRunner`` with the native loop's loss; a dispatch
mode counts every storage while it lives. The optimizer's host storages are left out of the device figure. It
takes as long as the model has blocks (about a minute for LLaMA-2-7B on 2 cores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch

from ..config import TrainConfig
from .fake import cuda_kernel_choices, fused_adamw, noop_module_to, placeholder_scalars, real_samplers
from .memory import Setting
from .profile import _LiveBytes


def exact_peak(config, cfg: TrainConfig, setting: Setting, steps: int = 3) -> dict[str, int]:
    """``{"device": peak bytes, "host": host-resident bytes}`` of ``setting`` at ``cfg``'s batch and length."""
    from transformers import AutoModelForCausalLM

    from ..method.loss import loss_forward
    from ..method.methods import prepare
    from ..model.blocks import block_layout, enable_checkpointing
    from ..method.step import StepRunner

    # the setting's dtype: the plan resolved dtype=auto (grass_ft.model.load.resolve_dtype) before pricing it
    run_cfg = dataclasses.replace(cfg, **setting.overrides(), sample_interval=1, update_interval=1, eval_samples=0,
                                  probe_mode="train", lr=1e-5, max_steps=steps + 1, dtype=setting.dtype)
    dtype = getattr(torch, setting.dtype)
    old = torch.get_default_dtype()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings(), FakeTensorMode(), placeholder_scalars(), cuda_kernel_choices(), noop_module_to():
        warnings.simplefilter("ignore")
        torch.set_default_dtype(dtype)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        finally:
            torch.set_default_dtype(old)
        L = block_layout(model, cfg.layers_attribute).num_blocks
        g = min(setting.gamma or 1, L)
        worst = sorted({0, *range(L - g + 1, L)})[:g]
        with real_samplers([worst] * (steps + 1)) if setting.sampling else contextlib.nullcontext():
            if setting.gradient_checkpointing:
                enable_checkpointing(model)
            prepared = prepare(model, run_cfg)
        fused_adamw(prepared)
        runner = StepRunner(prepared, max_grad_norm=1.0, max_bad_steps=steps + 2)
        tracker = _LiveBytes()
        opt = prepared.optimizer
        tracker.know([*prepared.model.parameters(), *prepared.model.buffers(), *getattr(opt, "_slabs", [])])
        vocab = int(model.get_input_embeddings().weight.shape[0])
        ids = torch.randint(0, vocab, (cfg.batch_size, cfg.max_seq_len))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        tracker.know(batch.values())
        forward = loss_forward(cfg.supervised_only_loss)
        weights = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage()._cdata: p
                                                              for p in prepared.model.parameters()}.values())
        with tracker:
            for step in range(steps):
                runner.train_step(step, [batch], forward=forward)
        host = opt.memory_report()["host_state_bytes"] if hasattr(opt, "memory_report") else 0
        # host-lean records are allocated during the step like device tensors: take them out again
        lean = host if getattr(opt, "_lean", False) else 0
    return {"device": weights + tracker.peak - lean, "host": host}
