"""The native training loop around :class:`grass_ft.step.StepRunner`: load, evaluate, train, save, evaluate.

Output directory contract (other tools rely on it): ``config.yaml`` (resolved), ``metrics.jsonl`` (a line per
logged step), ``layers.jsonl`` (a line per probe/draw/refresh event), ``summary.json`` (final metrics, written
last) and ``final/`` (``save_pretrained`` output with the tokenizer; for lora/dora the peft adapter,
``adapter_model.safetensors``, and with ``merge_lora`` a stand-alone merged model in ``final/merged/``).
``final/`` and ``summary.json`` appear only when a run finishes; each is written to a temporary name and renamed
into place. A directory that holds a previous run is refused unless ``overwrite_output_dir=true`` or ``resume``
continues it, and nothing in it is touched until every check that needs no model weights has passed
(:mod:`grass_ft.preflight`; docs/RELIABILITY.md).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import resource
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import data as data_mod
from ..base.atomic import atomic_dir, remove_dir, remove_stale_temporaries, write_json_atomic
from .checkpoint import (CHECKPOINT_RE, gather_rng_states, load_checkpoint, load_sharded_checkpoint, run_keys,
                         save_checkpoint, save_sharded_checkpoint, set_rng_state, truncate_jsonl)
from ..model.export import write_loadable
from .logging_sinks import MetricSinks
from ..parallel.distributed import Distributed, init_distributed
from ..config import ConfigError, TrainConfig, save_config, validate
from .divergence import DivergenceWatch, vocab_size
from ..base.errors import DivergenceError, UserError
from ..method.loss import enable_supervised_loss, full_loss, loss_forward
from ..method.methods import Prepared, method_names, prepare, resolved_offload, step_budget
from ..model.load import PACKAGED_NOTE, block_layout, enable_checkpointing, load_model, load_tokenizer
from .preflight import FINISHED, PLOT_FILES, RUN_FILES, RunError, check_token_ids, preflight, supervised_features
from ..base.registry import traits
from ..planner.resolve import choice_line, write_record
from .early_stopping import BestTracker, eval_record, metric_value
from ..method.step import StepRunner, lr_factor, optimizer_state_bytes



# ------------------------------------------------------------------------------------------------- helpers


def warn(message: str) -> None:
    """One warning line on stderr (above any progress bar)."""
    tqdm.write(f"grass-ft: warning: {message}", file=sys.stderr)


LOCK_NAME = ".grass-ft.lock"


@contextmanager
def output_dir_lock(out: Path):
    """Hold ``out`` for this run: a second run on the same directory (concurrent, on this host or over a shared
    filesystem with POSIX locks) is refused before it removes or writes anything.

    An exclusive ``flock`` on ``out/.grass-ft.lock``, which the kernel releases when the process ends, however it
    ends (a killed run leaves no stale lock: its file is taken over). The file is removed when the run ends; a
    lock taken on a file another run removed meanwhile is retried on the new one.
    """
    path = out / LOCK_NAME
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunError(f"`output_dir` {str(out)!r} is in use by another run ({holder}); wait for it to end or "
                           f"choose another output_dir") from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the run that held it removed the file between our open and our lock: lock the new one
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still holding the lock, so nobody has taken this file meanwhile
        f.close()  # releases the lock


def prepare_output_dir(path: str | Path, resuming: bool = False,
                       held: ExitStack | None = None, decide=None) -> Path:
    """Create ``path`` (after :func:`~grass_ft.preflight.preflight` allowed it) and clear what this run replaces.

    With ``held``, the directory is locked for the run (:func:`output_dir_lock`, released when ``held`` closes)
    before anything in it is removed, and ``decide()`` runs under the lock: the checks made before it (without the
    lock) may be stale, since another run may have finished there meanwhile (issue 28: the second run deleted the
    first's finished run). A directory this run created is removed again if the run leaves it empty.

    Removes the hidden temporaries a killed write left, then a previous run's outputs: all of them for a new
    run (the checks allowed that only for an empty directory or with ``overwrite_output_dir``); for a resumed
    run only ``final/``, ``summary.json`` and the evaluation files, so that a run that fails never looks finished.
    """
    out = Path(path)
    if held is not None and not out.exists():
        held.callback(_remove_if_empty, out)  # runs after the lock is released (an ExitStack unwinds in reverse)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"`output_dir` {str(out)!r} is not writable: {e.strerror}") from None
    if held is not None:
        held.enter_context(output_dir_lock(out))
    if decide is not None:
        decide()
    removed = remove_stale_temporaries(out)
    if removed:
        warn(f"removed {len(removed)} unfinished temporary file(s) a killed run left in {out}: {', '.join(removed)}")
    replaced = [*FINISHED, "eval.json", "predictions.jsonl"] if resuming else list(RUN_FILES)
    stale = [out / n for n in replaced]
    if not resuming:
        stale += [p for p in out.iterdir() if CHECKPOINT_RE.match(p.name)]
    if not resuming and any(p.exists() for p in stale):
        warn(f"overwrite_output_dir: replacing the previous run in {out} "
             f"({', '.join(p.name for p in stale if p.exists())})")
    if not resuming:
        stale += [out / n for n in PLOT_FILES]  # a new run's plots replace the old run's (or are left out, as it is)
    for path_ in stale:
        if path_.is_dir():
            remove_dir(path_)
        elif path_.exists():
            path_.unlink()
    return out


def _remove_if_empty(out: Path) -> None:
    """Remove ``out`` if nothing is in it (a run that failed before writing anything leaves no directory)."""
    try:
        out.rmdir()
    except OSError:
        pass  # not empty (the run wrote something, or another run did): kept


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory (``torch.cuda.max_memory_allocated`` since its last reset) or, on CPU, the process's
    peak RSS (which cannot be reset: it includes loading the model)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def save_final(model, tokenizer, out: Path, save_dtype: str = "auto") -> Path:
    """``save_pretrained`` into a temporary directory, then rename it to ``final/``; the weights in the training
    dtype, or cast to ``save_dtype`` (a copy: the model itself keeps its dtype for the evaluation after)."""
    with atomic_dir(out / "final") as tmp:
        # A peft adapter (lora/dora) saves only its adapter weights: the vocabulary is never resized, and "auto"
        # would look base_model_name_or_path up on the hub, which a packaged name such as smollm2-135m is not.
        extra = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
        cast = None if save_dtype == "auto" or hasattr(model, "peft_config") else getattr(torch, save_dtype)
        if cast is not None and cast != next(model.parameters()).dtype:
            extra["state_dict"] = {k: v.to(cast) for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, safe_serialization=True, **extra)
        if "state_dict" in extra:  # config.json names the dtype of the files, not the model's in memory
            cfg_file = tmp / "config.json"
            raw = json.loads(cfg_file.read_text())
            raw["dtype"] = save_dtype
            cfg_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        write_loadable(model, tokenizer, tmp)  # tokenizer, and the generation config a peft adapter lacks
    return out / "final"


def _finished_look(cfg: TrainConfig, out: Path, final: Path, record: dict[str, Any], summary: dict[str, Any]) -> None:
    """What makes the output directory look finished before summary.json: final/README.md (the model card) and the
    plots of the run (a plot that fails is a warning, never a lost run)."""
    from .modelcard import write_model_card
    from .report import plot_run

    write_model_card(final, record, summary)
    try:
        summary["plots"] = [p.name for p in plot_run(out)]
    except Exception as e:  # noqa: BLE001 - matplotlib raises many types; the trained model matters more
        summary["plots"] = []
        warn(f"the plots were not drawn ({type(e).__name__}: {e}); `grass-ft plot {out}` draws them")


def evaluate_model(model, tokenizer, examples: list[dict], cfg: TrainConfig, desc: str) -> dict[str, Any]:
    """Held-out eval loss (overall and per task) and accuracy through :func:`grass_ft.evaluate.evaluate`, the
    entry point ``grass-ft eval`` uses too; tasks in ``eval_loss_only_tasks`` get an eval loss only."""
    from transformers.utils import logging as hf_logging

    from ..evaluation.evaluate import evaluate

    res = evaluate(model, tokenizer, examples, task=cfg.task, loss_only=cfg.eval_loss_only_tasks,
                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, max_seq_len=cfg.max_seq_len,
                   progress=hf_logging.is_progress_bar_enabled())  # off under --quiet, as transformers' own bars
    return {**res, "label": desc} if res else {}


def validate_for_model(cfg: TrainConfig, model) -> None:
    """Checks that need the model: γ against the number of decoder blocks."""
    if traits(cfg.method).sampling:
        layout = block_layout(model, cfg.layers_attribute)
        errors = validate(cfg, num_blocks=layout.num_blocks, known_methods=method_names())
        if errors:
            raise ConfigError(errors)


# ---------------------------------------------------------------------------------------------- the loop


def run_train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` with ``cfg.method`` and write the output directory; returns the summary.

    Under torchrun / accelerate launch every rank runs this; rank 0 alone writes files and evaluates.
    """
    dist = init_distributed()
    stage = RunStage()
    try:
        with ExitStack() as held:  # the output directory's lock, for as long as the run lasts
            return _run_train(cfg, progress, dist, held, stage)
    except torch.OutOfMemoryError as e:
        raise RunError(out_of_memory_message(cfg, e)) from None
    except DivergenceError as e:
        raise DivergenceError(f"{e}; {_kept_checkpoint(cfg)}") from None
    except KeyboardInterrupt as e:
        e.run_stage = stage  # what the interrupted run had done: the CLI's message names what works from there
        raise
    finally:
        dist.close()


@dataclass
class RunStage:
    """How far a run got, for the message of an interruption: whether it had claimed its output directory (before
    that, nothing in it was touched)."""
    claimed: bool = False


def _kept_checkpoint(cfg: TrainConfig) -> str:
    """What a diverged run leaves to go back to: its newest checkpoint (every checkpoint holds finite weights)."""
    newest = _newest_checkpoint(Path(cfg.output_dir))
    if newest is None:
        return "no checkpoint was written before it (save_steps=N keeps one to go back to)"
    return (f"the checkpoints from before it went bad are kept, the newest {newest} (a resume must keep lr, so a "
            f"lower lr starts a new run: another output_dir, or overwrite_output_dir=true)")


def _newest_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``resume=auto`` would take in ``out`` (None: none, or every one damaged)."""
    from .checkpoint import find_checkpoint

    try:
        return find_checkpoint(out, "auto")
    except UserError:
        return None


def interrupted_state(cfg: TrainConfig, stage: RunStage | None, command: list[str]) -> str:
    """The half of an interruption's line that says what is on disk and the command that works from there.

    Args:
        cfg: the interrupted run's configuration.
        stage: how far it got (None: unknown, read from the disk alone).
        command: the ``grass-ft train`` command line that was interrupted.
    """
    import shlex

    out = Path(cfg.output_dir)
    again = shlex.join([a for a in command if a.split("=")[0] not in ("resume", "resume_from_checkpoint")]
                       + ["resume=auto"])
    if stage is not None and not stage.claimed:
        return f"nothing in {out} was touched; `{shlex.join(command)}` starts the run"
    if (out / "final").is_dir() and not (out / "summary.json").exists():
        if cfg.eval_samples == 0:
            return f"training finished: {out / 'final'} holds the trained model (summary.json was not written)"
        overwrite = " overwrite_output_dir=true" if (out / "eval.json").exists() else ""
        return (f"training finished and {out / 'final'} holds the trained model, but the evaluation after it was "
                f"cut short (no summary.json): `grass-ft eval model={shlex.quote(str(out / 'final'))} "
                f"output_dir={shlex.quote(str(out))}{overwrite}` evaluates it on the run's held-out examples")
    newest = _newest_checkpoint(out)
    if newest is not None:
        return f"the newest checkpoint, {newest}, is intact: `{again}` continues from it"
    return f"no checkpoint was written (save_steps=N writes them); `{again}` starts the run again"


def sweep_outlasts_run(cfg: TrainConfig, sampler, n_steps: int) -> str | None:
    """A warning when a training probe's sweep (every block once, gamma at a time, probe_steps steps each) lasts
    the whole run, so that a method that measures importance never draws by it; None otherwise."""
    if sampler is None or not traits(cfg.method).measures or sampler.sweep_steps < n_steps:
        return None
    return (f"probe_mode=train: the sweep over {sampler.num_blocks} blocks, gamma={cfg.gamma} at a time and "
            f"probe_steps={cfg.probe_steps} steps each, takes {sampler.sweep_steps} steps, the whole run of "
            f"{n_steps}: method={cfg.method} will never draw by importance. Raise max_steps or gamma, lower "
            f"probe_steps, or set probe_mode=measure")


def out_of_memory_message(cfg: TrainConfig, error: BaseException) -> str:
    """The one line for a device that ran out of memory: what ran out, that nothing looks finished, and the keys
    that need less memory -- first, for a method that keeps all its optimizer state on the device (the default
    `fft` among them), the offloaded layer-wise method."""
    said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    fitting = _fitting_settings(cfg)
    if fitting:
        return (f"out of device memory with method={cfg.method} ({said}); the run is not finished (no final/, "
                f"checkpoints already written are intact). Settings the planner expects to fit this device: "
                f"{'; '.join(fitting)} (grass-ft plan lists them all)")
    lower = "lower batch_size (with grad_accum to keep the batch) or max_seq_len, or set gradient_checkpointing=true"
    if traits(cfg.method).sampling:
        offload = "" if resolved_offload(cfg) else "set offload=true, "
        fix = f"lower gamma (now {cfg.gamma}), {offload}or {lower}"
    elif cfg.method == "fft":
        fix = (f"method=grass-uniform trains gamma blocks at a time with their optimizer state on the host "
               f"(far below fft's peak: docs/gpu_memory.md), or {lower}")
    else:
        fix = lower[0].upper() + lower[1:]
    return (f"out of device memory with method={cfg.method} ({said}); the run is not finished (no final/, "
            f"checkpoints already written are intact). To fit: {fix}")


def _fitting_settings(cfg: TrainConfig, most: int = 4) -> list[str]:
    """The best fitting setting of each family, in the planner's order of preference, for this GPU's total memory
    (empty on a CPU, or when the planner cannot price the model)."""
    if not torch.cuda.is_available():
        return []
    from dataclasses import replace

    from ..planner import detect_budgets
    from ..planner.sizes import format_size
    from ..planner.table import build_plan

    try:
        total = format_size(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
        auto = replace(cfg, method="auto", gamma="auto", offload=None)
        plan = build_plan(auto, detect_budgets(total, cfg.host_memory, "cuda"), margin=cfg.memory_margin)
    except Exception:  # noqa: BLE001 - the advice must never hide the out-of-memory error itself
        return []
    out = []
    for family in ("fft", "fft-offload", "layer-wise", "layer-wise host-lean", "paper layout", "lora"):
        rows = [r for r in plan.rows if r.family == family and r.fits and not r.lisa_long_run]
        if rows:
            best = max(rows, key=lambda r: (r.setting.gamma or 0, r.setting.lora_r or 0))
            out.append(" ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                for k, v in best.setting.overrides().items()))
    return out[:most]


def _run_train(cfg: TrainConfig, progress: bool, dist: Distributed, held: ExitStack,
               stage: RunStage) -> dict[str, Any]:
    """The recipe: every check that needs no weights, then the output directory, the model, the method, a resume,
    the loop, and the finished run's files. Each step is a helper below; only the loop carries state."""
    _check_fsdp(cfg, dist)
    inputs = _check_and_tokenize(cfg, dist)
    cfg = _resolve_recipe(cfg, dist, inputs)  # dtype=auto, epochs -> max_steps: before the plan, which prices them
    cfg, choice = _resolve_auto(cfg, dist)  # after the checks that need no weights: bad input fails first
    out = _claim_output_dir(cfg, dist, held, inputs.checkpoint)
    stage.claimed = True
    if choice is not None and dist.is_main:
        write_record(out, choice)
    model, device = _load_model(cfg, dist)
    # batch_size is per process: each step takes batch_size x world_size examples (packed rows), each rank its share
    stream = data_mod.BatchStream(inputs.features, cfg.batch_size * dist.world_size, inputs.tokenizer.pad_token_id,
                                  seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    # the model as loaded is evaluated before the method touches it (a resumed run reuses its checkpoint's figure)
    before: dict[str, Any] = {}
    if inputs.checkpoint is None:
        if inputs.held_ex and dist.is_main and cfg.eval_before:
            before = evaluate_model(model, inputs.tokenizer, inputs.held_ex, cfg, "before")
        dist.barrier()
    run = _set_up_method(cfg, model, dist)
    cfg = dataclasses.replace(cfg, warmup_steps=run.warmup_steps)  # warmup_ratio resolved against the updates
    run.record = _resolved_record(cfg, dist, out, inputs, run, choice)
    if inputs.checkpoint is not None:  # the keys resolved just now, against what the checkpoint's run resolved
        from .checkpoint import check_same_run, checkpoint_run

        recorded = checkpoint_run(inputs.checkpoint)
        now = {k: v for k, v in run_keys(run.record, dist.world_size).items()
               if recorded is None or recorded.get(k) is not None}  # a checkpoint from before issue 31 holds nulls
        check_same_run(inputs.checkpoint, recorded, now)
    if choice is not None and dist.is_main:  # logged as training starts: a failure before it stays one line
        tqdm.write(f"grass-ft: {choice_line(choice)}", file=sys.stderr)
    if dist.is_main:
        save_config(run.record, out / "config.yaml")
    totals = _Totals()
    best = BestTracker(cfg)
    if inputs.checkpoint is not None:
        totals, before = _resume(cfg, inputs.checkpoint, run, stream, out, dist.is_main, best)
    loop = _train_loop(cfg, dist, out, run, stream, inputs, totals, before, device, progress,
                       appending=inputs.checkpoint is not None, choice=choice, best=best)
    return _finish(cfg, dist, out, run, inputs, before, totals, loop, device, choice, best)


def _resolve_recipe(cfg: TrainConfig, dist: Distributed, inputs: _Inputs) -> TrainConfig:
    """``dtype=auto`` (rank 0's device decides for every rank), ``max_steps`` from ``num_train_epochs``, and the
    warnings a user of the Trainer would want: a run that sees less than one epoch of their data, two warm-ups."""
    from .resolve import both_warmups_warning, resolve_dtype, resolve_steps, short_run_warning

    dtype = dist.from_main(resolve_dtype(cfg.dtype, dist.device()) if dist.is_main else None)
    cfg = resolve_steps(dataclasses.replace(cfg, dtype=dtype), len(inputs.features), dist.world_size)
    if dist.is_main:
        from_file = data_mod.source_kind(cfg.data) != "generator"
        for line in (short_run_warning(cfg, len(inputs.features), dist.world_size, from_file),
                     both_warmups_warning(cfg)):
            if line:
                warn(line)
    return cfg


def _resolved_record(cfg: TrainConfig, dist: Distributed, out: Path, inputs: _Inputs, run: _Method,
                     choice: dict[str, Any] | None) -> dict[str, Any]:
    """config.yaml: every key as this run used it (grass_ft.recipe.filled)."""
    from .resolve import filled, machine_budgets

    base = getattr(run.prepared.model, "get_base_model", lambda: run.prepared.model)()
    layout = run.prepared.layout.prefix if run.prepared.layout is not None else None
    if layout is None:
        try:
            layout = block_layout(base, cfg.layers_attribute).prefix
        except UserError:
            layout = None
    budgets = None
    if choice is None:
        budgets = machine_budgets(dist.device().type) if not (cfg.device_memory and cfg.host_memory) else None
    return filled(cfg, rows=len(inputs.features), world_size=dist.world_size, out=out, layers_attribute=layout,
                  attn_implementation=getattr(base.config, "_attn_implementation", None),
                  chat_template=getattr(inputs.tokenizer, "chat_template", None), budgets=budgets or
                  (cfg.device_memory or "none", cfg.host_memory or "none"))


def _resolve_auto(cfg: TrainConfig, dist: Distributed) -> tuple[TrainConfig, dict[str, Any] | None]:
    """``method=auto`` / ``gamma=auto`` chosen by the planner on rank 0's device (every rank takes rank 0's
    choice, or its one-line refusal), logged as one line; a resumed run keeps the choice it recorded."""
    if not cfg.auto:
        return cfg, None
    from ..planner.resolve import resolve

    verdict: tuple[str, Any] = ("ok", None)
    if dist.is_main:
        try:
            resolved, record = resolve(cfg, dist.device().type, dist.world_size)
            verdict = ("ok", (dataclasses.asdict(resolved), record))
        except UserError as e:
            verdict = ("error", str(e))
    kind, value = dist.from_main(verdict)
    if kind == "error":
        raise RunError(value)
    resolved, record = value
    return TrainConfig(**resolved), record


def _check_fsdp(cfg: TrainConfig, dist: Distributed) -> None:
    """``fsdp`` needs two or more processes and a torch with FSDP2."""
    if not cfg.fsdp:
        return
    from ..parallel.fsdp import fsdp_unavailable

    if not dist.enabled:
        raise ConfigError(["`fsdp` shards over two or more processes (torchrun --nproc_per_node=N ...); this "
                           "run has one: drop fsdp=true"])
    if fsdp_unavailable():
        raise ConfigError([fsdp_unavailable()])


@dataclass
class _Inputs:
    """What the checks before the model found: the checkpoint to resume, the tokenizer, the training features and
    the held-out examples."""
    checkpoint: Path | None
    tokenizer: Any
    features: list
    held_ex: list[dict]


def _check_and_tokenize(cfg: TrainConfig, dist: Distributed) -> _Inputs:
    """Every check that needs no model weights, before anything is written (output_dir, the checkpoint to resume
    from and that it belongs to this run, the data: format, tasks, one batch; the model source), then the
    tokenizer and the tokenisation: answers cut off by max_seq_len fail (all) or are left out with a warning
    (some)."""
    from ..evaluation.evaluate import loss_only_tasks

    pf = preflight(cfg, dist.world_size)  # every rank: on a shared filesystem all reach the same verdict
    loaded = pf.loaded
    loss_only_tasks(cfg.eval_loss_only_tasks, loaded.held, cfg.task)  # a misspelt task fails here, not after
    if dist.is_main:
        for w in pf.warnings:
            warn(w)
    tokenizer = load_tokenizer(cfg.model)
    data_mod.prepare_tokenizer(tokenizer, cfg.chat_template, loaded.first_rows(), cfg.model)
    features = data_mod.tokenize_examples(loaded.train, tokenizer, cfg.max_seq_len, cfg.train_on_inputs)
    check_token_ids(features, cfg)
    features, dropped = supervised_features(features, cfg, dist.world_size)
    if dropped and dist.is_main:
        warn(dropped)
    if cfg.packing:  # TRL's packing: examples into rows of max_seq_len, each kept apart by its position ids
        from .preflight import check_batch

        features = data_mod.pack_features(features, cfg.max_seq_len)
        check_batch(len(features), cfg, dist.world_size, "packed rows of training examples")
    return _Inputs(pf.checkpoint, tokenizer, features, loaded.held)


def _claim_output_dir(cfg: TrainConfig, dist: Distributed, held: ExitStack, checkpoint: Path | None) -> Path:
    """Only once every rank has passed its checks: create the output directory and remove a replaced run's files.
    Rank 0 alone touches the directory; its verdict (e.g. another run holds the directory) stops every rank with
    the same line, instead of leaving the others at a barrier until torchrun kills them."""
    dist.barrier()
    out, refused = Path(cfg.output_dir), None
    if dist.is_main:
        try:
            out = prepare_output_dir(cfg.output_dir, resuming=checkpoint is not None, held=held,
                                     decide=lambda: _decide_under_lock(cfg, dist.world_size, checkpoint))
        except UserError as e:
            refused = e
    message = dist.from_main(str(refused) if refused else None)
    if refused:
        raise refused
    if message:
        raise RunError(message)
    return out


def _refuse_broken_weights(model, what: str, fix: str, error=None) -> None:
    """Weights that hold an inf or NaN before training are broken where they came from; training them would
    only be reported, wrongly, as a divergence ("lower lr")."""
    from .divergence import nonfinite_tensors
    from ..model.load import ModelError

    bad = nonfinite_tensors(model.named_parameters())
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise (error or ModelError)(f"{what} holds weights that are not finite ({bad[0]}{more}): {fix}")


def _decide_under_lock(cfg: TrainConfig, world_size: int, checkpoint: Path | None) -> None:
    """The output directory's checks again, now that this run holds its lock: a run that finished (or wrote a
    checkpoint) there since the checks before tokenising is refused like any other, and nothing is removed."""
    from .preflight import check_output_dir, resolve_resume

    check_output_dir(cfg)
    now = resolve_resume(cfg, world_size, [])
    if now != checkpoint:
        raise RunError(f"`output_dir` {cfg.output_dir!r} changed while this run was starting (another run wrote "
                       f"{now or 'to it'}); nothing was removed: run the command again")


def _check_finite_weights(cfg: TrainConfig, dist: Distributed, run: _Method, step: int) -> None:
    """Every rank: refuse to go on to a checkpoint or final/ from weights holding an inf or NaN. With fsdp each
    rank holds a shard, so the count is summed over ranks (a collective: every rank calls this)."""
    from .divergence import nonfinite_tensors

    params = list(run.model.named_parameters())
    bad = nonfinite_tensors(params)
    n_bad = dist.sum_floats([len(bad)])[0] if cfg.fsdp else len(bad)
    if n_bad:
        first = bad[0] if bad else "on another rank's shard"
        raise DivergenceError(run.watch.weights_message(step, first, int(n_bad), len(params)))


def _load_model(cfg: TrainConfig, dist: Distributed):
    """The model, checked against the config (γ against its blocks), on this rank's device."""
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, cfg.dtype, cfg.attn_implementation)
    validate_for_model(cfg, model)
    _refuse_broken_weights(model, f"model {cfg.model!r}", "the model files are damaged or were saved from a "
                                                          "diverged run (training would report it, wrongly, as a "
                                                          "divergence); use a sound copy")
    device = dist.device()
    model.to(device)
    if cfg.packing:
        from ..data.packing import check_packing

        check_packing(model, cfg)  # one line, before any step, if the attention lets packed examples mix
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model, device


@dataclass
class _Method:
    """The method set up for training: the prepared model/optimizer/sampler, its scheduler and step runner, the
    divergence watch, the loss forward, the step budget and FSDP's reduce-scatter counter."""
    prepared: Prepared
    scheduler: Any
    runner: StepRunner
    watch: DivergenceWatch
    forward: Any
    n_steps: int
    reduce_scatter: Any = None
    warmup_steps: int = 0
    record: dict[str, Any] = field(default_factory=dict)  # config.yaml: every key as the run used it

    @property
    def model(self):
        return self.prepared.model  # lora/dora wrap the model in a peft model: train, save and evaluate that


def _set_up_method(cfg: TrainConfig, model, dist: Distributed) -> _Method:
    """Optimizer over every candidate parameter, sampler, scheduler. With fsdp the model is sharded first (each
    block a unit), so that the optimizer holds, and offloads, this rank's shards only."""
    reduce_scatter = None
    if cfg.fsdp:
        from ..parallel.fsdp import shard_model

        reduce_scatter = shard_model(model, cfg.layers_attribute)
    forward = loss_forward(cfg.supervised_only_loss)
    if cfg.fsdp and cfg.supervised_only_loss:
        # FSDP2 gathers the root's parameters (embeddings, head) in hooks around model(...), which the supervised
        # loss's direct call of the decoder body would bypass: patch the model's forward to compute it instead
        enable_supervised_loss(model)
        forward = full_loss
    prepared: Prepared = prepare(model, cfg)
    n_steps, total_updates = step_budget(cfg, prepared.sampler)  # count_probe_steps decides what max_steps counts
    if dist.is_main and (short := sweep_outlasts_run(cfg, prepared.sampler, n_steps)):
        warn(short)
    from .resolve import resolve_warmup

    warmup = resolve_warmup(cfg, total_updates)  # warmup_steps, or warmup_ratio of the updates
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        prepared.optimizer, lambda k: lr_factor(k, warmup, total_updates, cfg.lr_schedule))
    scaler = None
    if cfg.dtype == "float16":  # dynamic loss scaling into the fp32 masters (grass_ft.loss_scale)
        from ..method.loss_scale import LossScaler

        scaler = LossScaler()
    runner = StepRunner(prepared, scheduler, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                        max_bad_steps=sys.maxsize, dist=dist, sharded=cfg.fsdp,
                        timed=lambda s: s % cfg.logging_steps == 0 or s == n_steps - 1,  # the logged steps
                        loss_scaler=scaler)
    # the runner would raise before the step is logged; the watch stops the run after it (same max_bad_steps)
    watch = DivergenceWatch(cfg.max_bad_steps, vocab_size(prepared.model), cfg.lr)
    return _Method(prepared, scheduler, runner, watch, forward, n_steps, reduce_scatter, warmup)


