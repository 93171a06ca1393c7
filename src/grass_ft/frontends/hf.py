"""``GrassCallback``: GRASS, GRASS*, LISA and BAdam-order layer sampling inside ``transformers.Trainer`` and TRL's
``SFTTrainer``.

The Trainer keeps its own forward/backward, clipping, optimizer, LR schedule and checkpoints; the callback drives
the same :class:`~grass_ft.method.step.StepRunner` pieces (sampler, probe recorder, ``requires_grad`` switching) as the
native loop, at these events (all present in transformers >= 4.56, the floor; see docs/HF.md):

- ``on_train_begin``: the Trainer's optimizer exists; check it covers every candidate parameter (nothing is
  frozen before it is built, so LMFlow #726 cannot happen), build the runner, restore its state when resuming.
- ``on_step_begin``: ``StepRunner.begin_step(state.global_step)`` (probe / refresh / draw, ``requires_grad``),
  write the events to ``layers.jsonl``, move optimizer state of blocks that left the active set to host memory.
- ``on_substep_end`` and ``on_pre_optimizer_step``: the probe's per-micro-batch observation.
- ``on_pre_optimizer_step``: the active blocks' gradient RMS (adaptive GRASS, and the training probe), read
  *before* the Trainer's clipping by the runner's :class:`~grass_ft.method.importance.GradNormRecorder` in its
  ``"last"`` mode (the same recorder and non-finite policy as the native loop).
- checkpoints: the runner's state travels in ``trainer_state.json`` (``ExportableState``); see :meth:`state`.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging as hf_logging
from transformers.trainer_callback import ExportableState

from ..config import ConfigError, TrainConfig, build_config, validate
from ..parallel.distributed import Distributed
from ..method.methods import prepare
from ..model.blocks import block_layout
from ..base.registry import DEFAULT_SAMPLING, with_sampling
from ..method.step import StepRunner

METHOD_KEYS = ("method", "gamma", "tau", "alpha", "probe_steps", "sample_interval", "update_interval",
               "train_embeddings", "train_head", "reset_state_on_switch", "layers_attribute", "seed",
               "probe_mode", "importance", "max_seq_len", "device_memory", "host_memory", "memory_margin")
logger = hf_logging.get_logger("grass_ft")
_CALLBACK_GAMMA = 4  # the callback's gamma unless given (gamma=auto: the planner's, at on_train_begin)
CALLBACK_METHODS = with_sampling()  # the methods that draw blocks (grass_ft.base.registry)
# Run keys of the CLI that the Trainer owns: where to set them instead.
_TRAINER_OWNS = {
    "model": "Trainer(model=...)", "data": "Trainer(train_dataset=...)", "eval_data": "Trainer(eval_dataset=...)",
    "lr": "TrainingArguments(learning_rate=...)", "weight_decay": "TrainingArguments(weight_decay=...)",
    "warmup_steps": "TrainingArguments(warmup_steps=...)", "lr_schedule": "TrainingArguments(lr_scheduler_type=...)",
    "max_grad_norm": "TrainingArguments(max_grad_norm=...)",
    "batch_size": "TrainingArguments(per_device_train_batch_size=...)",
    "grad_accum": "TrainingArguments(gradient_accumulation_steps=...)", "max_steps": "TrainingArguments(max_steps=...)",
    "gradient_checkpointing": "TrainingArguments(gradient_checkpointing=True, "
                              "gradient_checkpointing_kwargs={'use_reentrant': False})",
    "output_dir": "TrainingArguments(output_dir=...)", "logging_steps": "TrainingArguments(logging_steps=...)",
    "dtype": "the dtype the model is loaded in",
    "count_probe_steps": "TrainingArguments(max_steps=...), which counts the probe's steps",
    "supervised_only_loss": "grass_ft.loss.enable_supervised_loss(model) before building the Trainer",
    "offload": "nothing: the callback always moves the optimizer state of blocks that leave the active set to "
               "host memory",
    "num_train_epochs": "TrainingArguments(num_train_epochs=...)",
    "warmup_ratio": "TrainingArguments(warmup_ratio=...)",
    "eval_steps": "TrainingArguments(eval_strategy='steps', eval_steps=...)",
    "metric_for_best_model": "TrainingArguments(metric_for_best_model=...)",
    "load_best_model_at_end": "TrainingArguments(load_best_model_at_end=True)",
    "early_stopping_patience": "callbacks=[transformers.EarlyStoppingCallback(early_stopping_patience=...)]",
    "packing": "trl.SFTConfig(packing=True)",
    "attn_implementation": "from_pretrained(..., attn_implementation=...)",
    "save_dtype": "the dtype of the model you save",
    "run_name": "TrainingArguments(run_name=...)",
    "report_to": "TrainingArguments(report_to=...)",
}
_NO_PROBE_LIMIT = 2**31  # probe_steps is checked against the Trainer's max_steps once training starts


def callback_config(keys: dict[str, Any]) -> TrainConfig:
    """Validate :class:`GrassCallback` keys through :func:`grass_ft.config.build_config`.

    Raises:
        ConfigError: every unknown key, key the Trainer owns, wrong type and out-of-range value at once.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    errors: list[str] = []
    for key in keys:
        if key in METHOD_KEYS:
            continue
        if key in known:
            errors.append(f"`{key}` is not a GrassCallback key: set it with {_TRAINER_OWNS.get(key, 'the Trainer')}")
        else:
            close = difflib.get_close_matches(str(key), METHOD_KEYS, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            errors.append(f"unknown key `{key}`{hint}; GrassCallback keys: {', '.join(METHOD_KEYS)}")
    # the callback only samples: its default method is the best sampling arm, not `grass-ft train`'s default
    ours = {"method": DEFAULT_SAMPLING, "gamma": _CALLBACK_GAMMA, **{k: v for k, v in keys.items() if k in METHOD_KEYS}}
    try:
        cfg = build_config(overrides={**ours, "max_steps": _NO_PROBE_LIMIT}, known_methods=CALLBACK_METHODS,
                           auto_method=False)
    except ConfigError as e:
        errors.extend(e.errors)
    if errors:
        raise ConfigError(errors)
    return cfg


# ------------------------------------------------------------------------------------- JSON-safe state


def _to_json(obj: Any) -> Any:
    """Tensors as base64 of their raw bytes (exact, compact); dicts and lists recursively."""
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "b64": base64.b64encode(raw).decode("ascii")}
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    return obj


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        dtype = getattr(torch, obj["__tensor__"])
        raw = bytearray(base64.b64decode(obj["b64"]))
        if not raw:
            return torch.empty(obj["shape"], dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype).reshape(obj["shape"]).clone()
    if isinstance(obj, dict):
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- pieces


