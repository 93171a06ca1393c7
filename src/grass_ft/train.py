"""The native training loop around :class:`grass_ft.step.StepRunner`: load, evaluate, train, save, evaluate.

Output directory contract (other tools rely on it): ``config.yaml`` (resolved), ``metrics.jsonl`` (a line per
logged step), ``layers.jsonl`` (a line per probe/draw/refresh event), ``summary.json`` (final metrics, written
last) and ``final/`` (``save_pretrained`` output with the tokenizer; for lora/dora the peft adapter,
``adapter_model.safetensors``, and with ``merge_lora`` a stand-alone merged model in ``final/merged/``).
``final/`` and ``summary.json`` appear only when a run finishes; each is written to a temporary name and renamed
into place.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import data as data_mod
from .atomic import atomic_dir, write_json_atomic
from .checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state, truncate_jsonl
from .distributed import Distributed, init_distributed
from .config import ConfigError, TrainConfig, save_config, validate
from .loss import loss_forward
from .methods import Prepared, method_names, prepare, step_budget
from .models import PACKAGED_NOTE, block_layout, enable_checkpointing, load_model_and_tokenizer
from .step import StepRunner, lr_factor, optimizer_state_bytes


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to change."""


# ------------------------------------------------------------------------------------------------- helpers


def prepare_output_dir(path: str | Path, resuming: bool = False) -> Path:
    """Create ``path`` and check it is writable; remove a previous run's ``final/`` and ``summary.json`` so
    that a failed run never looks finished (and its logs, unless this run resumes them)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"`output_dir` {str(out)!r} is not writable: {e.strerror}") from None
    stale_files = [out / "final", out / "summary.json"]
    if not resuming:
        stale_files += [out / "metrics.jsonl", out / "layers.jsonl"]
    for stale in stale_files:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    return out


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory (``torch.cuda.max_memory_allocated``) or, on CPU, the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def save_final(model, tokenizer, out: Path) -> Path:
    """``save_pretrained`` into a temporary directory, then rename it to ``final/``."""
    with atomic_dir(out / "final") as tmp:
        # A peft adapter (lora/dora) saves only its adapter weights: the vocabulary is never resized, and "auto"
        # would look base_model_name_or_path up on the hub, which a packaged name such as smollm2-135m is not.
        extra = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
        model.save_pretrained(tmp, safe_serialization=True, **extra)
        tokenizer.save_pretrained(tmp)
    return out / "final"


def held_out_task(example: dict, cfg: TrainConfig) -> str:
    """A held-out example's task as ``eval_loss_only_tasks`` names it: its ``task`` key, else ``cfg.task``."""
    return str(example.get("task") or cfg.task)


def loss_only_tasks(cfg: TrainConfig, examples: list[dict]) -> set[str]:
    """The tasks of ``eval_loss_only_tasks``; each must be a task of the held-out examples."""
    wanted = {t.strip() for t in cfg.eval_loss_only_tasks.split(",") if t.strip()}
    present = {held_out_task(ex, cfg) for ex in examples}
    missing = sorted(wanted - present)
    if missing and examples:
        raise ConfigError([f"`eval_loss_only_tasks`: {', '.join(map(repr, missing))} is not a task of the held-out "
                           f"examples (their tasks: {', '.join(sorted(present))})"])
    return wanted


def evaluate_model(model, tokenizer, examples: list[dict], cfg: TrainConfig, desc: str) -> dict[str, Any]:
    """Held-out eval loss (overall and per task) and accuracy (the same code as ``grass-ft eval``).

    Tasks in ``eval_loss_only_tasks`` get an eval loss and no generation; accuracy is over the others.
    """
    from .evaluate import eval_loss_by_task, evaluate_examples

    if not examples:
        return {}
    loss, per_task_loss = eval_loss_by_task(model, tokenizer, examples, max_seq_len=cfg.max_seq_len,
                                            batch_size=cfg.eval_batch_size, task=cfg.task)
    skip = loss_only_tasks(cfg, examples)
    generated = [ex for ex in examples if held_out_task(ex, cfg) not in skip]
    res: dict[str, Any] = (evaluate_examples(model, tokenizer, generated, cfg.task, max_new_tokens=cfg.max_new_tokens,
                                             batch_size=cfg.eval_batch_size) if generated
                           else {"accuracy": None, "n": 0, "per_task": {}, "predictions": []})
    res["eval_loss"] = loss
    res["eval_loss_per_task"] = per_task_loss
    res["label"] = desc
    return res


def validate_for_model(cfg: TrainConfig, model) -> None:
    """Checks that need the model: γ against the number of decoder blocks."""
    if cfg.method in ("grass", "grass-static", "lisa"):
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
    try:
        return _run_train(cfg, progress, dist)
    finally:
        dist.close()