@dataclass
class _Totals:
    """The running totals a checkpoint carries: the next step, tokens, seconds, per-step losses."""
    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    bookkeeping_time: float = 0.0
    losses: list[float] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "train_time": self.train_time, "bookkeeping_time": self.bookkeeping_time,
                "losses": self.losses}


def _resume(cfg: TrainConfig, checkpoint: Path, run: _Method, stream, out: Path,
            main: bool, best=None) -> tuple[_Totals, dict[str, Any]]:
    """Weights, optimizer (by name), scheduler, sampler, RNG, data position and running totals from
    ``checkpoint``; the logs are cut back to its step. Returns the totals and the "before" evaluation it recorded."""
    load = load_sharded_checkpoint if cfg.fsdp else load_checkpoint
    trainer_state, extra = load(checkpoint, run.model, run.prepared.optimizer, run.scheduler)
    if not cfg.fsdp:  # (a sharded model's shards are checked at its next checkpoint, by every rank together)
        from .checkpoint import CheckpointError

        _refuse_broken_weights(run.model, f"checkpoint {checkpoint}", "it was written from a broken model (or "
                               "damaged since); resume from an older checkpoint with resume=PATH, or start a new run",
                               CheckpointError)
    run.runner.load_state_dict(extra["runner"])
    if "watch" in extra:
        run.watch.load_state_dict(extra["watch"])
    if best is not None and (note := best.load_state_dict(extra.get("best"), out)) and main:
        warn(note)
    note = set_rng_state(extra["rng"])  # this rank's own
    if note and main:
        warn(note)
    stream.load_state_dict(trainer_state["data"])
    start_step = trainer_state["step"]
    if main:
        for log in ("metrics.jsonl", "layers.jsonl"):
            truncate_jsonl(out / log, start_step)
        tqdm.write(f"resumed from {checkpoint} at step {start_step}")
    return _Totals(step=start_step, **trainer_state["totals"]), trainer_state["before"]


