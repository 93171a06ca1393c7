"""Method registry: a lowercase name -> a function that prepares the model, optimizer and sampler.

Adding a method is one function and one ``@register_method("name")`` line. Every method returns a
:class:`Prepared`, which :mod:`grass_ft.method.step` drives.

The optimizer always covers every candidate parameter from the start, before anything is frozen, so a block
drawn later is in it (the LMFlow #726 bug — "sampled layers never update" — cannot happen).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import TrainConfig
from ..model.blocks import BlockLayout, block_layout
from ..base.registry import METHODS, traits
from .sampler import LayerSampler


@dataclass
class Prepared:
    """A model made ready for one method.

    Attributes:
        model: the model to train (a peft model for LoRA/DoRA).
        optimizer: covers every parameter that can ever train.
        layout: decoder-block layout (sampling methods), else None.
        sampler: the block sampler (sampling methods), else None.
        always: names of parameters trained at every non-probe step besides the drawn blocks.
        reset_state_on_switch: restart a block's moments when it is re-drawn (always for ``badam``).
        offload: the optimizer keeps block state on the host.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    layout: BlockLayout | None = None
    sampler: LayerSampler | None = None
    always: list[str] = field(default_factory=list)
    reset_state_on_switch: bool = False
    offload: bool = False

    def trainable_names(self, active: list[int] | None = None) -> list[str]:
        """Names of the parameters that train when ``active`` blocks are drawn (all of them without sampling)."""
        if self.sampler is None or self.layout is None:
            return [n for n, p in self.model.named_parameters() if p.requires_grad]
        blocks = self.sampler.active if active is None else active
        return [n for b in blocks for n in self.layout.blocks[b]] + list(self.always)


MethodFn = Callable[[nn.Module, TrainConfig], Prepared]
_REGISTRY: dict[str, MethodFn] = {}


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    """Registers the builder of ``name``, a method whose capabilities are declared in
    :data:`grass_ft.base.registry.METHODS`."""
    if name not in METHODS:
        raise ValueError(f"method {name!r} has no row in grass_ft.registry.METHODS (its capabilities)")

    def deco(fn: MethodFn) -> MethodFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def method_names() -> list[str]:
    """The registered methods, in the registry's order."""
    return [m for m in METHODS if m in _REGISTRY]


def prepare(model: nn.Module, cfg: TrainConfig) -> Prepared:
    if cfg.auto:
        raise ValueError(f"method={cfg.method} gamma={cfg.gamma}: `auto` is resolved by the planner before a method "
                         f"is prepared (grass_ft.planner.resolve.resolve)")
    if cfg.method not in _REGISTRY:
        raise ValueError(f"`method` must be one of {', '.join(_REGISTRY)}, got {cfg.method!r}")
    return _REGISTRY[cfg.method](model, cfg)


def step_budget(cfg: TrainConfig, sampler: LayerSampler | None) -> tuple[int, int]:
    """``(steps, updates)`` of a run: loop iterations and optimizer updates.

    The measuring probe's steps update nothing. With ``count_probe_steps`` (the paper's accounting) they count
    toward ``max_steps``, so a run makes ``max_steps - probe_steps`` updates; without it ``max_steps`` counts
    updates and the probe's forward/backward passes come on top (methods compared at equal updates). The
    training probe (``probe_mode=train``) updates at every step, so steps = updates = ``max_steps`` either way.
    """
    probe = sampler.measure_steps if sampler is not None else 0
    if cfg.count_probe_steps:
        return cfg.max_steps, cfg.max_steps - probe
    return cfg.max_steps + probe, cfg.max_steps


def resolved_offload(cfg: TrainConfig) -> bool:
    """``offload`` left unset takes the method's default (grass_ft.base.registry): on for the GRASS family, off for
    LISA (as shipped), FFT and the adapters."""
    if cfg.offload is not None:
        return cfg.offload
    return traits(cfg.method).offload


