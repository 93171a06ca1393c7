"""The one training loop of the native run: a batch, the training step (:class:`~grass_ft.method.step.StepRunner`),
the logs, the evaluation and the checkpoint when due, from the first step (or the resumed one) to the budget."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from ..base.errors import DivergenceError
from ..config import TrainConfig
from ..method.methods import Prepared
from ..method.step import optimizer_state_bytes
from ..parallel.distributed import Distributed
from .checkpoint import gather_rng_states, run_keys, save_checkpoint, save_sharded_checkpoint
from .held_out import evaluate_during
from .logging_sinks import MetricSinks
from .messages import warn
from .outputs import writing
from .state import Inputs, LoopResult, MethodRun, Totals


def train_loop(cfg: TrainConfig, dist: Distributed, out: Path, run: MethodRun, stream, inputs: Inputs,
               totals: Totals, before: dict[str, Any], device: torch.device, progress: bool, evaluate,
               appending: bool, choice: dict[str, Any] | None = None, best=None) -> LoopResult:
    """The steps from ``totals.step`` to the budget: train, log, evaluate every ``eval_steps`` (by ``evaluate``, the
    recipe's), checkpoint. ``totals`` is updated in place; a diverged run stops after its last step is logged, an
    early-stopped one after the evaluation that ran out of patience."""
    main, model = dist.is_main, run.model
    n_trainable = sum(p.numel() for p in model.parameters())
    n_step_trainable = trainable_count(run.prepared)  # now: saving sets requires_grad on everything
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logs = _Logs.open(cfg, dist, out, run, totals.step, appending)
    t_start = time.perf_counter()
    if device.type == "cuda":
        # the summary's peak is the training steps' own, not loading's or the "before" evaluation's
        torch.cuda.reset_peak_memory_stats(device)
    probe_peak, stopped_early, n_steps = None, False, run.n_steps
    bar = tqdm(range(totals.step, n_steps), desc=f"{cfg.method}", disable=not (progress and main),
               dynamic_ncols=True, initial=totals.step, total=n_steps)
    try:
        for step in bar:
            # the step: grad_accum micro-batches through the one training step
            batches = [{k: v.to(device) for k, v in stream.next_batch().items()} for _ in range(cfg.grad_accum)]
            if run.reduce_scatter is not None:
                run.reduce_scatter.bytes = 0
            res = run.runner.train_step(step, batches, forward=run.forward)
            if res.probe and not run.runner.is_probe(step + 1):  # GRASS's probe is over: its peak apart
                probe_peak = peak_memory_bytes(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
            # its record: the totals, the logs, the divergence watch
            tps = _log_step(cfg, dist, run, logs, totals, step, res, device, param_bytes, choice)
            # the evaluation and the checkpoint, when due
            stopped_early = _when_due(cfg, dist, out, run, stream, inputs.tokenizer, totals, before, best, step,
                                      logs, evaluate)
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
        logs.close()
    wall_s = time.perf_counter() - t_start
    train_peak = peak_memory_bytes(device)  # before saving and the "after" evaluation (generation)
    check_finite_weights(cfg, dist, run, totals.step - 1)  # nor saved as final/ (the weights' own line first)
    run.watch.check_end()
    return LoopResult(wall_s, train_peak, probe_peak, n_trainable, n_step_trainable, stopped_early)


@dataclass
class _Logs:
    """The loop's open logs: metrics.jsonl and layers.jsonl (rank 0's) and the ``report_to`` sinks."""

    metrics: IO[str]
    layers: IO[str]
    sinks: MetricSinks

    @classmethod
    def open(cls, cfg: TrainConfig, dist: Distributed, out: Path, run: MethodRun, start: int,
             appending: bool) -> _Logs:
        mode = "a" if appending else "w"
        metrics_f = open(out / "metrics.jsonl" if dist.is_main else os.devnull, mode, buffering=1)
        # rank 0 alone writes the trace; GRASS_FT_TRACE_ALL_RANKS=1 (a debugging aid, used by the tests) has every
        # other rank write its own to layers.rank<r>.jsonl so traces can be compared
        trace_all = os.environ.get("GRASS_FT_TRACE_ALL_RANKS") == "1"
        layers_path = (out / "layers.jsonl" if dist.is_main else
                       (out / f"layers.rank{dist.rank}.jsonl" if trace_all else None))
        layers_f = open(layers_path or os.devnull, mode, buffering=1)
        sinks = MetricSinks(cfg.report_to, out, run.record, enabled=dist.is_main, resume_step=start,  # report_to
                            run_name=run.record.get("run_name"))
        return cls(metrics_f, layers_f, sinks)

    def close(self) -> None:
        self.metrics.close()
        self.layers.close()
        self.sinks.close()


def _log_step(cfg: TrainConfig, dist: Distributed, run: MethodRun, logs: _Logs, totals: Totals, step: int, res,
              device: torch.device, param_bytes: int, choice: dict[str, Any] | None) -> float:
    """A step's events into layers.jsonl, its figures into the totals, metrics.jsonl (every ``logging_steps``) and
    the sinks, its loss and gradient to the divergence watch (which stops a ruined run, after the step is logged).
    Returns its tokens per second."""
    for ev in res.events:
        logs.layers.write(json.dumps(ev) + "\n")
    totals.step = step + 1
    totals.tokens += res.tokens  # all ranks' tokens of this step
    totals.train_time += res.wall_s
    totals.bookkeeping_time += res.bookkeeping_s
    totals.losses.append(res.loss)
    tps = res.tokens / res.seconds if res.seconds > 0 else 0.0
    if choice is not None and dist.is_main and "measured_peak_bytes" not in choice:
        _log_peak_against_plan(choice, device)
    record = None
    if step % cfg.logging_steps == 0 or step == run.n_steps - 1:
        record = _step_record(step, res, run, dist, device, param_bytes, tps)
        logs.metrics.write(json.dumps(record) + "\n")
    logs.sinks.log_step(record, res.events, step)
    # a float16 overflow is routine while the loss scale settles; it counts as bad only below a scale of 1
    bad = res.skipped and not (res.overflow and (res.loss_scale or 0) >= 1)
    run.watch.observe(step, res.loss, res.grad_norm, res.probe, bad)
    return tps


def _when_due(cfg: TrainConfig, dist: Distributed, out: Path, run: MethodRun, stream, tokenizer, totals: Totals,
              before: dict[str, Any], best, step: int, logs: _Logs, evaluate) -> bool:
    """The evaluation every ``eval_steps`` and the checkpoint every ``save_steps`` after ``step`` (none after the
    last step: the finish saves and evaluates). Returns whether early stopping ends the run."""
    n_steps, stopped = run.n_steps, False
    if cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and step + 1 < n_steps:
        stopped = evaluate_during(dist, out, run, best, step, logs.metrics, logs.sinks, evaluate)
    if cfg.save_steps and (step + 1) % cfg.save_steps == 0:
        rng = gather_rng_states() if step + 1 < n_steps else None  # every rank's: all ranks call it
        if step + 1 < n_steps and _sound_to_save(cfg, dist, run, step):
            if dist.is_main or cfg.fsdp:
                _save_checkpoint(cfg, dist, out, run, stream, tokenizer, totals, before, rng, best)
        dist.barrier()  # no rank runs ahead of a checkpoint it may be killed and resumed from
    return stopped


def _log_peak_against_plan(choice: dict[str, Any], device: torch.device) -> None:
    """After the first step of this process: the real peak beside the planner's prediction (summary.json keeps
    both)."""
    from ..planner.resolve import peak_line

    choice["measured_peak_bytes"] = peak_memory_bytes(device)
    line, off = peak_line(choice, choice["measured_peak_bytes"], device.type)
    (warn if off else lambda m: tqdm.write(f"grass-ft: {m}", file=sys.stderr))(line)


def _sound_to_save(cfg: TrainConfig, dist: Distributed, run: MethodRun, step: int) -> bool:
    """Whether the checkpoint due after ``step`` may be written (every rank decides the same). Weights holding an
    inf or NaN stop the run here; a run in a streak of bad steps skips the checkpoint with a warning, since it
    would prune the checkpoints from before the run went bad, the ones worth going back to."""
    check_finite_weights(cfg, dist, run, step)
    if run.watch.last is None:
        return True
    if dist.is_main and step + 1 - run.watch.streak_start <= cfg.save_steps:  # once per streak
        warn(f"no checkpoint is written while steps are bad (since step {run.watch.streak_start}); the "
             f"checkpoints from before are kept")
    return False


def check_finite_weights(cfg: TrainConfig, dist: Distributed, run: MethodRun, step: int) -> None:
    """Every rank: refuse to go on to a checkpoint or final/ from weights holding an inf or NaN. With fsdp each
    rank holds a shard, so the count is summed over ranks (a collective: every rank calls this)."""
    from .divergence import nonfinite_tensors

    params = list(run.model.named_parameters())
    bad = nonfinite_tensors(params)
    n_bad = dist.sum_floats([len(bad)])[0] if cfg.fsdp else len(bad)
    if n_bad:
        first = bad[0] if bad else "on another rank's shard"
        raise DivergenceError(run.watch.weights_message(step, first, int(n_bad), len(params)))


def _step_record(step: int, res, run: MethodRun, dist: Distributed, device: torch.device, param_bytes: int,
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


def _save_checkpoint(cfg: TrainConfig, dist: Distributed, out: Path, run: MethodRun, stream, tokenizer,
                     totals: Totals, before: dict[str, Any], rng: dict[str, Any], best=None) -> None:
    """checkpoint-<step>: what :func:`_resume` needs to continue bit for bit (``rng``: every rank's random state,
    :func:`~grass_ft.run.checkpoint.gather_rng_states`)."""
    extra = {"runner": run.runner.state_dict(), "rng": rng, "watch": run.watch.state_dict(),
             **({"best": best.state_dict()} if best is not None else {})}
    trainer_state = {"data": stream.state_dict(), "totals": totals.state(),
                     "before": {k: v for k, v in before.items() if k != "predictions"},
                     "run": run_keys(run.record, dist.world_size)}
    with writing(out / f"checkpoint-{totals.step}"):
        if cfg.fsdp:  # every rank writes its shards (no loadable copy: that would gather the model)
            save_sharded_checkpoint(out, totals.step, run.model, run.prepared.optimizer, run.scheduler, extra,
                                    trainer_state, cfg.save_total_limit, dist.is_main)
        else:
            save_checkpoint(out, totals.step, run.model, run.prepared.optimizer, run.scheduler, extra,
                            trainer_state, cfg.save_total_limit, tokenizer=tokenizer)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory (``torch.cuda.max_memory_allocated`` since its last reset) or, on CPU, the process's
    peak RSS (which cannot be reset: it includes loading the model)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def trainable_count(prepared: Prepared) -> int:
    """Parameters trainable at one (non-probe) step: drawn blocks plus always-trained ones, or those that
    require grad (all for fft; the adapters for lora/dora)."""
    params = dict(prepared.model.named_parameters())
    if prepared.sampler is None:
        return sum(p.numel() for p in params.values() if p.requires_grad)
    per_block = max(prepared.layout.numel) * prepared.sampler.gamma
    return per_block + sum(params[n].numel() for n in prepared.always)


def _fmt_blocks(active: list[int]) -> str:
    return ",".join(map(str, active)) if active else "all"
