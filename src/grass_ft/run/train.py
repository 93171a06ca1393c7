"""``grass-ft train``, the native run, as a recipe (torchtune's shape): :func:`run_train` calls one setup step per
concern, each a named function below (the checks that need no weights and the tokenised data; what the run settles
at its start; the output directory; the model, evaluated as loaded; the method; a resume), then the one loop
(:func:`grass_ft.run.loop.train_loop`) and the finish (:func:`grass_ft.run.finish.finish`). The CLI, ``compare``
(one ``grass-ft train`` per method) and the benchmarks run this recipe; the Trainer callback drives the same step.

Output directory contract (other tools rely on it): ``config.yaml`` (resolved), ``metrics.jsonl`` (a line per
logged step), ``layers.jsonl`` (a line per probe/draw/refresh event), ``summary.json`` (final metrics, written
last) and ``final/`` (``save_pretrained`` output with the tokenizer; for lora/dora the peft adapter,
``adapter_model.safetensors``, and with ``merge_lora`` a stand-alone merged model in ``final/merged/``).
``final/`` and ``summary.json`` appear only when a run finishes; each is written to a temporary name and renamed
into place. A directory that holds a previous run is refused unless ``overwrite_output_dir=true`` or ``resume``
continues it, and nothing in it is touched until every check that needs no model weights has passed
(:mod:`grass_ft.run.preflight`; docs/RELIABILITY.md).
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import data as data_mod
from ..base.errors import DivergenceError, UserError
from ..base.registry import traits
from ..config import ConfigError, TrainConfig, save_config, validate
from ..method.loss import enable_supervised_loss, full_loss, loss_forward
from ..method.methods import Prepared, method_names, prepare, step_budget
from ..method.step import StepRunner, lr_factor
from ..model.blocks import block_layout, enable_checkpointing
from ..model.load import ModelError, empty_model, load_model, load_tokenizer
from ..parallel.distributed import Distributed, init_distributed
from ..planner.resolve import choice_line, write_record
from .checkpoint import load_checkpoint, load_sharded_checkpoint, run_keys, set_rng_state, truncate_jsonl
from .divergence import DivergenceWatch, vocab_size
from .early_stopping import BestTracker
from .finish import finish, print_summary, save_final
from .held_out import evaluate_model
from .loop import train_loop
from .messages import RunStage, interrupted_state, kept_checkpoint, out_of_memory_message, sweep_outlasts_run, warn
from .outputs import LOCK_NAME, output_dir_lock, prepare_output_dir
from .preflight import RunError, check_loss_only_tasks, check_token_ids, preflight, supervised_features
from .state import Inputs, MethodRun, Totals


# What callers import from here (the CLI, the tests, the benchmarks; grass_ft.train, the old path, is this module).
__all__ = ["LOCK_NAME", "RunError", "RunStage", "evaluate_model", "interrupted_state", "out_of_memory_message",
           "output_dir_lock", "prepare_output_dir", "print_summary", "run_train", "save_final", "validate_for_model"]


def validate_for_model(cfg: TrainConfig, model) -> None:
    """Checks that need the model: γ against the number of decoder blocks."""
    if traits(cfg.method).sampling:
        layout = block_layout(model, cfg.layers_attribute)
        errors = validate(cfg, num_blocks=layout.num_blocks, known_methods=method_names())
        if errors:
            raise ConfigError(errors)


def run_train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` with ``cfg.method`` and write the output directory; returns the summary.

    Under torchrun / accelerate launch every rank runs this; rank 0 alone writes files and keeps the evaluations'
    figures (with fsdp every rank runs them with it, on the sharded model).
    """
    dist = init_distributed()
    stage = RunStage()
    try:
        with ExitStack() as held:  # the output directory's lock, for as long as the run lasts
            return _run_train(cfg, progress, dist, held, stage)
    except torch.OutOfMemoryError as e:
        raise RunError(out_of_memory_message(cfg, e)) from None
    except DivergenceError as e:
        raise DivergenceError(f"{e}; {kept_checkpoint(cfg)}") from None
    except KeyboardInterrupt as e:
        e.run_stage = stage  # what the interrupted run had done: the CLI's message names what works from there
        raise
    finally:
        dist.close()


