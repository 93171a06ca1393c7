"""The peak device memory and the host memory of one training setting, composed phase by phase.

A step of grass-ft's loop (:class:`grass_ft.method.step.StepRunner`) goes: forward through every block and the loss;
backward through the loss, then down the blocks (each block's gradient stays, its saved activations go), then
the embeddings; the optimizer step; the gradients freed. The device holds, besides, the weights and whatever
optimizer state lives there. Each phase's live bytes are a sum of exact terms (weights, gradients, optimizer
state and masters follow from the parameter counts and the optimizer grass-ft builds for the setting, as
:func:`grass_ft.method.methods.make_adamw` decides) and measured ones (what a block and the loss keep and allocate,
from one fake forward/backward of a one-block model: :mod:`grass_ft.planner.profile`); the peak is the largest
phase. Layer-wise settings are priced at their worst draw: block 0 among the active ones (backward runs all the
way down) and the others at the top (their gradients held the longest). LISA's device state grows with every
block it draws; ``drawn_blocks`` says how many have state (``None``: all, the long run).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..method.offload import DEFAULT_CHUNK_SIZE, RING_SLOTS
from ..base.registry import traits
from .profile import Profile, RunProfile
from .shape import ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CATEGORIES = ("weights", "gradients", "optimizer", "masters", "activations", "temporaries")


@dataclass(frozen=True)
class Setting:
    """One row of the plan: the keys of ``grass-ft train`` that decide memory (names as in TrainConfig)."""

    method: str = "fft"
    gamma: int | None = None
    lora_r: int | None = None
    offload: bool = False
    master_weights: bool = True
    train_embeddings: bool = True
    train_head: bool = True
    reset_state_on_switch: bool = False
    gradient_checkpointing: bool = False
    supervised_only_loss: bool = True
    dtype: str = "bfloat16"
    world_size: int = 1
    fsdp: bool = False
    label: str = ""

    @property
    def sampling(self) -> bool:
        return bool(traits(self.method).sampling)

    @property
    def adapters(self) -> bool:
        return self.method in ("lora", "dora")

    @property
    def host_lean(self) -> bool:
        """The layer-wise host layout without moments for undrawn blocks (``reset_state_on_switch=true``)."""
        return self.sampling and self.offload and self.reset_state_on_switch

    def overrides(self) -> dict:
        """The ``key=value`` pairs that select this setting in ``grass-ft train``."""
        out: dict = {"method": self.method}
        if self.sampling:
            out["gamma"] = self.gamma
            if self.method != "lisa":
                out.update(train_embeddings=self.train_embeddings, train_head=self.train_head)
        if self.adapters:
            out["lora_r"] = self.lora_r
        out.update(offload=self.offload, gradient_checkpointing=self.gradient_checkpointing)
        if self.reset_state_on_switch:
            out["reset_state_on_switch"] = True
        if not self.master_weights:
            out["master_weights"] = False
        return out


@dataclass
class Prediction:
    """Bytes of a setting: the device peak and its parts, the phase it falls in, and the host's share."""

    setting: Setting
    device: int
    parts: dict[str, int]
    phase: str
    host_resident: int
    host_load: int
    trained_numel: int
    transfer_bytes: int = 0  # host <-> device bytes per step (the offloaded optimizer's records, both ways)
    device_state: int = 0  # optimizer moments and masters on the device after the step
    phases: dict[str, int] = field(default_factory=dict)
    host_finish: int = 0  # held beside the optimizer's host state at the end (fsdp: rank 0's gathered weights)

    @property
    def host(self) -> int:
        """The host's peak: the optimizer's host state (with what the finish gathers beside it), or the weights
        while they load if more."""
        return max(self.host_resident + self.host_finish, self.host_load)


@dataclass(frozen=True)
class _Optimizer:
    kind: str  # "torch" (torch.optim.AdamW), "device" (ours, state on the device), "host" (ours, offloaded)
    moment_bytes: int  # per parameter
    master_bytes: int  # per low-precision parameter


def optimizer_of(s: Setting) -> _Optimizer:
    """What :func:`grass_ft.method.methods.make_adamw` builds for ``s``: torch AdamW (state in the parameters' dtype) or
    grass-ft's LayerwiseOffloadAdamW (fp32 moments, fp32 masters of bf16/fp16 parameters), on the host or not."""
    low = s.dtype in ("bfloat16", "float16") and not s.adapters  # peft keeps adapters in fp32
    masters = s.master_weights and low
    layerwise = s.sampling and s.method != "lisa"
    if not (s.offload or layerwise or masters or s.fsdp):
        return _Optimizer("torch", 2 * (4 if s.adapters else DTYPE_BYTES[s.dtype]), 0)
    return _Optimizer("host" if s.offload else "device", 8, 4 if masters else 0)


