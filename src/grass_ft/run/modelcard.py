"""``final/README.md``: the model card of a finished run, in the Hugging Face hub's format (YAML front matter,
then prose): the base model, the method and its settings, the data, the steps, the held-out evaluation before and
after, and the command that reproduces the run.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from ..config import TrainConfig
from ..base.registry import traits

# The keys a reader of the card wants to see next to the method (the rest are in config.yaml beside final/).
SETTINGS = ("lr", "lr_schedule", "warmup_steps", "batch_size", "grad_accum", "max_seq_len", "packing", "dtype",
            "num_train_epochs", "max_steps", "seed")
SAMPLING = ("gamma", "sample_interval", "train_embeddings", "train_head", "probe_mode", "probe_steps", "offload")
ADAPTERS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def reproduce_command(record: dict[str, Any]) -> str:
    """``grass-ft train`` with every key this run set away from the defaults (resolved values, so the same run)."""
    defaults = TrainConfig().to_dict()
    skip = {"overwrite_output_dir", "resume", "device_memory", "host_memory", "chat_template"}
    keys = [f"{k}={_text(v)}" for k, v in record.items() if k not in skip and k in defaults and v != defaults[k]]
    return shlex.join(["grass-ft", "train", *keys])


def _text(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def model_card(record: dict[str, Any], summary: dict[str, Any]) -> str:
    """The card's text for a run's resolved configuration (config.yaml) and its summary."""
    method = record["method"]
    keys = SETTINGS + (SAMPLING if traits(method).sampling else ADAPTERS if method in ("lora", "dora") else ())
    meta = {"base_model": record["model"], "library_name": "peft" if method in ("lora", "dora") else "transformers",
            "pipeline_tag": "text-generation", "tags": ["grass-ft", method, "fine-tuned"]}
    note = f" ({summary['model_note']})" if summary.get("model_note") else ""
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {record.get('run_name') or Path(summary.get('final_dir', '.')).parent.name}", "",
        f"Fine-tuned from `{record['model']}`{note} with grass-ft, method `{method}`, on `{record['data']}` "
        f"for {summary['steps']} optimizer steps"
        + (" (stopped early)" if summary.get("stopped_early") else "") + ".", "",
        "## Settings", "",
        "| key | value |", "|---|---|",
        *[f"| {k} | `{_text(record[k])}` |" for k in keys if k in record],
        "",
        "Every key the run used is in `config.yaml` beside this directory.", "",
        "## Held-out evaluation", "",
        f"{summary.get('eval_n', 0)} held-out examples, task `{record.get('task')}`"
        + (f"; these weights are the best evaluation's, step {summary['best_step']}"
           if summary.get("final_from_best") else "") + ".", "",
        "| | before | after |", "|---|---|---|",
        f"| eval loss | {_fmt(summary.get('eval_loss_before'), '.4f')} | {_fmt(summary.get('eval_loss'), '.4f')} |",
        f"| accuracy | {_fmt(summary.get('accuracy_before'), '.1%')} | {_fmt(summary.get('accuracy'), '.1%')} |",
        "",
        "## Reproduce", "",
        "```bash", reproduce_command(record), "```", "",
        "or `grass-ft train --config config.yaml` with the `config.yaml` of this run.", "",
    ]
    return "\n".join(lines)


def write_model_card(final: Path, record: dict[str, Any], summary: dict[str, Any]) -> Path:
    """Write ``final/README.md`` (through a temporary name, so a half-written card never stands)."""
    path = Path(final) / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(model_card(record, summary), encoding="utf-8")
    os.replace(tmp, path)
    return path