def _unwrap(optimizer) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (itself a ``torch.optim.Optimizer`` subclass that
    forwards ``state`` but not our optimizer's ``memory_report`` / ``reset_state``)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _refuse_untested(args, without_ddp: bool = False) -> None:
    """Setups the callback has not been tested with fail here, before a step, rather than mid-run (ANCHORS.md:
    engines are claimed only once tested)."""
    problems = []
    if getattr(args, "deepspeed", None):
        problems.append("DeepSpeed")
    if getattr(args, "fsdp", None):
        problems.append("FSDP")
    if getattr(args, "world_size", 1) > 1 and not without_ddp:
        problems.append(f"{args.world_size} processes with the plain Trainer (its DDP wrapper needs a gradient for "
                        f"every parameter at every step: use grass_ft.GrassTrainer, see docs/DISTRIBUTED.md)")
    if getattr(args, "fp16", False):
        # GradScaler: the probe leaves no gradient to inf-check, and MGN would be read at the loss scale
        problems.append("fp16 mixed precision (use bf16=True or fp32)")
    if problems:
        raise ValueError(f"GrassCallback does not support {'; '.join(problems)}")


def _reentrant_checkpointing(args) -> bool:
    """Whether the Trainer's activation checkpointing is reentrant (transformers < 5 defaulted to it)."""
    import transformers

    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs",
                                                                               None) or {}
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs)
    return bool(kwargs.get("use_reentrant", int(transformers.__version__.split(".")[0]) < 5))