def _trained_outside(shape: ModelShape, s: Setting) -> tuple[int, int, bool]:
    """``(embedding numel, head numel, head has a gradient)`` trained besides the blocks."""
    if s.method == "fft":
        return shape.embed_numel + shape.other_numel, shape.head_numel, True
    if s.adapters:
        return 0, 0, False
    emb_on = s.train_embeddings or s.method == "lisa"
    head_on = s.train_head or s.method == "lisa"
    emb = shape.embed_numel if (emb_on or (shape.tied and head_on)) else 0
    head = shape.head_numel if head_on else 0
    return emb, head, head_on or (shape.tied and emb_on)


def _adapter_run(profile: Profile, s: Setting) -> RunProfile:
    run = profile.dora if s.method == "dora" else profile.lora
    if run is None:
        raise ValueError(f"the profile has no {s.method} run")
    extra = (s.lora_r - profile.adapter_rank) * profile.adapter_saved_per_rank  # lora_A's fp32 output per layer
    if profile.checkpointing:  # kept only inside the recomputation, i.e. in the block's backward window
        return replace(run, block_backward=run.block_backward + extra)
    return replace(run, saved=run.saved + extra, block_forward=run.block_forward + extra,
                   block_backward=run.block_backward + extra)


def predict(shape: ModelShape, profile: Profile, s: Setting, drawn_blocks: int | None = None,
            active_blocks: list[int] | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Prediction:
    """The device peak and host bytes of ``s`` on a model of ``shape``.

    Args:
        profile: measured at the setting's batch, sequence length, dtype, loss and checkpointing.
        drawn_blocks: blocks with device-resident optimizer state before this step (LISA as shipped, a layer-wise
            method without offload); None: every block (the long run). This step's blocks get theirs at its step.
        active_blocks: the blocks this step trains; None: the worst draw (block 0 and the top γ-1).
    """
    if s.gradient_checkpointing != profile.checkpointing:
        raise ValueError("the profile was measured with gradient checkpointing "
                         f"{'on' if profile.checkpointing else 'off'}, the setting has it "
                         f"{'on' if s.gradient_checkpointing else 'off'}")
    t = _what_trains(shape, s, active_blocks)
    phases = _phases(shape, profile, s, t, drawn_blocks, chunk_size)
    name, (peak, parts) = max(phases.items(), key=lambda kv: kv[1][0])
    host_resident, transfer = _host_state(s, t)
    # from_pretrained on the CPU, then moved to the device; with fsdp rank 0 alone reads the weights and hands each
    # rank its shards (grass_ft.parallel.fsdp.shard_from_rank0), and at the end gathers them again to save final/
    host_load = shape.numel * t.w
    host_finish = shape.numel * t.w if s.fsdp else 0
    return Prediction(setting=s, device=peak, parts=parts, phase=name, host_resident=host_resident * t.n,
                      host_load=host_load, host_finish=host_finish, trained_numel=t.stepped, transfer_bytes=transfer,
                      device_state=sum(_device_state(s, t, drawn_blocks, before=False)),
                      phases={k: v[0] for k, v in phases.items()})


@dataclass(frozen=True)
class _Trains:
    """What one step of a setting trains, and the sizes every phase reads."""

    w: int  # bytes per weight
    n: int  # ranks the weights are sharded over (1 without fsdp)
    num_blocks: int
    active: list[int]  # the blocks this step trains
    per_block: int  # trained parameters of a block (its adapters for lora/dora)
    grad_w: int  # bytes per gradient entry
    emb: int
    head: int
    head_grad: bool
    stepped: int  # what one step updates
    candidates: int  # every parameter the optimizer covers
    opt: _Optimizer


def _what_trains(shape: ModelShape, s: Setting, active_blocks: list[int] | None) -> _Trains:
    w = DTYPE_BYTES[s.dtype]
    L, n = shape.num_blocks, max(1, s.world_size if s.fsdp else 1)
    block = max(shape.block_numel)
    emb, head, head_grad = _trained_outside(shape, s)
    gamma = min(max(1, s.gamma or 1), L)
    if s.adapters:
        per_block = shape.lora_numel(s.lora_r, dora=s.method == "dora") // max(1, L)
        active, grad_w = list(range(L)), 4  # peft keeps adapters in fp32
    elif s.sampling:
        active = active_blocks if active_blocks is not None else ([0] + list(range(L - gamma + 1, L)))[:gamma]
        per_block, grad_w = block, w
    else:
        active, per_block, grad_w = list(range(L)), block, w
    return _Trains(w, n, L, active, per_block, grad_w, emb, head, head_grad,
                   stepped=len(active) * per_block + emb + head, candidates=L * per_block + emb + head,
                   opt=optimizer_of(s))


def _device_state(s: Setting, t: _Trains, drawn_blocks: int | None, before: bool) -> tuple[int, int]:
    """Optimizer moments and masters on the device before (or after) this step's update."""
    if t.opt.kind == "host":
        return 0, 0
    if s.method == "lisa" or s.sampling:  # state per group, created at its first step, never freed
        drawn = t.num_blocks if drawn_blocks is None else drawn_blocks + (0 if before else len(t.active))
        held = min(t.num_blocks, drawn)
        covered = held * t.per_block + t.emb + t.head
    else:
        covered = t.candidates
    return covered * t.opt.moment_bytes // t.n, covered * t.opt.master_bytes // t.n


def _phases(shape: ModelShape, profile: Profile, s: Setting, t: _Trains, drawn_blocks: int | None,
            chunk_size: int) -> dict[str, tuple[int, dict[str, int]]]:
    """Each phase of the step (forward, the loss's backward, each block's backward, the embeddings', the optimizer
    step): its live bytes and their parts."""
    L, n, w, ckpt = t.num_blocks, t.n, t.w, s.gradient_checkpointing
    adapters_total = shape.lora_numel(s.lora_r, dora=s.method == "dora") if s.adapters else 0
    weights = shape.numel * w // n + adapters_total * 4
    cached = L * _adapter_run(profile, s).persistent if s.adapters else 0  # DoRA's per-layer tensors
    moments, masters = _device_state(s, t, drawn_blocks, before=True)
    tail = profile.train if t.head_grad else profile.head_frozen
    act_run = _adapter_run(profile, s) if s.adapters else profile.train
    hidden = tail.hidden_grad  # bytes of one hidden-state tensor (a checkpoint boundary, a gradient)

    def kind(k: int) -> RunProfile:
        return act_run if k in t.active else profile.frozen

    def kept(k: int) -> int:  # what block k holds between its forward and its backward
        return kind(k).saved + (hidden if ckpt else 0)

    grads_block = t.per_block * t.grad_w // n
    grad_tail = (t.head * w + (t.emb * w if shape.tied and t.emb and t.head_grad else 0)) // n
    grad_emb = 0 if shape.tied else t.emb * w // n
    fsdp_gather = (2 * max(shape.block_numel) + shape.embed_numel + shape.head_numel) * w if s.fsdp and n > 1 else 0
    phases: dict[str, tuple[int, dict[str, int]]] = {}

    def phase(name: str, grads: int, acts: int, temps: int, state: tuple[int, int] = (moments, masters)) -> None:
        total = weights + sum(state) + fsdp_gather + grads + acts + temps + cached
        phases[name] = (total, {"weights": weights, "gradients": grads, "optimizer": state[0], "masters": state[1],
                                "activations": acts + cached, "temporaries": temps + fsdp_gather})

    kept_all = sum(kept(k) for k in range(L))
    phase("forward", 0, kept_all - kept(L - 1), kind(L - 1).forward_peak)
    phase("backward (loss)", 0, kept_all + tail.outside_saved, tail.loss_backward)
    above, below = 0, kept_all
    for k in range(L - 1, -1, -1):  # block k's backward: the blocks below still hold theirs, those above are done
        phase(f"backward (block {k})", grad_tail + above, below, hidden + kind(k).block_backward)
        below -= kept(k)
        if k in t.active:
            above += grads_block
    if t.emb and (s.method in ("fft", "lisa") or s.train_embeddings):
        phase("backward (embeddings)", grad_tail + above, 0, hidden + profile.train.embedding_backward)
    phase("optimizer step", grad_tail + above + grad_emb, 0, _step_temporaries(t.opt, s, shape, chunk_size, w),
          _device_state(s, t, drawn_blocks, before=False))
    return phases


def _host_state(s: Setting, t: _Trains) -> tuple[int, int]:
    """The optimizer state on the host (per rank) and the bytes it moves to and from the device per step."""
    if t.opt.kind != "host":
        return 0, 0
    opt = t.opt
    if s.host_lean:  # fp32 masters of every block, moments of the drawn ones only
        host_resident = t.candidates * opt.master_bytes + t.stepped * opt.moment_bytes
    else:
        host_resident = t.candidates * (opt.moment_bytes + opt.master_bytes)
    return host_resident // t.n, 2 * t.stepped * (opt.moment_bytes + opt.master_bytes) // t.n


def _step_temporaries(opt: _Optimizer, s: Setting, shape: ModelShape, chunk_size: int, w: int) -> int:
    """Device bytes the optimizer step allocates and frees: none for fused torch AdamW; for grass-ft's optimizer a
    chunk's fp32 denominator and up-cast gradient (and, offloaded, a ring of chunk records)."""
    if opt.kind == "torch":
        return 0
    largest = max(max(shape.block_numel), shape.embed_numel if s.method == "fft" or s.train_embeddings else 0)
    chunk = min(chunk_size, largest)
    temps = chunk * 4 * (1 + (w != 4))  # denom, grad32
    if w != 4 and not opt.master_bytes:
        temps += chunk * 4  # param32: pure low-precision AdamW's up-cast copy
    if opt.kind == "host":
        width = (3 if opt.master_bytes else 2) * chunk
        temps += RING_SLOTS * width * 4
    return temps
