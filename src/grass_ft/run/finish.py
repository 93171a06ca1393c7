"""The end of a run: the trained model saved as ``final/`` (the best evaluation's weights when asked), evaluated,
merged (LoRA) and described (model card, plots), and ``summary.json`` written last; the summary printed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..base.atomic import atomic_dir, remove_dir, write_json_atomic
from ..config import TrainConfig
from ..method.step import optimizer_state_bytes
from ..model.export import write_loadable
from ..model.load import PACKAGED_NOTE, empty_model
from ..parallel.distributed import Distributed
from .early_stopping import BestTracker, metric_value
from .messages import warn
from .outputs import writing
from .state import Inputs, LoopResult, MethodRun, Totals


def gathered_model(cfg: TrainConfig, dist: Distributed, model):
    """The trained model, every parameter requiring grad again (as saved). A sharded model is gathered, on the
    CPU of rank 0, into a plain copy of the model that stays there (every rank takes part in the gather): final/
    is saved from the host, and no full copy lands beside the shards on rank 0's GPU (issue 29); the evaluation
    after training runs on the sharded model."""
    for p in model.parameters():
        p.requires_grad_(True)
    if not cfg.fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..parallel.fsdp import unsaved_buffers

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_main:  # the gathered tensors become the copy's weights (assign): one copy of the model on the host
        gathered = empty_model(cfg.model, cfg.dtype, cfg.attn_implementation)
        gathered.load_state_dict(full, assign=True)
        for name, buffer in unsaved_buffers(model).items():  # what a state dict leaves out (rotary frequencies)
            owner, _, leaf = name.rpartition(".")
            gathered.get_submodule(owner).register_buffer(leaf, buffer.detach().cpu(), persistent=False)
        gathered.tie_weights()  # a tied head is the embedding again, as from_pretrained leaves it
        model = gathered
    return model


def finish(cfg: TrainConfig, dist: Distributed, out: Path, run: MethodRun, inputs: Inputs, before: dict[str, Any],
            totals: Totals, loop: LoopResult, evaluate, choice: dict[str, Any] | None = None,
            best: BestTracker | None = None) -> dict[str, Any]:
    """Save the trained model (the best evaluation's weights with load_best_model_at_end), evaluate it, merge a
    LoRA adapter if asked, write the model card and the plots, and summary.json last (rank 0; the other ranks wait
    at the final barrier)."""
    model = gathered_model(cfg, dist, run.model)
    if not dist.is_main:
        if cfg.fsdp:
            dist.barrier()  # rank 0 saves final/ from its gathered copy
            if inputs.held_ex:
                evaluate(run.model, "after")  # the sharded model: every rank runs rank 0's evaluation with it
        dist.barrier()  # rank 0 writes the rest
        return {"rank": dist.rank, "world_size": dist.world_size}
    after, from_best = None, False
    if best is not None and best.keep and best.step is not None and inputs.held_ex:
        # the last step's weights are evaluated like every other evaluation; the better of the two goes to final/
        last = evaluate(model, "after")
        if best.better(metric_value(last, best.metric)):
            after = last
        else:
            best.load_weights(out, model)
            after, from_best = {**best.result, "label": "after"}, True
            tqdm.write(f"grass-ft: final/ holds the best evaluation's weights, step {best.step} ({best.metric} "
                       f"{best.value:.4f}), not the last step's", file=sys.stderr)
    with writing(out / "final"):
        final = save_final(model, inputs.tokenizer, out, cfg.save_dtype)
    if cfg.fsdp:  # final/ is saved from the host copy; the sharded model is evaluated, by every rank together
        dist.barrier()
        model = run.model
    if after is None:
        after = evaluate(model, "after") if inputs.held_ex else {}
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


def _summary(cfg: TrainConfig, dist: Distributed, run: MethodRun, inputs: Inputs, before: dict[str, Any],
             after: dict[str, Any], totals: Totals, loop: LoopResult, final: Path,
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