class _StateMover:
    """Keeps the Trainer's torch optimizer's state of trainable parameters on their device and every other
    parameter's state in host memory (pinned on CUDA).

    Safe because torch optimizers key state by parameter and skip parameters whose ``.grad`` is None, which is
    every frozen parameter: its state is only read again after :meth:`sync` has brought it back. Only tensors
    with a dimension move; the 0-dim ``step`` stays where the optimizer put it (host for plain AdamW, device for
    fused/capturable), as the optimizer requires. On a CPU-only machine host and device are the same memory;
    the bookkeeping (``offloaded``) still says where each state would live, and :meth:`report` counts by it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.opt = optimizer
        self.offloaded: set[nn.Parameter] = set()
        self.peak_device_bytes = 0

    def sync(self, keep: set[nn.Parameter], drop_leaving: bool) -> None:
        self.offloaded = {p for p in self.offloaded if self.opt.state.get(p)}  # reset_state may have dropped some
        moved_to_host: set[torch.device] = set()
        for p, st in list(self.opt.state.items()):
            if not st:
                continue
            if p in keep:
                if p in self.offloaded:
                    for k, v in st.items():
                        if torch.is_tensor(v) and v.dim() > 0 and v.device != p.device:
                            # From pinned memory this is async and stream-ordered before the optimizer step; the
                            # pinned host allocator keeps the source block alive until the copy has completed.
                            st[k] = v.to(p.device, non_blocking=True)
                    self.offloaded.discard(p)
            elif p not in self.offloaded:
                if drop_leaving:  # reset_state_on_switch: the moments would be reset on re-entry anyway
                    del self.opt.state[p]
                    continue
                for k, v in st.items():
                    if not (torch.is_tensor(v) and v.dim() > 0) or v.device.type == "cpu":
                        continue
                    if v.is_cuda:
                        host = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=True)
                        host.copy_(v, non_blocking=True)  # async D2H; completed by the synchronize below
                        moved_to_host.add(v.device)
                    else:
                        host = v.to("cpu")  # other accelerators: a plain blocking copy
                    st[k] = host
                self.offloaded.add(p)
        for dev in moved_to_host:
            # Host copies must be complete before the CPU reads them (the Trainer saves optimizer.pt from them);
            # one wait per switch of the active set, which happens every `sample_interval` steps.
            torch.cuda.synchronize(dev)
        self.note_peak()

    def report(self) -> dict[str, int]:
        device = host = 0
        for p, st in self.opt.state.items():
            n = sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
            if p in self.offloaded:
                host += n
            else:
                device += n
        return {"device_state_bytes": device, "host_state_bytes": host}

    def note_peak(self) -> None:
        self.peak_device_bytes = max(self.peak_device_bytes, self.report()["device_state_bytes"])


# --------------------------------------------------------------------------------------------- callback


class GrassCallback(TrainerCallback, ExportableState):
    """Layer-wise sampling (GRASS, GRASS*, LISA, BAdam's order) for ``transformers.Trainer`` and ``trl.SFTTrainer``.

    ``Trainer(model, args, train_dataset=..., callbacks=[GrassCallback(method="grass", gamma=4)])`` is all it
    takes. Every parameter must require grad when the Trainer builds its optimizer (the callback freezes
    nothing before training starts, and checks at ``on_train_begin``). Steps are the Trainer's
    ``state.global_step``; probe steps count toward ``max_steps`` and the Trainer's LR schedule.

    Args:
        **keys: the CLI's method keys: ``method`` (grass-uniform, the default; grass, grass-static, lisa),
            ``gamma``, ``tau``, ``alpha``, ``probe_steps``, ``sample_interval``, ``update_interval``,
            ``train_embeddings``, ``train_head``, ``reset_state_on_switch``, ``layers_attribute``, ``seed``,
            ``probe_mode``, ``importance``; defaults and meaning as in :class:`~grass_ft.config.TrainConfig`
            (but ``method``: the CLI's default, fft, samples no layers).

    Raises:
        ConfigError: listing every unknown key or bad value, each by name.
    """

    def __init__(self, **keys: Any):
        self.config = callback_config(keys)
        self._args = {k: getattr(self.config, k) for k in keys}  # JSON-safe copies for ExportableState
        self.runner: StepRunner | None = None
        self._mover: _StateMover | None = None
        self._own_report = None  # an optimizer with its own memory_report (LayerwiseOffloadAdamW)
        self._trace = None
        self._step = -1
        self._requires_grad: dict[str, bool] = {}
        self._input_grads_off = False
        self._without_ddp = False  # set by GrassTrainer: the model is not DDP-wrapped, gradients are ours to sync
        self._dist = Distributed()
        self.allreduce_bytes: dict[int, int] = {}  # step -> bytes this rank all-reduced (multi-process)

    # ------------------------------------------------------------------------------------------ checks

    def _resolve_gamma(self, model: nn.Module, args) -> None:
        """``gamma=auto``: the largest γ the planner expects to fit this device at the Trainer's batch size and the
        callback's ``max_seq_len`` (its layer-wise rows: offloaded state, as the callback moves the state of blocks
        that leave to the host), resolved once and logged."""
        if self.config.gamma != "auto":
            return
        from ..planner import detect_budgets, format_size
        from ..planner.resolve import choice_line
        from ..planner.table import NothingFits, build_plan, nothing_fits_message

        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        cfg = dataclasses.replace(self.config, model=name, batch_size=args.per_device_train_batch_size, dtype=dtype,
                                  gradient_checkpointing=bool(args.gradient_checkpointing), offload=True)
        device = next(model.parameters()).device.type
        budgets = detect_budgets(cfg.device_memory, cfg.host_memory, "cuda" if device == "cuda" else "cpu")
        plan = build_plan(cfg, budgets, margin=cfg.memory_margin, config=model.config)
        if plan.recommended is None:
            raise NothingFits(nothing_fits_message(plan, cfg))
        row = plan.recommended
        self.config = dataclasses.replace(self.config, gamma=row.setting.gamma)
        self._args["gamma"] = row.setting.gamma  # a resumed Trainer restores this gamma, it does not plan again
        record = {"resolved": {"gamma": row.setting.gamma}, "device_memory": format_size(budgets.device),
                  "host_memory": format_size(budgets.host), "margin": cfg.memory_margin,
                  "predicted_device_bytes": row.prediction.device, "predicted_host_bytes": row.prediction.host}
        logger.warning("GrassCallback: %s", choice_line(record))

    def _checked_layout(self, model: nn.Module, max_steps: int | None = None):
        layout = block_layout(model, self.config.layers_attribute)
        cfg = dataclasses.replace(self.config, max_steps=max_steps or _NO_PROBE_LIMIT)
        errors = validate(cfg, num_blocks=layout.num_blocks, known_methods=CALLBACK_METHODS, auto_method=False)
        if errors:
            # the Trainer's name for the step budget
            raise ConfigError([e.replace(f"max_steps={max_steps}", f"the Trainer's max_steps={max_steps}")
                               for e in errors])
        return layout

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.config.gamma != "auto":  # fail at Trainer(...), not at train(), on a bad gamma
            self._checked_layout(model)

    # ------------------------------------------------------------------------------------------- events

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _refuse_untested(args, self._without_ddp)
        self._resolve_gamma(model, args)
        self._checked_layout(model, state.max_steps)
        self._dist = _trainer_distributed(args)
        opt = _unwrap(optimizer)
        # The method's own preparation (sampler kind, always-trained names) from the registry; the throwaway
        # optimizer it builds (plain AdamW, lazy state) is replaced by the Trainer's.
        prepared = prepare(model, dataclasses.replace(self.config, offload=False))
        prepared.optimizer = opt
        names = dict(model.named_parameters())
        covered = {id(p) for g in opt.param_groups for p in g["params"]}
        candidates = [n for b in prepared.layout.blocks for n in b] + list(prepared.always)
        missing = [n for n in candidates if id(names[n]) not in covered]
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise ValueError(f"the Trainer's optimizer does not cover {len(missing)} parameter(s) GrassCallback may "
                             f"train ({shown}): they did not require grad when it was built. Leave every parameter "
                             f"trainable before Trainer(...); the callback freezes blocks itself (LMFlow #726)")
        self.runner = StepRunner(prepared, grad_accum=args.gradient_accumulation_steps, dist=self._dist)
        if state.global_step > 0:
            self._resume(state)
        self._requires_grad = {n: p.requires_grad for n, p in names.items()}
        self._own_report = opt if hasattr(opt, "memory_report") else None
        self._mover = None if self._own_report is not None else _StateMover(opt)
        self._step = state.global_step - 1
        self._stop_backward_at_active_blocks(model, args)
        if state.is_world_process_zero:
            self._open_trace(Path(args.output_dir) / "layers.jsonl", state.global_step)
        elif os.environ.get("GRASS_FT_TRACE_ALL_RANKS") == "1":  # as the native loop: a debugging aid, used by tests
            self._open_trace(Path(args.output_dir) / f"layers.rank{self._dist.rank}.jsonl", state.global_step)

    def _stop_backward_at_active_blocks(self, model: nn.Module, args) -> None:
        """transformers makes the input embeddings' output require grad whenever it turns checkpointing on
        (reentrant checkpointing and PEFT need that). Non-reentrant checkpointing does not, and with it backward
        would run through every frozen block down to the input (ANCHORS.md, unsloth #285): switch it off."""
        self._input_grads_off = False
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5 name
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing and hasattr(model, "_require_grads_hook") and not _reentrant_checkpointing(args):
            model.disable_input_require_grads()
            self._input_grads_off = True

    def on_step_begin(self, args, state, control, **kwargs):
        step = self._step = state.global_step
        events = self.runner.begin_step(step)
        if self._trace is not None:
            for ev in events:
                self._trace.write(json.dumps(ev) + "\n")
        probe = self.runner.is_probe(step)
        if self._mover is not None:
            keep = set() if probe else set(self.runner.trainable_params())
            self._mover.sync(keep, drop_leaving=self.runner.p.reset_state_on_switch)
        recorder = self.runner._recorder
        # multi-process: the hooks would see each rank's own gradient; read after the all-reduce (sync_gradients)
        if not probe and self.runner.sampler.records(step) and not self._dist.enabled:
            recorder.attach("last")  # pre-clip RMS of the step's accumulated gradients, read at pre_optimizer_step
        elif recorder.mode == "last":
            recorder.detach()

    def sync_gradients(self) -> None:
        """Multi-process, after the last backward of a step and before the Trainer clips: average the gradients
        of the parameters that train this step over ranks (the probe averages its own, per parameter, as it reads
        them), then read the active blocks' gradient norms for MGN from the averaged gradients."""
        if not self._dist.enabled or self.runner.is_probe(self._step):
            return
        self._dist.all_reduce_grads(self.runner.trainable_params())
        if self.runner.sampler.records(self._step):
            self.runner.sampler.observe(self.runner._recorder.read(self.runner.sampler.active))

    def on_substep_end(self, args, state, control, **kwargs):
        self.runner.after_micro_backward(self._step)  # the probe: one observation per micro-batch

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # After the Trainer clipped (nothing to clip in the probe: the recorder freed every gradient) and before
        # optimizer.step(), which skips every parameter without a gradient.
        self.runner.after_micro_backward(self._step)
        if self.runner._recorder.mode == "last":
            self.runner.sampler.observe(self.runner._recorder.flush())

    def on_step_end(self, args, state, control, **kwargs):
        if self._dist.enabled:
            self.allreduce_bytes[self._step] = self._dist.allreduce_bytes
        if self._mover is not None:
            self._mover.note_peak()  # state created by this step's update is on the device now

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add :meth:`log_metrics` to the Trainer's logs (and its ``log_history``), so a Trainer / TRL user sees
        them where the loss is: in the console, ``trainer_state.json``, and every reporting callback that runs
        after this one (``report_to="none"`` and ``callbacks=[GrassCallback(...), TensorBoardCallback()]``;
        callbacks named by ``report_to`` are built before the user's and see the logs first)."""
        if logs is None or self.runner is None or "loss" not in logs:
            return
        extra = self.log_metrics()
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def log_metrics(self) -> dict[str, float]:
        """``grass/*`` metrics of the step just taken: ``grass/active_blocks`` (number of trained blocks, 0 in
        the probe), ``grass/mgn/block_<i>`` (the sampler's MGN once the probe is over, adaptive and static
        GRASS), and the optimizer state in bytes on the device and on the host (:meth:`memory_report`)."""
        sampler, step = self.runner.sampler, self._step
        probe = self.runner.is_probe(step)
        out = {"grass/active_blocks": 0.0 if probe else float(len(sampler.active))}
        if sampler.measures and not probe:
            out.update({f"grass/mgn/block_{i:02d}": float(m) for i, m in enumerate(sampler.mgn.tolist())})
        report = self.memory_report()
        out["grass/optimizer_state_device_bytes"] = float(report["device_state_bytes"])
        out["grass/optimizer_state_host_bytes"] = float(report["host_state_bytes"])
        return out

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.runner is not None:
            self.runner._recorder.detach()  # a run stopped inside the probe must not leave grad-freeing hooks
            for n, p in self.runner.params.items():  # as the user had them, so a next Trainer sees every param
                p.requires_grad_(self._requires_grad.get(n, True))
        if self._input_grads_off and model is not None:
            model.enable_input_require_grads()
            self._input_grads_off = False
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    # ----------------------------------------------------------------------------------- trace, report

    def _open_trace(self, path: Path, resume_step: int) -> None:
        """``layers.jsonl`` as the CLI writes it; on resume, events from ``resume_step`` on are dropped first so
        that the file reads as one uninterrupted run."""
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self._trace = open(path, "a", buffering=1)

    def memory_report(self) -> dict[str, int]:
        """Optimizer-state bytes: ``device_state_bytes`` (trainable blocks' state, on the compute device),
        ``host_state_bytes`` (every other block's) and ``peak_device_state_bytes`` (seen at step boundaries)."""
        if self._own_report is not None:
            r = self._own_report.memory_report()
            return {k: int(r[k]) for k in ("device_state_bytes", "host_state_bytes", "peak_device_state_bytes")}
        if self._mover is None:
            return {"device_state_bytes": 0, "host_state_bytes": 0, "peak_device_state_bytes": 0}
        return {**self._mover.report(), "peak_device_state_bytes": self._mover.peak_device_bytes}

    # ---------------------------------------------------------------------------------------- checkpoint

    def state(self) -> dict:
        """What the Trainer writes into each checkpoint's ``trainer_state.json`` (``stateful_callbacks``).

        ``args`` and ``attributes`` are ``ExportableState``'s contract; ``grass`` holds the runner's state
        (sampler with its generator, MGN window, blocks ever active) as exact base64 tensors, tagged with the
        next step. The Trainer reads this file back on ``resume_from_checkpoint`` whatever
        ``restore_callback_states_from_checkpoint`` says, and :meth:`on_train_begin` loads ``grass`` from it.
        """
        grass = None
        if self.runner is not None:
            grass = {"next_step": self._step + 1, "runner": _to_json(self.runner.state_dict())}
        return {"args": dict(self._args), "attributes": {}, "grass": grass}

    def _resume(self, state) -> None:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            raise ValueError("the checkpoint holds the state of several GrassCallbacks; use one per Trainer")
        grass = saved.get("grass") if isinstance(saved, dict) else None
        if not grass or grass.get("next_step") != state.global_step:
            raise ValueError(f"resuming at step {state.global_step}, but the checkpoint has no GrassCallback state "
                             f"for that step (it was saved without the callback); resume from a checkpoint saved "
                             f"with GrassCallback, or start a new run")
        self.runner.load_state_dict(_from_json(grass["runner"]))


# ------------------------------------------------------------------------------------ multi-process Trainer


def _trainer_distributed(args) -> Distributed:
    """The Trainer's process group (accelerate initialised it) as a
    :class:`~grass_ft.parallel.distributed.Distributed`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return Distributed()
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=getattr(args, "local_process_index", 0), group_device=args.device)


# What the mixin was tested with (tests/test_hf_distributed.py, tests/test_trl_distributed.py); it relies on two
# private hooks whose presence is checked at construction (grass_trainer_unsupported).
TESTED_WITH = "transformers 5.25, accelerate 1.16, trl 1.16"


def grass_trainer_unsupported(trainer_cls: type, accelerator=None) -> str | None:
    """Why :class:`GrassTrainerMixin` cannot work with these transformers/accelerate versions (None: it can). The
    mixin overrides the Trainer's private ``_wrap_model`` and the accelerator's ``prepare_model(...,
    evaluation_mode=...)``; either missing or renamed in another release means the model would be DDP-wrapped."""
    import inspect

    missing = [f"{trainer_cls.__name__}.{m}" for m in ("_wrap_model", "create_scheduler", "training_step")
               if not callable(getattr(trainer_cls, m, None))]
    if accelerator is not None:
        params = inspect.signature(accelerator.prepare_model).parameters
        if "evaluation_mode" not in params:
            missing.append("Accelerator.prepare_model(evaluation_mode=...)")
    if not missing:
        return None
    import accelerate
    import transformers

    return (f"GrassTrainerMixin needs {', '.join(missing)}, which transformers {transformers.__version__} / accelerate "
            f"{accelerate.__version__} do not have (tested with {TESTED_WITH})")


class GrassTrainerMixin:
    """What :class:`GrassTrainer` adds to ``transformers.Trainer``, for any Trainer subclass -- TRL's
    ``SFTTrainer`` among them: ``class GrassSFTTrainer(GrassTrainerMixin, SFTTrainer)``, or
    :func:`grass_trainer` ``(SFTTrainer)``. In one process it changes nothing.

    The plain Trainer wraps the model in ``DistributedDataParallel``, which expects a gradient for every parameter
    at every step -- exactly what layer sampling breaks -- unless ``find_unused_parameters=True``, which walks the
    autograd graph every step and still all-reduces every bucket, the frozen blocks' zeros included. This mixin
    leaves the model unwrapped and, after the last micro-batch's backward and before clipping, averages the
    gradients of the parameters that train this step with :mod:`grass_ft.parallel.distributed`'s bucketed all-reduce
    (the probe averages each parameter's gradient as it reads it): every rank then holds the same gradients, draws the
    same blocks (checked at each draw) and takes the same update. ``callbacks`` must hold one GrassCallback.

    How DDP is skipped: :meth:`_wrap_model` runs just before the Trainer's ``accelerator.prepare(model, optimizer)``
    and has this Trainer's accelerator prepare models in ``evaluation_mode`` until :meth:`create_scheduler`, which
    runs just after; ``evaluation_mode`` skips only the DDP/FSDP wrapping, so device placement and mixed-precision
    autocast still happen. A model that ends up wrapped anyway (another accelerate) is refused at the first step.
    Both hooks are private to transformers/accelerate: their presence is checked here, with one line naming the
    tested versions when they are gone (:data:`TESTED_WITH`).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        why = grass_trainer_unsupported(type(self), getattr(self, "accelerator", None))
        if why:
            raise RuntimeError(why)
        grass = [c for c in self.callback_handler.callbacks if isinstance(c, GrassCallback)]
        if len(grass) != 1:
            raise ValueError(f"{type(self).__name__} needs exactly one GrassCallback in callbacks, got {len(grass)}")
        self.grass = grass[0]
        self.grass._without_ddp = True

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader=None) -> nn.Module:
        model = super()._wrap_model(model, training, dataloader)
        if training and self.args.world_size > 1 and "prepare_model" not in vars(self.accelerator):
            prepare_model = self.accelerator.prepare_model

            def without_ddp(m: nn.Module, device_placement: bool | None = None, evaluation_mode: bool = False):
                return prepare_model(m, device_placement=device_placement, evaluation_mode=True)

            self.accelerator.prepare_model = without_ddp  # this instance only, until create_scheduler
        return model

    def create_scheduler(self, *args: Any, **kwargs: Any):
        vars(self.accelerator).pop("prepare_model", None)  # the class's prepare_model again
        return super().create_scheduler(*args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None):
        if self.args.world_size > 1 and isinstance(model, nn.parallel.DistributedDataParallel):
            raise RuntimeError(f"{type(self).__name__}: the model was wrapped in DistributedDataParallel despite no "
                               f"parameter requiring grad at prepare time; this accelerate version is not supported "
                               f"(tested with {TESTED_WITH})")
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the step's last micro-batch: the Trainer clips next
            self.grass.sync_gradients()
        return loss


class GrassTrainer(GrassTrainerMixin, Trainer):
    """``transformers.Trainer`` for :class:`GrassCallback` under ``torchrun`` / ``accelerate launch`` with several
    processes (in one process it is the plain Trainer); see :class:`GrassTrainerMixin`."""


def grass_trainer(trainer_cls: type) -> type:
    """``trainer_cls`` (``trl.SFTTrainer``, or any ``transformers.Trainer`` subclass) with :class:`GrassTrainerMixin`
    in front: ``GrassSFTTrainer = grass_trainer(SFTTrainer)``.

    Raises:
        TypeError: ``trainer_cls`` is not a Trainer subclass.
        RuntimeError: these transformers/accelerate versions lack the hooks the mixin needs (one line).
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"grass_trainer takes a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, GrassTrainerMixin):
        return trainer_cls
    why = grass_trainer_unsupported(trainer_cls)
    if why:
        raise RuntimeError(why)
    return type(f"Grass{trainer_cls.__name__}", (GrassTrainerMixin, trainer_cls), {"__module__": __name__})
