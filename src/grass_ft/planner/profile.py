"""What one decoder block and the loss keep and allocate in a training step, measured on fake tensors.

A one-block copy of the model (the real transformers classes, the real shapes: batch x sequence x hidden) runs one
forward and backward through grass-ft's own loss under ``FakeTensorMode``: tensors have shapes and storage sizes
but no memory and no values, so a 70B model's block costs a fraction of a second. A dispatch mode counts the bytes
of every storage created and freed; hooks on the block and around backward cut the timeline into the phases the
planner composes (:mod:`grass_ft.planner.memory`): the block's saved activations, its forward and backward working
set, the loss's backward working set and the embedding's. Three runs cover the layouts (block trained or frozen,
head trained or frozen); one more per adapter kind covers LoRA and DoRA; a profile is measured with gradient
checkpointing on or off, as the setting runs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class RunProfile:
    """Bytes measured in one fake forward/backward of a one-block model (no checkpointing).

    Attributes:
        saved: what autograd keeps of the block between its forward and its backward (inputs excluded).
        block_forward: the block forward's peak of new bytes (its transients included).
        block_backward: the block backward's peak of new bytes over what was live when it began (its saved
            activations and the gradient arriving from above were).
        outside_saved: what the rest of the model keeps for backward at the end of forward (the final norm, the
            loss's checkpointed chunks, the embedding lookup), the block's ``saved`` excluded.
        forward_peak: the whole forward's peak over the weights, ``saved`` included.
        loss_backward: from the start of backward until the block's backward begins: the peak of new bytes (the
            loss chunks' recomputed logits and their gradients, the head's gradient and its temporaries when the
            head trains, the gradient arriving at the block).
        embedding_backward: after the block's backward: the peak of new bytes (the embedding's gradient).
        hidden_grad: bytes of one gradient of the hidden states (batch x sequence x hidden).
        persistent: what stays allocated from one step to the next besides weights and gradients (peft's DoRA
            keeps tensors per adapted layer); measured over a second step, whose windows the others are.
    """

    saved: int
    block_forward: int
    block_backward: int
    outside_saved: int
    forward_peak: int
    loss_backward: int
    embedding_backward: int
    hidden_grad: int
    persistent: int = 0


@dataclass(frozen=True)
class Profile:
    """The runs the planner composes: ``train`` (block, embeddings and head trained: fft), ``frozen`` (block
    frozen with gradients flowing through it to trained embeddings), ``head_frozen`` (block trained, embeddings
    and head frozen), and ``lora`` / ``dora`` (adapters at ``adapter_rank``, base frozen, head frozen) when asked.
    ``adapter_saved_per_rank``: bytes of saved activations one unit of rank adds to a block (lora_A's output of
    every adapted layer, fp32)."""

    train: RunProfile | None
    frozen: RunProfile | None
    head_frozen: RunProfile | None
    lora: RunProfile | None = None
    dora: RunProfile | None = None
    adapter_rank: int = 8
    adapter_saved_per_rank: int = 0
    checkpointing: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages created under it while they are alive (as MemTracker does, without
    categories): every op's output storages, once each, until Python frees them."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}
        self._known: set[int] = set()

    def know(self, tensors) -> None:
        """Storages that existed before (weights, inputs): views of them are not new bytes."""
        for t in tensors:
            self._known.add(t.untyped_storage()._cdata)

    def window(self) -> int:
        """Starts a new peak window; returns the bytes live now."""
        self.peak = self.live
        return self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key in self._refs or key in self._known:
                    continue
                n = st.nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                self._refs[key] = weakref.ref(st, functools.partial(self._gone, key, n))
        return out

    def _gone(self, key: int, n: int, _ref) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= n


@contextlib.contextmanager
def _fake_build(dtype: torch.dtype):
    """FakeTensorMode with the default dtype set for building (``model.to(dtype)`` cannot swap fake tensors), and
    ``nn.Module.to`` that would change nothing returning the module (peft calls it on every adapter layer)."""
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved_to, old = nn.Module.to, torch.get_default_dtype()

    def to(self, *args, **kwargs):
        device, to_dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        same = all((device is None or t.device.type == device.type)
                   and (to_dtype is None or not t.is_floating_point() or t.dtype == to_dtype)
                   for t in [*self.parameters(), *self.buffers()])
        return self if same else saved_to(self, *args, **kwargs)

    nn.Module.to = to
    torch.set_default_dtype(dtype)
    try:
        with FakeTensorMode():
            yield
    finally:
        torch.set_default_dtype(old)
        nn.Module.to = saved_to


def one_block_config(config):
    """``config`` with one decoder block (per-layer lists cut to match), no KV cache, SDPA attention."""
    cfg = copy.deepcopy(config)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for obj in {id(cfg): cfg, id(text): text}.values():
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(getattr(obj, key, None), int):
                setattr(obj, key, 1)
        if isinstance(getattr(obj, "layer_types", None), list):
            obj.layer_types = obj.layer_types[:1]
        obj.use_cache = False
    cfg._attn_implementation = "sdpa"
    return cfg


def _run(model, base, layout, batch: int, seq: int, *, block: bool, embeddings: bool, head: bool,
         supervised_only: bool, checkpointing: bool, adapters: bool = False, grad_input: bool = False) -> RunProfile:
    """One fake forward/backward of the one-block ``model`` (``base``: the transformers model inside a peft
    wrapper, else the model itself); which parameters train is given (``adapters``: the peft adapters only;
    ``grad_input``: the block's input requires grad although nothing below trains, as for every block but the
    lowest when adapters sit in each).

    The block's backward window runs from the moment the gradient of its output exists (a gradient hook on the
    output) until that of its input does (a hook on the input), so a checkpointed block's recomputation falls
    inside it."""
    from ..method.loss import loss_forward

    named = dict(model.named_parameters())
    trainable = (set(layout.blocks[0]) if block else set()) | (set(layout.embeddings) if embeddings else set())
    trainable |= set(layout.head) | set(layout.tied_head) if head else set()
    for n, p in named.items():
        p.requires_grad_("lora_" in n if adapters else n in trainable)
    tracker = _LiveBytes()
    vocab = int(base.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (batch, seq))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    tracker.know([*named.values(), *model.buffers(), *data.values()])
    windows = _BlockWindows(tracker)
    handles = windows.attach(_block_module(base, layout))
    if grad_input:
        handles.append(base.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_()))
    if checkpointing:
        from ..model.blocks import enable_checkpointing

        enable_checkpointing(base)
    forward = loss_forward(supervised_only)
    try:
        # peft's DoRA keeps per-layer tensors from one step to the next: its second step is the one measured
        steps = _steps(model, forward, data, named, tracker, windows, repeat=2 if adapters else 1)
    finally:
        for h in handles:
            h.remove()
        if checkpointing:
            base.gradient_checkpointing_disable()
    return _profile(base, windows.marks, steps, batch, seq, checkpointing)


class _BlockWindows:
    """Hooks on the block that mark, on the live-bytes tracker, where its forward starts and ends and where its
    backward window opens (its output's gradient exists) and closes (its input's does)."""

    def __init__(self, tracker: _LiveBytes):
        self.tracker = tracker
        self.marks: dict[str, int] = {}
        self.calls: list[int] = []

    def attach(self, module) -> list:
        return [module.register_forward_pre_hook(self._pre, with_kwargs=True), module.register_forward_hook(self._post)]

    def _output_grad(self, _g) -> None:  # backward has reached the block
        self.marks["loss_bwd_peak"] = self.tracker.peak - self.marks["bwd_start"]
        self.marks["block_bwd_start"] = self.tracker.window()

    def _input_grad(self, _g) -> None:  # the block's backward is done
        self.marks["block_bwd_peak"] = self.tracker.peak - self.marks["block_bwd_start"]
        self.marks["emb_start"] = self.tracker.window()

    def _pre(self, _m, args, kwargs) -> None:
        self.calls.append(1)
        if len(self.calls) == 1:  # not the recomputation inside backward
            self.marks["block_in"] = self.tracker.window()
            x = args[0] if args else kwargs.get("hidden_states")
            if x.requires_grad:
                x.register_hook(self._input_grad)

    def _post(self, _m, _a, out) -> None:
        if len(self.calls) == 1:
            self.marks["block_fwd_peak"] = self.tracker.peak - self.marks["block_in"]
            self.marks["block_out"] = self.tracker.live
            (out[0] if isinstance(out, tuple) else out).register_hook(self._output_grad)


def _steps(model, forward, data, named, tracker: _LiveBytes, windows: _BlockWindows,
           repeat: int) -> tuple[int, int, int, int]:
    """``repeat`` fake steps under the tracker: the last one's forward peak, live bytes at the end of its forward,
    peak at the end of its backward, and the bytes that persist after it."""
    with tracker:
        for _ in range(repeat):
            windows.calls.clear()
            for p in named.values():
                p.grad = None
            persistent = tracker.window()
            loss = forward(model, data)
            fwd_peak = tracker.peak - persistent
            windows.marks["bwd_start"] = fwd_end = tracker.window()
            loss.backward()
            end_peak = tracker.peak
            del loss
        for p in named.values():
            p.grad = None
        persistent = tracker.live
    return fwd_peak, fwd_end, end_peak, persistent


def _profile(base, marks: dict[str, int], steps: tuple[int, int, int, int], batch: int, seq: int,
             checkpointing: bool) -> RunProfile:
    """The run's profile from the marks of its block windows and its step's figures."""
    fwd_peak, fwd_end, end_peak, persistent = steps
    hidden = batch * seq * module_hidden(base) * base.get_input_embeddings().weight.element_size()
    # what the block adds to the live bytes by its return, its output (the next block's input) aside
    a = max(0, marks["block_out"] - marks["block_in"] - hidden)
    if "emb_start" in marks:
        block_bwd, emb = marks["block_bwd_peak"], end_peak - marks["emb_start"]
    else:  # nothing below the block needs a gradient: its window runs to the end of backward
        block_bwd, emb = end_peak - marks["block_bwd_start"], 0
    kept = a + (hidden if checkpointing else 0)  # a checkpointed block keeps its input
    return RunProfile(saved=a, block_forward=marks["block_fwd_peak"], block_backward=max(0, block_bwd),
                      outside_saved=max(0, fwd_end - kept - persistent), forward_peak=fwd_peak,
                      loss_backward=marks["loss_bwd_peak"], embedding_backward=max(0, emb), hidden_grad=hidden,
                      persistent=persistent)


def module_hidden(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.hidden_size)


def _block_module(model, layout):
    obj = model
    for part in layout.prefix.split("."):
        obj = getattr(obj, part)
    return obj[0]


def measure(config, batch: int, seq: int, dtype: torch.dtype = torch.bfloat16, supervised_only: bool = True,
            checkpointing: bool = False, layers_attribute: str | None = None, adapters: tuple[str, ...] = (),
            adapter_rank: int = 8, lora_dropout: float = 0.05, lora_targets: list[str] | str = "all-linear",
            runs: tuple[str, ...] = ("train", "frozen", "head_frozen")) -> Profile:
    """The :class:`Profile` of ``config`` at ``batch`` x ``seq`` tokens, with or without gradient checkpointing
    (``adapters``: "lora", "dora"; ``runs``: which of the three layouts to measure, the others left empty)."""
    import warnings

    from transformers import AutoModelForCausalLM

    from ..model.blocks import block_layout

    cfg1 = one_block_config(config)
    measured: dict[str, RunProfile] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _fake_build(dtype):
            try:
                model = AutoModelForCausalLM.from_config(cfg1, dtype=dtype)
            except ValueError:  # an architecture without SDPA support (transformers says so): its eager attention
                cfg1._attn_implementation = "eager"
                model = AutoModelForCausalLM.from_config(cfg1, dtype=dtype)
            torch.set_default_dtype(torch.float32)  # what the step allocates by default is fp32, as in a real run
            model.train()
            layout = block_layout(model, layers_attribute)
            kw = dict(supervised_only=supervised_only, checkpointing=checkpointing)
            layouts = {"train": (True, True, True), "frozen": (False, True, False), "head_frozen": (True, False, False)}
            for name in runs:
                blk, emb, head = layouts[name]
                measured[name] = _run(model, model, layout, batch, seq, block=blk, embeddings=emb, head=head, **kw)
            for kind in adapters:
                from peft import LoraConfig, get_peft_model

                torch.set_default_dtype(dtype)
                # a fresh model: a deep copy of fake tensors changes their fake mode
                fresh = AutoModelForCausalLM.from_config(cfg1, dtype=dtype)
                fresh.train()
                peft_model = get_peft_model(fresh,
                                            LoraConfig(r=adapter_rank, lora_alpha=2 * adapter_rank,
                                                       lora_dropout=lora_dropout, target_modules=lora_targets,
                                                       use_dora=kind == "dora", bias="none", task_type="CAUSAL_LM"))
                torch.set_default_dtype(torch.float32)
                base = peft_model.get_base_model()
                measured[kind] = _run(peft_model, base, block_layout(base, layers_attribute), batch, seq,
                                      block=False, embeddings=False, head=False, adapters=True, grad_input=True, **kw)
    layers = len([x for x in _linears(model, layout) if lora_targets == "all-linear" or x in lora_targets])
    return Profile(train=measured.get("train"), frozen=measured.get("frozen"),
                   head_frozen=measured.get("head_frozen"), lora=measured.get("lora"), dora=measured.get("dora"),
                   adapter_rank=adapter_rank, adapter_saved_per_rank=layers * batch * seq * 4,
                   checkpointing=checkpointing)


def _linears(model, layout) -> list[str]:
    from torch import nn

    module = _block_module(model, layout)
    return [n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)]
