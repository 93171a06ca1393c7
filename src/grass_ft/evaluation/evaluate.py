"""Evaluation runs and files: the one entry point :func:`evaluate` (called by the native loop before and after
training — and so by ``grass-ft compare``, whose runs are native loops — and by ``grass-ft eval`` through
:func:`run_eval`), model loading for ``grass-ft eval``, and ``eval.json`` / ``predictions.jsonl``.

The scoring itself (generation, log-likelihood choices, answer rules, held-out loss) is
:mod:`grass_ft.evaluation.scoring`. An example's task is settled once, when it is loaded
(:func:`grass_ft.data.examples.normalise`, by the one rule of :func:`grass_ft.base.tasks.example_task`: its ``task``
key, else the run's ``task``; the canonical name when it has an answer rule), so per-task loss and accuracy share
their keys. The run's own evaluations (before, during, after training; of a finished run's model) are
:mod:`grass_ft.run.held_out`.

Files written by :func:`write_eval`: ``eval.json`` (accuracy, n, per_task and any extra keys such as
``eval_loss``) and ``predictions.jsonl`` (one line per example); ``accuracy`` always equals the share of lines
with ``correct: true``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..base.tasks import named_tasks
from ..config import ConfigError
from ..data.formats import DataError
from ..data.tokenize import prepare_tokenizer
from .scoring import (MODES, choice_logprobs, eval_loss, eval_loss_by_task, evaluate_examples, generate,
                      score_choices, scorable, settle, summarize)

__all__ = ["MODES", "choice_logprobs", "eval_loss", "eval_loss_by_task", "evaluate", "evaluate_examples", "generate",
           "load_for_eval", "loss_only_tasks", "model_note", "run_eval", "score_choices", "scorable", "summarize",
           "write_eval"]


def loss_only_tasks(names: str | Iterable[str], examples: Sequence[dict[str, Any]], task: str | None) -> set[str]:
    """The tasks of ``eval_loss_only_tasks`` (comma-separated or a list), by :func:`~grass_ft.base.tasks.named_tasks`.

    Raises:
        ConfigError: a named task is not a task of ``examples``.
    """
    wanted, error = named_tasks(names, {ex["_task"] or None for ex in settle(examples, task)})
    if error and examples:
        raise ConfigError([error])
    return wanted


def evaluate(model: torch.nn.Module, tokenizer, examples: Sequence[dict[str, Any]], *, task: str | None = None,
             loss_only: str | Iterable[str] = (), mode: str = "generate", max_new_tokens: int = 256,
             batch_size: int = 8, max_seq_len: int = 1024, compute_loss: bool = True,
             progress: bool = True) -> dict[str, Any]:
    """Held-out eval loss (overall and per task) and accuracy of ``model`` on ``examples``.

    Accuracy is over the examples that can be answered (a prompt and a gold ``answer``; see
    :func:`~grass_ft.evaluation.scoring.scorable`) and whose task is not in ``loss_only``; the others count in the
    loss only.

    Args:
        model: a causal LM (transformers or peft).
        tokenizer: its tokenizer.
        examples: rows in any format of :mod:`grass_ft.data`.
        task: task (answer rule) of examples without a ``task`` key.
        loss_only: tasks scored by eval loss only (comma-separated or a list); each must occur in ``examples``.
        mode: ``generate`` or ``loglik``.
        max_new_tokens: generation budget per example.
        batch_size: examples (or sequences) per batch.
        max_seq_len: truncation length of the held-out loss.
        compute_loss: also report ``eval_loss`` and ``eval_loss_per_task``.
        progress: show tqdm bars.

    Returns:
        :func:`~grass_ft.evaluation.scoring.evaluate_examples`'s ``accuracy`` (``None`` when no example is scored),
        ``n``, ``per_task`` and ``predictions``, plus ``eval_loss`` and ``eval_loss_per_task``.
    """
    if not examples:
        return {}
    examples = settle(examples, task)
    skip = loss_only_tasks(loss_only, examples, task)
    res: dict[str, Any] = {}
    if compute_loss:
        res["eval_loss"], res["eval_loss_per_task"] = eval_loss_by_task(model, tokenizer, examples, max_seq_len,
                                                                        batch_size, progress, task=task)
    scored = [ex for ex in examples if (ex["_task"] or None) not in skip and scorable(ex)]
    acc = (evaluate_examples(model, tokenizer, scored, task, mode=mode, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=progress) if scored
           else {"accuracy": None, "n": 0, "per_task": {}, "predictions": []})
    return {**acc, **res}


def write_eval(output_dir: str | Path, result: dict[str, Any]) -> dict[str, Path]:
    """Write ``eval.json`` and ``predictions.jsonl`` into ``output_dir`` (created if missing).

    ``accuracy``, ``n`` and ``per_task`` in ``eval.json`` are recomputed from the predictions, so they always
    agree with ``predictions.jsonl``; other keys of ``result`` (``eval_loss``, settings) are copied as they are.

    Returns:
        ``{"eval": path, "predictions": path}``.

    Raises:
        ValueError: ``result`` has no ``predictions`` list, or its ``accuracy`` disagrees with them.
    """
    preds = result.get("predictions")
    if not isinstance(preds, list):
        raise ValueError("result has no 'predictions' list; pass the dict returned by evaluate_examples")
    summary = summarize(preds)
    if not preds:
        summary["accuracy"] = None  # nothing was scored by generation (loss-only or answerless examples)
    elif result.get("accuracy") is not None and not math.isclose(result["accuracy"], summary["accuracy"],
                                                                 abs_tol=1e-12):
        raise ValueError(f"result accuracy {result['accuracy']} disagrees with its predictions "
                         f"({summary['accuracy']}); was the result edited?")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in result.items() if k != "predictions"}
    paths = {"eval": out / "eval.json", "predictions": out / "predictions.jsonl"}
    paths["eval"].write_text(json.dumps({**meta, **summary}, indent=1) + "\n", encoding="utf-8")
    keys = ("prompt", "generated", "extracted", "gold", "correct", "task")
    with paths["predictions"].open("w", encoding="utf-8") as f:
        for p in preds:
            f.write(json.dumps({k: p.get(k) for k in keys}, ensure_ascii=False) + "\n")
    return paths


# --------------------------------------------------------------------------------------------- model loading


def load_for_eval(model_path: str | Path):
    """``(model, tokenizer)`` for evaluation, in fp32.

    A directory with ``adapter_config.json`` is a peft adapter: its base (``base_model_name_or_path``, which may
    be a packaged name such as ``smollm2-135m``) is loaded by :func:`grass_ft.model.load_model_and_tokenizer`
    and the adapter applied with ``peft.PeftModel.from_pretrained`` — the two steps of
    ``AutoPeftModelForCausalLM``, which itself cannot resolve packaged names. The tokenizer is the adapter
    directory's when it saved one, else the base's. Anything else goes to ``load_model_and_tokenizer``
    (packaged name, model directory or hub id).
    """
    from ..model.load import load_model_and_tokenizer

    path = Path(model_path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        base_spec = cfg.get("base_model_name_or_path")
        if not base_spec:
            raise ValueError(f"{path / 'adapter_config.json'} has no base_model_name_or_path; cannot find the "
                             f"base model for this adapter")
        base, tokenizer = load_model_and_tokenizer(base_spec)
        model = PeftModel.from_pretrained(base, path)
        if (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    return load_model_and_tokenizer(str(model_path))


def _check_loglik(examples: Sequence[dict[str, Any]], task: str | None, data: Any) -> None:
    """``mode=loglik`` needs answer options for every scored example; fail before the model loads, not after."""
    from ..base.tasks import choices_for

    for i, ex in enumerate(examples):
        if scorable(ex):
            try:
                choices_for(ex, ex["_task"] or None)
            except ValueError as e:
                raise ConfigError([f"`mode` loglik: evaluation data {data}, example {i}: {e}"]) from None


def check_eval_output_dir(output_dir: str, overwrite: bool) -> list[str]:
    """``grass-ft eval``'s output directory: named, a directory (or creatable), and holding no evaluation it would
    replace unless ``overwrite``. Returns the errors; one warning line names what ``overwrite`` replaces."""
    import sys

    out = Path(output_dir)
    if not str(output_dir).strip():
        return ["`output_dir` must name a directory (empty would write into the current directory)"]
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        return [f"`output_dir` {output_dir!r} is not writable: Not a directory ({existing})"]
    held = [n for n in ("eval.json", "predictions.jsonl") if (out / n).exists()]
    if not held:
        return []
    whose = "a training run's evaluation" if (out / "config.yaml").is_file() else "an earlier evaluation"
    if not overwrite:
        return [f"`output_dir` {output_dir!r} already holds {' and '.join(held)} ({whose}); pass "
                f"overwrite_output_dir=true to replace them, or choose another output_dir"]
    print(f"grass-ft eval: warning: overwrite_output_dir: replacing {' and '.join(held)} ({whose}) in {out}",
          file=sys.stderr)
    return []


def model_note(model_path: str | Path) -> str | None:
    """A caveat to report with results, e.g. that a packaged model's weights went through 4-bit quantisation."""
    from ..model.load import PACKAGED_NOTE

    spec, path = str(model_path), Path(model_path)
    if (path / "adapter_config.json").is_file():
        cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        spec = str(cfg.get("base_model_name_or_path") or "")
        path = Path(spec)
    if spec in PACKAGED_NOTE:
        return PACKAGED_NOTE[spec]
    source = path / "SOURCE.json"  # written next to a converted packaged model
    if source.is_file():
        return json.loads(source.read_text(encoding="utf-8")).get("note")
    return None