def _run_train(cfg: TrainConfig, progress: bool, dist: Distributed) -> dict[str, Any]:
    main = dist.is_main
    # 1. Output directory first: an unwritable path fails before minutes of loading.
    out = prepare_output_dir(cfg.output_dir, resuming=bool(cfg.resume)) if main else Path(cfg.output_dir)
    dist.barrier()
    checkpoint = find_checkpoint(out, cfg.resume)
    torch.manual_seed(cfg.seed)

    # 2. Data before the model, so a bad file fails fast: generated problems from disjoint seeds, or a file
    #    with a held-out split.
    train_ex, held_ex = data_mod.load_train_eval(cfg.data, cfg.eval_data, cfg.train_samples, cfg.eval_samples,
                                                 cfg.seed)
    loss_only_tasks(cfg, held_ex)  # a misspelt task fails here, not after training

    # 3. Model, tokenizer, and the checks that need the model.
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.dtype)
    validate_for_model(cfg, model)
    device = dist.device()
    model.to(device)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)

    features = [data_mod.tokenize_example(tokenizer, ex, cfg.max_seq_len, cfg.train_on_inputs) for ex in train_ex]
    # batch_size is per process: each step takes batch_size x world_size examples, each rank its share
    stream = data_mod.BatchStream(features, cfg.batch_size * dist.world_size, tokenizer.pad_token_id,
                                  seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)

    # 4. Evaluation of the model as loaded (a resumed run reuses the figure its checkpoint recorded).
    if checkpoint is None:
        before = (evaluate_model(model, tokenizer, held_ex, cfg, "before")
                  if (held_ex and main and cfg.eval_before) else {})
        dist.barrier()

    # 5. The method: optimizer over every candidate parameter, sampler, scheduler.
    prepared: Prepared = prepare(model, cfg)
    model = prepared.model  # lora/dora wrap the model in a peft model: train, save and evaluate that
    n_steps, total_updates = step_budget(cfg, prepared.sampler)  # count_probe_steps decides what max_steps counts
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        prepared.optimizer, lambda k: lr_factor(k, cfg.warmup_steps, total_updates, cfg.lr_schedule))
    runner = StepRunner(prepared, scheduler, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                        max_bad_steps=cfg.max_bad_steps, dist=dist)
    if main:
        save_config(cfg, out / "config.yaml")

    # 6. Resume: weights, optimizer (by name), scheduler, sampler, RNG, data position and running totals.
    start_step, totals = 0, {"tokens": 0, "train_time": 0.0, "bookkeeping_time": 0.0, "losses": []}
    if checkpoint is not None:
        trainer_state, extra = load_checkpoint(checkpoint, model, prepared.optimizer, scheduler)
        runner.load_state_dict(extra["runner"])
        set_rng_state(extra["rng"])
        stream.load_state_dict(trainer_state["data"])
        start_step, totals, before = trainer_state["step"], trainer_state["totals"], trainer_state["before"]
        if main:
            for log in ("metrics.jsonl", "layers.jsonl"):
                truncate_jsonl(out / log, start_step)
            tqdm.write(f"resumed from {checkpoint} at step {start_step}")

    # 7. Train.
    n_trainable = sum(p.numel() for p in model.parameters())
    n_step_trainable = _trainable_count(prepared)  # now: saving below sets requires_grad on everything
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mode = "a" if checkpoint is not None else "w"
    metrics_f = open(out / "metrics.jsonl" if main else os.devnull, mode, buffering=1)
    # rank 0 alone writes the trace; GRASS_FT_TRACE_ALL_RANKS=1 (a debugging aid, used by the tests) has every
    # other rank write its own to layers.rank<r>.jsonl so traces can be compared
    trace_all = os.environ.get("GRASS_FT_TRACE_ALL_RANKS") == "1"
    layers_path = out / "layers.jsonl" if main else (out / f"layers.rank{dist.rank}.jsonl" if trace_all else None)
    layers_f = open(layers_path or os.devnull, mode, buffering=1)
    t_start = time.perf_counter()
    total_tokens, train_time = totals["tokens"], totals["train_time"]
    bookkeeping_time, losses = totals["bookkeeping_time"], totals["losses"]
    bar = tqdm(range(start_step, n_steps), desc=f"{cfg.method}", disable=not (progress and main), dynamic_ncols=True,
               initial=start_step, total=n_steps)
    try:
        for step in bar:
            batches = [{k: v.to(device) for k, v in stream.next_batch().items()} for _ in range(cfg.grad_accum)]
            res = runner.train_step(step, batches, forward=loss_forward(cfg.supervised_only_loss))
            for ev in res.events:
                layers_f.write(json.dumps(ev) + "\n")
            tokens = dist.sum_int(res.tokens)  # all ranks' tokens of this step
            total_tokens += tokens
            train_time += res.seconds
            bookkeeping_time += res.bookkeeping_s
            losses.append(res.loss)
            state = optimizer_state_bytes(prepared.optimizer)
            tps = tokens / res.seconds if res.seconds > 0 else 0.0
            if step % cfg.logging_steps == 0 or step == n_steps - 1:
                metrics_f.write(json.dumps({
                    "step": step, "loss": res.loss, "lr": scheduler.get_last_lr()[0], "grad_norm": res.grad_norm,
                    "tokens_per_s": tps, "s_per_step": res.seconds, "probe": res.probe, "skipped": res.skipped,
                    "active": res.active, "bookkeeping_s": res.bookkeeping_s,
                    "optimizer_state_device_bytes": state["device"], "optimizer_state_host_bytes": state["host"],
                    "peak_memory_bytes": peak_memory_bytes(device), "allreduce_bytes": dist.allreduce_bytes,
                    "allreduce_fraction_of_fft": dist.allreduce_bytes / param_bytes}) + "\n")
            if main and cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < n_steps:
                totals = {"tokens": total_tokens, "train_time": train_time, "bookkeeping_time": bookkeeping_time,
                          "losses": losses}
                save_checkpoint(out, step + 1, model, prepared.optimizer, scheduler,
                                {"runner": runner.state_dict(), "rng": rng_state()},
                                {"data": stream.state_dict(), "totals": totals,
                                 "before": {k: v for k, v in before.items() if k != "predictions"}},
                                cfg.save_total_limit)
            if cfg.save_steps and (step + 1) % cfg.save_steps == 0:
                dist.barrier()  # no rank runs ahead of a checkpoint it may be killed and resumed from
            bar.set_postfix_str(f"loss {res.loss:.3f} | {'probe' if res.probe else 'blocks ' + _fmt_blocks(res.active)}"
                                f" | {tps:.0f} tok/s")
    finally:
        bar.close()
        metrics_f.close()
        layers_f.close()
    wall_train = time.perf_counter() - t_start

    # 8. Save, then evaluate the trained model.
    for p in model.parameters():
        p.requires_grad_(True)
    if not main:
        dist.barrier()  # rank 0 saves and evaluates
        return {"rank": dist.rank, "world_size": dist.world_size}
    final = save_final(model, tokenizer, out)
    after = evaluate_model(model, tokenizer, held_ex, cfg, "after") if held_ex else {}
    if after:
        from .evaluate import write_eval

        write_eval(out, after)
    merged = None
    if cfg.merge_lora and cfg.method in ("lora", "dora"):
        from .lora import save_merged

        merged = save_merged(model, tokenizer, final)  # in place, so after the last use of the adapter model

    state = optimizer_state_bytes(prepared.optimizer)
    tail = losses[-max(1, min(10, len(losses))):]
    summary = {
        "method": cfg.method, "model": cfg.model, "model_note": PACKAGED_NOTE.get(cfg.model, ""),
        "data": cfg.data, "task": cfg.task, "steps": cfg.max_steps, "seed": cfg.seed, "world_size": dist.world_size,
        "eval_n": len(held_ex),
        "eval_loss_before": before.get("eval_loss"), "eval_loss": after.get("eval_loss"),
        "accuracy_before": before.get("accuracy"), "accuracy": after.get("accuracy"),
        "eval_loss_per_task_before": before.get("eval_loss_per_task"),
        "eval_loss_per_task": after.get("eval_loss_per_task"),
        "accuracy_per_task_before": {t: d["accuracy"] for t, d in before.get("per_task", {}).items()} or None,
        "accuracy_per_task": {t: d["accuracy"] for t, d in after.get("per_task", {}).items()} or None,
        "final_train_loss": sum(tail) / len(tail),
        "peak_memory_bytes": peak_memory_bytes(device),
        "optimizer_state_bytes": state["device"] + state["host"],
        "optimizer_state_device_bytes": state["device"], "optimizer_state_host_bytes": state["host"],
        "optimizer_state_peak_device_bytes": state["peak_device"],
        "trainable_params": n_step_trainable, "total_params": n_trainable,
        "tokens_per_s": total_tokens / train_time if train_time else 0.0,
        "s_per_step": train_time / n_steps, "train_wall_s": wall_train,
        "mgn_bookkeeping_fraction": bookkeeping_time / train_time if train_time else 0.0,
        "skipped_steps": runner.skipped_steps, "offload": prepared.offload, "final_dir": str(final),
        "merged_dir": str(merged) if merged is not None else None,
    }
    write_json_atomic(out / "summary.json", summary)
    dist.barrier()
    return summary


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
        f"  train loss  {summary['final_train_loss']:.4f} (mean of last steps)",
        f"  speed       {summary['s_per_step']:.2f} s/step, {summary['tokens_per_s']:.0f} tokens/s",
        f"  memory      peak {summary['peak_memory_bytes'] / 2**30:.2f} GiB; optimizer state "
        f"{summary['optimizer_state_device_bytes'] / 2**20:.1f} MiB on device, "
        f"{summary['optimizer_state_host_bytes'] / 2**20:.1f} MiB on host",
        f"  saved       {summary['final_dir']}",
    ]
    print("\n".join(lines), file=file or sys.stdout)