@dataclass
class _LoopResult:
    wall_s: float
    train_peak: int
    probe_peak: int | None
    n_trainable: int  # every parameter
    n_step_trainable: int  # those one (non-probe) step trains
    stopped_early: bool = False


def _train_loop(cfg: TrainConfig, dist: Distributed, out: Path, run: _Method, stream, inputs: _Inputs,
                totals: _Totals, before: dict[str, Any], device: torch.device, progress: bool, appending: bool,
                choice: dict[str, Any] | None = None, best=None) -> _LoopResult:
    """The steps from ``totals.step`` to the budget: train, log, evaluate every ``eval_steps``, checkpoint.
    ``totals`` is updated in place; a diverged run stops after its last step is logged, an early-stopped one after
    the evaluation that ran out of patience."""
    tokenizer = inputs.tokenizer
    main, model = dist.is_main, run.model
    n_trainable = sum(p.numel() for p in model.parameters())
    n_step_trainable = _trainable_count(run.prepared)  # now: saving sets requires_grad on everything
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mode = "a" if appending else "w"
    metrics_f = open(out / "metrics.jsonl" if main else os.devnull, mode, buffering=1)
    # rank 0 alone writes the trace; GRASS_FT_TRACE_ALL_RANKS=1 (a debugging aid, used by the tests) has every
    # other rank write its own to layers.rank<r>.jsonl so traces can be compared
    trace_all = os.environ.get("GRASS_FT_TRACE_ALL_RANKS") == "1"
    layers_path = out / "layers.jsonl" if main else (out / f"layers.rank{dist.rank}.jsonl" if trace_all else None)
    layers_f = open(layers_path or os.devnull, mode, buffering=1)
    sinks = MetricSinks(cfg.report_to, out, run.record, enabled=main, resume_step=totals.step,  # report_to
                        run_name=run.record.get("run_name"))
    t_start = time.perf_counter()
    if device.type == "cuda":
        # the summary's peak is the training steps' own, not loading's or the "before" evaluation's
        torch.cuda.reset_peak_memory_stats(device)
    probe_peak = None
    n_steps = run.n_steps
    stopped_early = False
    bar = tqdm(range(totals.step, n_steps), desc=f"{cfg.method}", disable=not (progress and main),
               dynamic_ncols=True, initial=totals.step, total=n_steps)
    try:
        for step in bar:
            batches = [{k: v.to(device) for k, v in stream.next_batch().items()} for _ in range(cfg.grad_accum)]
            if run.reduce_scatter is not None:
                run.reduce_scatter.bytes = 0
            res = run.runner.train_step(step, batches, forward=run.forward)
            if res.probe and not run.runner.is_probe(step + 1):  # GRASS's probe is over: its peak apart
                probe_peak = peak_memory_bytes(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
            for ev in res.events:
                layers_f.write(json.dumps(ev) + "\n")
            totals.step = step + 1
            totals.tokens += res.tokens  # all ranks' tokens of this step
            totals.train_time += res.wall_s
            totals.bookkeeping_time += res.bookkeeping_s
            totals.losses.append(res.loss)
            tps = res.tokens / res.seconds if res.seconds > 0 else 0.0
            if choice is not None and main and step == totals.step - 1 and "measured_peak_bytes" not in choice:
                _log_peak_against_plan(choice, device)
            record = None
            if step % cfg.logging_steps == 0 or step == n_steps - 1:
                record = _step_record(step, res, run, dist, device, param_bytes, tps)
                metrics_f.write(json.dumps(record) + "\n")
            sinks.log_step(record, res.events, step)
            # a float16 overflow is routine while the loss scale settles; it counts as bad only below a scale of 1
            bad = res.skipped and not (res.overflow and (res.loss_scale or 0) >= 1)
            run.watch.observe(step, res.loss, res.grad_norm, res.probe, bad)
            if cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and step + 1 < n_steps:
                stopped_early = _evaluate_during(cfg, dist, out, run, inputs, best, step, metrics_f, sinks)
            if cfg.save_steps and (step + 1) % cfg.save_steps == 0:
                rng = gather_rng_states() if step + 1 < n_steps else None  # every rank's: all ranks call it
                if step + 1 < n_steps and _sound_to_save(cfg, dist, run, step):
                    if main or cfg.fsdp:
                        _save_checkpoint(cfg, dist, out, run, stream, tokenizer, totals, before, rng, best)
                dist.barrier()  # no rank runs ahead of a checkpoint it may be killed and resumed from
            if stopped_early:
                if main:
                    warn(f"early stopping after step {step + 1}: {best.metric} did not improve on {best.value:.4f} "
                         f"(step {best.step}) for {best.bad_evals} evaluations (early_stopping_patience="
                         f"{cfg.early_stopping_patience})")
                break
            bar.set_postfix_str(f"loss {res.loss:.3f} | {'probe' if res.probe else 'blocks ' + _fmt_blocks(res.active)}"
                                f" | {tps:.0f} tok/s")
    finally:
        bar.close()
        metrics_f.close()
        layers_f.close()
        sinks.close()
    wall_s = time.perf_counter() - t_start
    train_peak = peak_memory_bytes(device)  # before saving and the "after" evaluation (generation)
    _check_finite_weights(cfg, dist, run, totals.step - 1)  # nor saved as final/ (the weights' own line first)
    run.watch.check_end()
    return _LoopResult(wall_s, train_peak, probe_peak, n_trainable, n_step_trainable, stopped_early)


def _evaluate_during(cfg: TrainConfig, dist: Distributed, out: Path, run: _Method, inputs: _Inputs, best, step: int,
                     metrics_f, sinks: MetricSinks) -> bool:
    """The held-out evaluation after ``step + 1`` steps (rank 0; the others wait): a metrics.jsonl line and the
    loggers' ``eval/*``, the best weights kept when asked. Returns whether early stopping ends the run (every rank
    gets rank 0's verdict). The random state is left as it was, so the draws and the data order do not depend on
    whether the run evaluates (tested)."""
    stop = None
    if dist.is_main:
        t0 = time.perf_counter()
        devices = [next(run.model.parameters()).device] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            result = evaluate_model(run.model, inputs.tokenizer, inputs.held_ex, cfg, f"step {step + 1}")
        record = eval_record(step, result, time.perf_counter() - t0)
        if best.observe(step + 1, result) and best.keep:
            best.save_weights(out, run.model, step + 1)
        record.update(best_metric=best.value, best_step=best.step)
        metrics_f.write(json.dumps(record) + "\n")
        sinks.log_eval(record, step)
        stop = best.should_stop
    stopped = bool(dist.from_main(stop))
    dist.barrier()
    return stopped


def _log_peak_against_plan(choice: dict[str, Any], device: torch.device) -> None:
    """After the first step of this process: the real peak beside the planner's prediction (summary.json keeps
    both)."""
    from ..planner.resolve import peak_line

    choice["measured_peak_bytes"] = peak_memory_bytes(device)
    line, off = peak_line(choice, choice["measured_peak_bytes"], device.type)
    (warn if off else lambda m: tqdm.write(f"grass-ft: {m}", file=sys.stderr))(line)


def _sound_to_save(cfg: TrainConfig, dist: Distributed, run: _Method, step: int) -> bool:
    """Whether the checkpoint due after ``step`` may be written (every rank decides the same). Weights holding an
    inf or NaN stop the run here; a run in a streak of bad steps skips the checkpoint with a warning, since it
    would prune the checkpoints from before the run went bad, the ones worth going back to."""
    _check_finite_weights(cfg, dist, run, step)
    if run.watch.last is None:
        return True
    if dist.is_main and step + 1 - run.watch.streak_start <= cfg.save_steps:  # once per streak
        warn(f"no checkpoint is written while steps are bad (since step {run.watch.streak_start}); the "
             f"checkpoints from before are kept")
    return False


def _step_record(step: int, res, run: _Method, dist: Distributed, device: torch.device, param_bytes: int,
                 tps: float) -> dict[str, Any]:
    """One line of metrics.jsonl."""
    state = optimizer_state_bytes(run.prepared.optimizer)
    return {
        "step": step, "loss": res.loss, "lr": run.scheduler.get_last_lr()[0], "grad_norm": res.grad_norm,
        "tokens_per_s": tps, "s_per_step": res.seconds, "probe": res.probe, "skipped": res.skipped,
        "active": res.active, "bookkeeping_s": res.bookkeeping_s,
        "optimizer_state_device_bytes": state["device"], "optimizer_state_host_bytes": state["host"],
        "peak_memory_bytes": peak_memory_bytes(device), "allreduce_bytes": dist.allreduce_bytes,
        "allreduce_fraction_of_fft": dist.allreduce_bytes / param_bytes,
        **({"reduce_scatter_bytes": run.reduce_scatter.bytes} if run.reduce_scatter is not None else {}),
        **({"loss_scale": res.loss_scale, "overflow": res.overflow} if res.loss_scale is not None else {})}


def _save_checkpoint(cfg: TrainConfig, dist: Distributed, out: Path, run: _Method, stream, tokenizer,
                     totals: _Totals, before: dict[str, Any], rng: dict[str, Any], best=None) -> None:
    """checkpoint-<step>: what :func:`_resume` needs to continue bit for bit (``rng``: every rank's random state,
    :func:`~grass_ft.checkpoint.gather_rng_states`)."""
    extra = {"runner": run.runner.state_dict(), "rng": rng, "watch": run.watch.state_dict(),
             **({"best": best.state_dict()} if best is not None else {})}
    trainer_state = {"data": stream.state_dict(), "totals": totals.state(),
                     "before": {k: v for k, v in before.items() if k != "predictions"},
                     "run": run_keys(run.record, dist.world_size)}
    with _writing(out / f"checkpoint-{totals.step}"):
        if cfg.fsdp:  # every rank writes its shards (no loadable copy: that would gather the model)
            save_sharded_checkpoint(out, totals.step, run.model, run.prepared.optimizer, run.scheduler, extra,
                                    trainer_state, cfg.save_total_limit, dist.is_main)
        else:
            save_checkpoint(out, totals.step, run.model, run.prepared.optimizer, run.scheduler, extra,
                            trainer_state, cfg.save_total_limit, tokenizer=tokenizer)


def _gathered_model(cfg: TrainConfig, dist: Distributed, model, device: torch.device):
    """The trained model, every parameter requiring grad again (as saved). A sharded model is gathered, on the
    CPU of rank 0, into a plain copy of the model that stays there (every rank takes part in the gather): final/
    is saved from the host, and no full copy lands beside the shards on rank 0's GPU (issue 29)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if not cfg.fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_main:
        model = load_model(cfg.model, cfg.dtype)
        model.load_state_dict(full)
    return model


def _finish(cfg: TrainConfig, dist: Distributed, out: Path, run: _Method, inputs: _Inputs, before: dict[str, Any],
            totals: _Totals, loop: _LoopResult, device: torch.device,
            choice: dict[str, Any] | None = None, best: BestTracker | None = None) -> dict[str, Any]:
    """Save the trained model (the best evaluation's weights with load_best_model_at_end), evaluate it, merge a
    LoRA adapter if asked, write the model card and the plots, and summary.json last (rank 0; the other ranks wait
    at the final barrier)."""
    model = _gathered_model(cfg, dist, run.model, device)
    if not dist.is_main:
        dist.barrier()  # rank 0 saves and evaluates
        return {"rank": dist.rank, "world_size": dist.world_size}
    after, from_best = None, False
    if best is not None and best.keep and best.step is not None and inputs.held_ex:
        # the last step's weights are evaluated like every other evaluation; the better of the two goes to final/
        last = evaluate_model(model, inputs.tokenizer, inputs.held_ex, cfg, "after")
        if best.better(metric_value(last, best.metric)):
            after = last
        else:
            best.load_weights(out, model)
            after, from_best = {**best.result, "label": "after"}, True
            tqdm.write(f"grass-ft: final/ holds the best evaluation's weights, step {best.step} ({best.metric} "
                       f"{best.value:.4f}), not the last step's", file=sys.stderr)
    with _writing(out / "final"):
        final = save_final(model, inputs.tokenizer, out, cfg.save_dtype)
    if cfg.fsdp and inputs.held_ex:
        model.to(device)  # final/ is saved from the host copy; only the evaluation needs the weights on the device
    if after is None:
        after = evaluate_model(model, inputs.tokenizer, inputs.held_ex, cfg, "after") if inputs.held_ex else {}
    if after:
        from ..evaluation.evaluate import write_eval

        write_eval(out, after)
    merged = None
    if cfg.merge_lora and cfg.method in ("lora", "dora"):
        from ..method.lora import save_merged

        merged = save_merged(model, inputs.tokenizer, final)  # in place, after the last use of the adapter model
    summary = _summary(cfg, dist, run, inputs, before, after, totals, loop, final, merged)
    summary.update(best_step=best.step if best is not None else None, final_from_best=from_best)
    if choice is not None:
        summary["auto"] = {k: v for k, v in choice.items() if k != "predicted_parts_bytes"}
    _finished_look(cfg, out, final, run.record, summary)
    if (out / "best").is_dir():
        remove_dir(out / "best")  # final/ holds what it kept (or the better last step): no second copy stays
    write_json_atomic(out / "summary.json", summary)
    dist.barrier()
    return summary


def _summary(cfg: TrainConfig, dist: Distributed, run: _Method, inputs: _Inputs, before: dict[str, Any],
             after: dict[str, Any], totals: _Totals, loop: _LoopResult, final: Path,
             merged: Path | None) -> dict[str, Any]:
    """summary.json's contents."""
    state = optimizer_state_bytes(run.prepared.optimizer)
    # the last 10 steps' losses, the non-finite (skipped) ones left out: never a figure from further back
    tail = [x for x in totals.losses[-10:] if math.isfinite(x)]
    train_time = totals.train_time
    return {
        "method": cfg.method, "model": cfg.model, "model_note": PACKAGED_NOTE.get(cfg.model, ""),
        "data": cfg.data, "task": cfg.task, "steps": totals.step, "max_steps": cfg.max_steps,
        "stopped_early": loop.stopped_early, "dtype": cfg.dtype,
        "seed": cfg.seed, "world_size": dist.world_size,
        "eval_n": len(inputs.held_ex), "train_rows": len(inputs.features), "packing": cfg.packing,
        "eval_loss_before": before.get("eval_loss"), "eval_loss": after.get("eval_loss"),
        "accuracy_before": before.get("accuracy"), "accuracy": after.get("accuracy"),
        "eval_loss_per_task_before": before.get("eval_loss_per_task"),
        "eval_loss_per_task": after.get("eval_loss_per_task"),
        "accuracy_per_task_before": {t: d["accuracy"] for t, d in before.get("per_task", {}).items()} or None,
        "accuracy_per_task": {t: d["accuracy"] for t, d in after.get("per_task", {}).items()} or None,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "peak_memory_bytes": loop.train_peak, "probe_peak_memory_bytes": loop.probe_peak,
        "optimizer_state_bytes": state["device"] + state["host"],
        "optimizer_state_device_bytes": state["device"], "optimizer_state_host_bytes": state["host"],
        "optimizer_state_peak_device_bytes": state["peak_device"],
        "trainable_params": loop.n_step_trainable, "total_params": loop.n_trainable,
        "tokens_per_s": totals.tokens / train_time if train_time else 0.0,
        "s_per_step": train_time / max(1, totals.step), "train_wall_s": loop.wall_s,
        "mgn_bookkeeping_fraction": totals.bookkeeping_time / train_time if train_time else 0.0,
        "skipped_steps": run.runner.skipped_steps, "offload": run.prepared.offload, "final_dir": str(final),
        "overflow_steps": run.runner.scaler.overflow_steps if run.runner.scaler is not None else None,
        "loss_scale": run.runner.scaler.scale if run.runner.scaler is not None else None,
        "merged_dir": str(merged) if merged is not None else None,
    }


@contextmanager
def _writing(path: Path):
    """A failed write (disk full, quota, permissions) becomes one line naming the path; nothing half-written
    stays under that name (the atomic helpers see to that)."""
    try:
        yield
    except OSError as e:
        interrupt = _interrupt_behind(e)
        if interrupt is not None:  # Ctrl-C mid-write (issue 28: "Bad file descriptor" from a torn-down file)
            raise interrupt from None
        raise RunError(f"cannot write {path}: {e.strerror or e}; earlier checkpoints are intact") from None


def _interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that an OSError was raised while handling (a second Ctrl-C, or the first one
    tearing down a file being written, turns into e.g. EBADF on close): the run was interrupted, not refused
    by the disk, and the interruption's own message says what is on disk."""
    seen = error.__context__
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return seen
        seen = seen.__context__
    return None


def _trainable_count(prepared: Prepared) -> int:
    """Parameters trainable at one (non-probe) step: drawn blocks plus always-trained ones, or those that
    require grad (all for fft; the adapters for lora/dora)."""
    params = dict(prepared.model.named_parameters())
    if prepared.sampler is None:
        return sum(p.numel() for p in params.values() if p.requires_grad)
    per_block = max(prepared.layout.numel) * prepared.sampler.gamma
    return per_block + sum(params[n].numel() for n in prepared.always)


def _fmt_blocks(active: list[int]) -> str:
    return ",".join(map(str, active)) if active else "all"


def per_task_lines(summary: dict[str, Any], f) -> list[str]:
    """One line per held-out task: its eval loss and accuracy before -> after (only with two or more tasks)."""
    loss, loss0 = summary.get("eval_loss_per_task") or {}, summary.get("eval_loss_per_task_before") or {}
    acc, acc0 = summary.get("accuracy_per_task") or {}, summary.get("accuracy_per_task_before") or {}
    tasks = list(dict.fromkeys([*loss, *acc]))
    if len(tasks) < 2:
        return []
    return [f"    {t}: eval loss {f(loss0.get(t), '.4f')} -> {f(loss.get(t), '.4f')}, "
            f"accuracy {f(acc0.get(t), '.1%')} -> {f(acc.get(t), '.1%')}" for t in tasks]


def print_summary(summary: dict[str, Any], file=None) -> None:
    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    lines = [
        f"grass-ft {summary['method']} on {summary['model']} ({summary.get('model_note') or 'as given'}), "
        f"data {summary['data']}, {summary['steps']} steps",
        f"  eval loss   {f(summary['eval_loss_before'], '.4f')} -> {f(summary['eval_loss'], '.4f')}"
        f"   (held-out, n={summary['eval_n']})",
        f"  accuracy    {f(summary['accuracy_before'], '.1%')} -> {f(summary['accuracy'], '.1%')}"
        f"   (task {summary['task']})",
        *per_task_lines(summary, f),
        f"  train loss  {f(summary['final_train_loss'], '.4f')} (mean of last steps)",
        f"  speed       {summary['s_per_step']:.2f} s/step, {summary['tokens_per_s']:.0f} tokens/s",
        f"  memory      peak {summary['peak_memory_bytes'] / 2**30:.2f} GiB; optimizer state "
        f"{summary['optimizer_state_device_bytes'] / 2**20:.1f} MiB on device, "
        f"{summary['optimizer_state_host_bytes'] / 2**20:.1f} MiB on host",
        f"  saved       {summary['final_dir']}",
    ]
    print("\n".join(lines), file=file or sys.stdout)