def run_eval(model_path: str | Path, data: str | Path, task: str | None = None, eval_samples: int | None = None,
             output_dir: str | Path | None = None, *, mode: str = "generate", max_new_tokens: int = 256,
             batch_size: int = 8, max_seq_len: int = 1024, seed: int = 0, compute_loss: bool = True,
             device: str | None = None, chat_template: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Load a model (or adapter), evaluate it on ``data`` and write ``eval.json`` / ``predictions.jsonl``.

    Args:
        model_path: packaged model name, model directory, hub id, or peft adapter directory.
        data: evaluation data: JSON/JSONL file, LLM-Adapters dataset folder, BIG-bench ``task.json`` or a
            generator name (drawn from held-out seeds); see :func:`grass_ft.evaluation.evalsets.load_eval_data`.
        task: default task (answer rule) for examples without one; for a dataset folder, the one task to load.
        eval_samples: first N examples per task (``None``: all; required for generators).
        output_dir: where to write the files; ``None`` writes nothing.
        mode: ``generate`` or ``loglik``.
        max_new_tokens: generation budget per example.
        batch_size: evaluation batch size.
        max_seq_len: truncation length for the held-out loss.
        seed: generator seed (held-out problems use ``seed + data.EVAL_SEED_OFFSET``).
        compute_loss: also report ``eval_loss`` (output-token cross-entropy, nats/token).
        device: where to run (``None``: ``cuda`` when available, else ``cpu``).
        chat_template: a Jinja chat template (file or text) for chat-format data, as in training.
        progress: show tqdm bars.

    Returns:
        The result of :func:`evaluate` plus ``model``, ``model_note``
        (e.g. the quantisation caveat of a packaged model), ``data``, ``mode``, ``max_new_tokens`` and
        ``wall_time_s``.
    """
    from .evalsets import load_eval_data

    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {', '.join(MODES)}, got {mode!r}")
    # data errors before the slow model load; every example settled once, here (task: the rows' default)
    examples = settle(load_eval_data(data, task, eval_samples, seed), task)
    if task is None and any(scorable(ex) and not ex["_task"] for ex in examples):
        raise DataError(f"evaluation data {data}: examples without a `task` key need task=NAME (the answer rule, "
                        f"e.g. gsm8k)")
    if mode == "loglik":
        _check_loglik(examples, task, data)
    start = time.perf_counter()
    model, tokenizer = load_for_eval(model_path)
    prepare_tokenizer(tokenizer, chat_template, examples, str(model_path))  # chat rows need a template
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = evaluate(model, tokenizer, examples, task=task, mode=mode, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, max_seq_len=max_seq_len, compute_loss=compute_loss, progress=progress)
    result.update(model=str(model_path), model_note=model_note(model_path), data=str(data), mode=mode,
                  max_new_tokens=max_new_tokens, wall_time_s=round(time.perf_counter() - start, 3))
    if output_dir is not None:
        write_eval(output_dir, result)
    return result