def make_adamw(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig, layout: BlockLayout | None,
               offload: bool, layerwise: bool = False) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` (state created lazily on the device and never freed, as today's tools do), or our
    :class:`~grass_ft.method.offload.LayerwiseOffloadAdamW` (fp32 state keyed by parameter name, grouped by block) when
    ``offload`` or ``layerwise``; ``layerwise`` without ``offload`` keeps its state on the device, so the two
    GRASS arms differ only in where the state lives. bf16/fp16 parameters with ``master_weights`` (the default)
    take ours too, without offload unless asked, so that they train against fp32 masters instead of losing every
    update below half a bf16 ulp; ``master_weights=false`` keeps torch's pure-bf16 AdamW (LISA/FFT as shipped).
    With ``fsdp`` it is always ours (each rank's state is that of its shards)."""
    masters = cfg.master_weights and any(p.dtype in (torch.bfloat16, torch.float16) for _, p in named)
    # fsdp: always ours, whose name-keyed per-shard state grass_ft.parallel.fsdp saves through DCP (same numerics)
    if not (offload or layerwise or masters or cfg.fsdp):
        params = [p for _, p in named]
        # on CUDA the fused kernel, as transformers' default optimizer there (adamw_torch_fused): one kernel per
        # step and no foreach temporaries, so the baselines' memory is what their users get; the CPU keeps torch's
        # per-tensor loop, which every recorded CPU figure used
        fused = True if params and all(p.is_cuda for p in params) else None
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    from .offload import LayerwiseOffloadAdamW

    group_fn = layout.group_key if layout is not None else None
    # reset_state_on_switch restarts a re-drawn block's moments, so the host need not keep those of undrawn blocks
    lean = layerwise and offload and cfg.reset_state_on_switch
    return LayerwiseOffloadAdamW(named, lr=cfg.lr, weight_decay=cfg.weight_decay, group_fn=group_fn, offload=offload,
                                 master_weights=cfg.master_weights, host_lean=lean)


def _always_names(layout: BlockLayout, embeddings: bool, head: bool) -> list[str]:
    """Parameters trained at every step. With tied embeddings the LM head *is* the input embedding matrix, so
    training the head trains that matrix (and, with it, the input embedding)."""
    names = (layout.embeddings if embeddings else []) + (layout.head + layout.tied_head if head else [])
    return list(dict.fromkeys(names))


def _sampling(model: nn.Module, cfg: TrainConfig, embeddings: bool, head: bool, layerwise: bool = True) -> Prepared:
    kind = traits(cfg.method).sampling  # how blocks are drawn: the registry's row, stated once
    layout = block_layout(model, cfg.layers_attribute)
    always = _always_names(layout, embeddings, head)
    candidates = {n for b in layout.blocks for n in b} | set(always)
    named = [(n, p) for n, p in model.named_parameters() if n in candidates]
    offload = resolved_offload(cfg)
    sampler = LayerSampler(kind=kind, num_blocks=layout.num_blocks, gamma=cfg.gamma, tau=cfg.tau, alpha=cfg.alpha,
                           probe_steps=cfg.probe_steps, sample_interval=cfg.sample_interval,
                           update_interval=cfg.update_interval, seed=cfg.seed, probe_mode=cfg.probe_mode,
                           importance=cfg.importance)
    optimizer = make_adamw(named, cfg, layout, offload, layerwise=layerwise)
    return Prepared(model=model, optimizer=optimizer, layout=layout,
                    sampler=sampler, always=always, reset_state_on_switch=cfg.reset_state_on_switch,
                    offload=offload)


@register_method("grass")
def _grass(model: nn.Module, cfg: TrainConfig) -> Prepared:
    return _sampling(model, cfg, cfg.train_embeddings, cfg.train_head)


@register_method("grass-static")
def _grass_static(model: nn.Module, cfg: TrainConfig) -> Prepared:
    return _sampling(model, cfg, cfg.train_embeddings, cfg.train_head)


@register_method("lisa")
def _lisa(model: nn.Module, cfg: TrainConfig) -> Prepared:
    # As LMFlow and axolotl ship it: uniform draws, embeddings and head trained at every step, torch AdamW.
    return _sampling(model, cfg, True, True, layerwise=False)


@register_method("fft")
def _fft(model: nn.Module, cfg: TrainConfig) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(True)
    named = list(model.named_parameters())
    layout = None
    offload = resolved_offload(cfg)
    if offload:
        layout = block_layout(model, cfg.layers_attribute)
    return Prepared(model=model, optimizer=make_adamw(named, cfg, layout, offload), offload=offload)


def _peft(model: nn.Module, cfg: TrainConfig, dora: bool) -> Prepared:
    from .lora import wrap_peft

    model = wrap_peft(model, cfg, dora)  # freezes the base; adapters (and DoRA magnitudes) require grad
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    offload = resolved_offload(cfg)  # off unless asked: torch AdamW over the adapter parameters
    return Prepared(model=model, optimizer=make_adamw(named, cfg, None, offload), offload=offload)


@register_method("lora")
def _lora(model: nn.Module, cfg: TrainConfig) -> Prepared:
    return _peft(model, cfg, dora=False)


@register_method("dora")
def _dora(model: nn.Module, cfg: TrainConfig) -> Prepared:
    return _peft(model, cfg, dora=True)


@register_method("grass-uniform")
def _grass_uniform(model: nn.Module, cfg: TrainConfig) -> Prepared:
    # The layer-wise default (docs/DEFAULTS.md) and, in the experiment, the control arm: GRASS in every respect
    # (embeddings/head as train_embeddings/train_head say, layer-wise offloaded state, intervals) but uniform
    # draws and no probe, so a difference to GRASS is the importance signal's alone.
    return _sampling(model, cfg, cfg.train_embeddings, cfg.train_head)


@register_method("badam")
def _badam(model: nn.Module, cfg: TrainConfig) -> Prepared:
    # BAdam's practice as a peer users run (Luo et al., 2024; `badam` on PyPI, BlockOptimizer): blocks in order, γ
    # at a time, the next group every sample_interval steps (sampler kind "cyclic"), and the Adam moments of a block
    # restarted each time it comes round again, whatever reset_state_on_switch says; state offloaded and
    # embeddings/head as grass-uniform's, so a difference to grass-uniform is the order and the reset alone.
    prepared = _sampling(model, cfg, cfg.train_embeddings, cfg.train_head)
    prepared.reset_state_on_switch = True
    return prepared


if set(_REGISTRY) != set(METHODS):
    raise RuntimeError(f"methods without a builder: {sorted(set(METHODS) - set(_REGISTRY))}")