def _run_train(cfg: TrainConfig, progress: bool, dist: Distributed, held: ExitStack,
               stage: RunStage) -> dict[str, Any]:
    """The recipe: every check that needs no weights, then the output directory, the model, the method, a resume,
    the loop, and the finished run's files. Each step is a helper below; only the loop carries state."""
    # the checks that need no weights, the data tokenised; what the run settles at its start
    _check_fsdp(cfg, dist)
    inputs = _check_and_tokenize(cfg, dist)
    cfg = _resolve_recipe(cfg, dist, inputs)  # dtype=auto, epochs -> max_steps: before the plan, which prices them
    cfg, choice = _resolve_auto(cfg, dist)  # after the checks that need no weights: bad input fails first
    # the output directory, claimed only now
    out = _claim_output_dir(cfg, dist, held, inputs.checkpoint)
    stage.claimed = True
    if choice is not None and dist.is_main:
        write_record(out, choice)
    # the model, evaluated as loaded, before the method touches it (a resumed run reuses its checkpoint's figure)
    model, device, reduce_scatter = _load_model(cfg, dist)
    # batch_size is per process: each step takes batch_size x world_size examples (packed rows), each rank its share
    stream = data_mod.BatchStream(inputs.features, cfg.batch_size * dist.world_size, inputs.tokenizer.pad_token_id,
                                  seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    evaluate = _evaluator(cfg, inputs)
    before = _evaluate_before(cfg, dist, inputs, model, evaluate)
    # the method, and config.yaml: every key as the run uses it
    run = _set_up_method(cfg, model, dist, reduce_scatter)
    cfg = dataclasses.replace(cfg, warmup_steps=run.warmup_steps)  # warmup_ratio resolved against the updates
    run.record = _resolved_record(cfg, dist, out, inputs, run, choice)
    _record_run(dist, out, inputs.checkpoint, run.record, choice)
    # a resume, the loop, the finish
    totals, best = Totals(), BestTracker(cfg)
    if inputs.checkpoint is not None:
        totals, before = _resume(cfg, inputs.checkpoint, run, stream, out, dist.is_main, best)
    loop = train_loop(cfg, dist, out, run, stream, inputs, totals, before, device, progress, evaluate,
                      appending=inputs.checkpoint is not None, choice=choice, best=best)
    return finish(cfg, dist, out, run, inputs, before, totals, loop, evaluate, choice, best)


def _evaluator(cfg: TrainConfig, inputs: Inputs):
    """The run's evaluation of its held-out examples, ``evaluate(model, label)``, as the loop and the finish call it:
    through this module's :func:`~grass_ft.run.held_out.evaluate_model`, looked up at each call."""
    return lambda model, desc: evaluate_model(model, inputs.tokenizer, inputs.held_ex, cfg, desc)


def _evaluate_before(cfg: TrainConfig, dist: Distributed, inputs: Inputs, model, evaluate) -> dict[str, Any]:
    """The model as loaded on the held-out examples (rank 0, every rank waiting; a sharded model: every rank runs
    the evaluation with rank 0, which keeps the figures), unless the run resumes."""
    before: dict[str, Any] = {}
    if inputs.checkpoint is None:
        if inputs.held_ex and cfg.eval_before and (dist.is_main or cfg.fsdp):  # sharded: every rank, in lockstep
            result = evaluate(model, "before")
            before = result if dist.is_main else {}
            if cfg.fsdp:
                from ..parallel.fsdp import reshard

                reshard(model)  # the sharded parameters on the model again, before the optimizer is built on them
        dist.barrier()
    return before


def _record_run(dist: Distributed, out: Path, checkpoint: Path | None, record: dict[str, Any],
                choice: dict[str, Any] | None) -> None:
    """A resumed run's resolved keys against what its checkpoint's run resolved; then the auto choice logged and
    config.yaml written (rank 0)."""
    if checkpoint is not None:  # the keys resolved just now, against what the checkpoint's run resolved
        from .checkpoint import check_same_run, checkpoint_run

        recorded = checkpoint_run(checkpoint)
        now = {k: v for k, v in run_keys(record, dist.world_size).items()
               if recorded is None or recorded.get(k) is not None}  # a checkpoint from before issue 31 holds nulls
        check_same_run(checkpoint, recorded, now)
    if choice is not None and dist.is_main:  # logged as training starts: a failure before it stays one line
        tqdm.write(f"grass-ft: {choice_line(choice)}", file=sys.stderr)
    if dist.is_main:
        save_config(record, out / "config.yaml")


def _resolve_recipe(cfg: TrainConfig, dist: Distributed, inputs: Inputs) -> TrainConfig:
    """``dtype=auto`` (rank 0's device decides for every rank), ``max_steps`` from ``num_train_epochs``, and the
    warnings a user of the Trainer would want: a run that sees less than one epoch of their data, two warm-ups."""
    from .resolve import both_warmups_warning, resolve_dtype, resolve_steps, short_run_warning

    dtype = dist.from_main(resolve_dtype(cfg.dtype, dist.device()) if dist.is_main else None)
    cfg = resolve_steps(dataclasses.replace(cfg, dtype=dtype), len(inputs.features), dist.world_size)
    if dist.is_main:
        from_file = not inputs.generated
        for line in (short_run_warning(cfg, len(inputs.features), dist.world_size, from_file),
                     both_warmups_warning(cfg)):
            if line:
                warn(line)
    return cfg


def _resolved_record(cfg: TrainConfig, dist: Distributed, out: Path, inputs: Inputs, run: MethodRun,
                     choice: dict[str, Any] | None) -> dict[str, Any]:
    """config.yaml: every key as this run used it (grass_ft.run.resolve.filled)."""
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


def _check_and_tokenize(cfg: TrainConfig, dist: Distributed) -> Inputs:
    """Every check that needs no model weights, before anything is written (output_dir, the checkpoint to resume
    from and that it belongs to this run, the data: format, tasks, one batch; the model source), then the
    tokenizer and the tokenisation: answers cut off by max_seq_len fail (all) or are left out with a warning
    (some)."""
    pf = preflight(cfg, dist.world_size)  # every rank: on a shared filesystem all reach the same verdict
    loaded = pf.loaded
    check_loss_only_tasks(cfg, loaded.held)  # a misspelt task fails here, not after training
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
    return Inputs(pf.checkpoint, tokenizer, features, loaded.held, generated=loaded.source == "generator")


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


def refuse_broken_weights(model, what: str, fix: str, error=None) -> None:
    """Weights that hold an inf or NaN before training are broken where they came from; training them would
    only be reported, wrongly, as a divergence ("lower lr")."""
    from .divergence import nonfinite_tensors

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


def _load_model(cfg: TrainConfig, dist: Distributed):
    """The model, checked against the config (γ against its blocks), on this rank's device, and with fsdp sharded
    as it loads: rank 0 alone reads the weights, every rank holds only its shards on its device
    (:func:`grass_ft.parallel.fsdp.shard_from_rank0`). Returns the model, the device and the sharded model's
    reduce-scatter counter (None without fsdp)."""
    torch.manual_seed(cfg.seed)
    device, loaded, refused = dist.device(), None, None
    if not cfg.fsdp or dist.is_main:
        try:
            loaded = load_model(cfg.model, cfg.dtype, cfg.attn_implementation)
            refuse_broken_weights(loaded, f"model {cfg.model!r}", "the model files are damaged or were saved from a "
                                                                   "diverged run (training would report it, wrongly, "
                                                                   "as a divergence); use a sound copy")
        except UserError as e:
            refused = e
    message = dist.from_main(str(refused) if refused else None) if cfg.fsdp else None  # rank 0's verdict, for all
    if refused:
        raise refused
    if message:
        raise ModelError(message)
    model = empty_model(cfg.model, cfg.dtype, cfg.attn_implementation) if cfg.fsdp else loaded
    validate_for_model(cfg, model)
    if cfg.packing:
        from ..data.packing import check_packing

        check_packing(model, cfg)  # one line, before any step, if the attention lets packed examples mix
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if not cfg.fsdp:
        return model.to(device), device, None
    from ..parallel.fsdp import shard_from_rank0

    return model, device, shard_from_rank0(model, loaded, device, cfg.layers_attribute)


def _set_up_method(cfg: TrainConfig, model, dist: Distributed, reduce_scatter=None) -> MethodRun:
    """Optimizer over every candidate parameter, sampler, scheduler. With fsdp the model is sharded already (each
    block a unit, ``reduce_scatter`` its units' counter), so the optimizer holds, and offloads, this rank's shards
    only."""
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
    if cfg.dtype == "float16":  # dynamic loss scaling into the fp32 masters (grass_ft.method.loss_scale)
        from ..method.loss_scale import LossScaler

        scaler = LossScaler()
    runner = StepRunner(prepared, scheduler, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                        max_bad_steps=sys.maxsize, dist=dist, sharded=cfg.fsdp,
                        timed=lambda s: s % cfg.logging_steps == 0 or s == n_steps - 1,  # the logged steps
                        loss_scaler=scaler)
    # the runner would raise before the step is logged; the watch stops the run after it (same max_bad_steps)
    watch = DivergenceWatch(cfg.max_bad_steps, vocab_size(prepared.model), cfg.lr)
    return MethodRun(prepared, scheduler, runner, watch, forward, n_steps, reduce_scatter, warmup)


def _resume(cfg: TrainConfig, checkpoint: Path, run: MethodRun, stream, out: Path,
            main: bool, best=None) -> tuple[Totals, dict[str, Any]]:
    """Weights, optimizer (by name), scheduler, sampler, RNG, data position and running totals from
    ``checkpoint``; the logs are cut back to its step. Returns the totals and the "before" evaluation it recorded."""
    load = load_sharded_checkpoint if cfg.fsdp else load_checkpoint
    trainer_state, extra = load(checkpoint, run.model, run.prepared.optimizer, run.scheduler)
    if not cfg.fsdp:  # (a sharded model's shards are checked at its next checkpoint, by every rank together)
        from .checkpoint import CheckpointError

        refuse_broken_weights(run.model, f"checkpoint {checkpoint}", "it was written from a broken model (or "
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
    return Totals(step=start_step, **trainer_state["totals"]), trainer_state["before"]
