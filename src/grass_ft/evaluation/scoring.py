"""Scoring a model on examples: greedy generation or log-likelihood choice scoring under LLM-Adapters' answer
rules, and the held-out loss. :mod:`grass_ft.evaluation.evaluate` runs these (its
:func:`~grass_ft.evaluation.evaluate.evaluate` is the one entry point) and writes the files.

Two modes score the same examples:

* ``generate``: batched greedy decoding of the prompt, rendered as in training
  (:func:`grass_ft.data.tokenize.prompt_ids`; the Alpaca prompt for alpaca rows, the chat template for messages;
  left-padded), answer read from the response by the task's rule (:mod:`grass_ft.base.tasks`). This is
  LLM-Adapters' protocol, except that decoding is greedy (they sample with beams=4, temperature 0.1), so that
  results are deterministic.
* ``loglik``: for multiple-choice tasks, every option's target ``"the correct answer is <label>" + EOS`` is
  scored as the sum of its token log-probabilities after the prompt; the best option is the prediction. The
  prompt and the target are tokenised separately, exactly as :func:`grass_ft.data.tokenize.encode` does for
  training, so the score is minus the training loss of that candidate. Useful when a small model does not
  yet follow the answer format.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..base.tasks import answers_match, canonical_task, choice_target, choices_for, extract_answer, parse_gold
from ..data.batches import collate
from ..data.examples import Example, normalise
from ..data.formats import IGNORE_INDEX, DataError
from ..data.tokenize import prompt_ids, prompt_text, tokenize_example

MODES = ("generate", "loglik")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {v!r}")


def _eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    cfg = getattr(model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None)
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    return int(pad)


def _left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[str | list[int]], max_new_tokens: int,
             batch_size: int, progress: bool = True) -> list[str]:
    """Greedy continuations of ``prompts``, decoded without special tokens.

    Prompts are grouped by length and left-padded within a batch (the tokenizer's padding side and pad token
    are restored after), so every row continues from its last real token. Decoding stops at EOS or after
    ``max_new_tokens``. The model runs in eval mode under ``torch.no_grad`` and gets its training mode back.

    Args:
        model: a causal LM with ``generate`` (transformers or peft).
        tokenizer: its tokenizer; the EOS token stands in for a missing pad token.
        prompts: full prompt texts (tokenised with the tokenizer's special tokens) or token ids
            (:func:`grass_ft.data.tokenize.prompt_ids`, as training renders them).
        max_new_tokens: most tokens generated per prompt.
        batch_size: prompts per ``generate`` call.
        progress: show a tqdm bar over batches.

    Returns:
        One response per prompt, in order.
    """
    from transformers import GenerationConfig

    _check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size)
    pad_id = _pad_id(tokenizer)
    # An explicit config replaces the model's own (which may ask for sampling); greedy, no beams.
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=pad_id, eos_token_id=_eos_ids(model, tokenizer) or None)
    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"  # decoder-only models must continue right after the last real token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = _device(model)
    # batches of similar length waste less compute on padding; results do not depend on the grouping
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # characters or tokens: either groups
    out: list[str] = [""] * len(prompts)
    try:
        with _scoring(model):
            for start in _progress(len(prompts), batch_size, "generate", progress):
                idx = order[start:start + batch_size]
                rows = [p if isinstance(p, list) else tokenizer(p)["input_ids"] for p in (prompts[i] for i in idx)]
                enc = {k: v.to(device) for k, v in _left_pad(rows, pad_id).items()}
                seqs = model.generate(**enc, generation_config=gen_config)
                texts = tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for i, text in zip(idx, texts):
                    out[i] = text
    finally:
        tokenizer.padding_side = saved_side
        if saved_pad is None:
            tokenizer.pad_token = None
    return out


@contextmanager
def _scoring(model: torch.nn.Module):
    """The model in eval mode under ``torch.no_grad``; its training mode given back however scoring ends."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _progress(n: int, batch_size: int, desc: str, progress: bool):
    """The start of each batch of ``n`` items, under a tqdm bar (``progress``)."""
    return tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress)


def settle(examples: Sequence[dict[str, Any]], task: str | None) -> list[Example]:
    """The canonical examples of ``examples``: a loader's :class:`~grass_ft.data.examples.Example` as it is, a row
    written by hand normalised here, once (``task``: its task when it has no ``task`` key)."""
    return [ex if isinstance(ex, Example) else normalise(ex, task=task) for ex in examples]


def _rule(example: Example) -> str:
    """The example's task, which must have an answer rule."""
    if not example["_task"]:
        raise ValueError("an example has no 'task' key and no default task was given; pass task=<name>")
    return canonical_task(example["_task"])


def scorable(example: dict[str, Any]) -> bool:
    """Whether an example can be scored by generation: it has a prompt (not ``text``) and a gold answer."""
    ex = settle([example], None)[0]
    return ex["_format"] != "text" and bool(ex["answer"])


def choice_logprobs(model: torch.nn.Module, tokenizer, examples: Sequence[dict[str, Any]], task: str | None,
                    batch_size: int, progress: bool = True) -> list[dict[str, float]]:
    """Sum of token log-probabilities of each option's target after the prompt, per example.

    The target for label ``L`` is ``"the correct answer is L"`` followed by EOS (the LLM-Adapters commonsense
    training output). Options come from :func:`grass_ft.base.tasks.choices_for`.

    Returns:
        For each example, ``{label: log-probability}`` in option order.
    """
    _check_positive(batch_size=batch_size)
    examples = settle(examples, task)
    eos = tokenizer.eos_token_id
    rows: list[tuple[int, str, list[int], int]] = []  # (example index, label, ids, target length)
    for i, ex in enumerate(examples):
        t = _rule(ex)
        prompt = prompt_ids(ex, tokenizer)
        for label in choices_for(ex, t):
            target = tokenizer(choice_target(label), add_special_tokens=False)["input_ids"]
            target = target + ([eos] if eos is not None else [])
            rows.append((i, label, prompt + target, len(target)))
    scores: list[dict[str, float]] = [{} for _ in examples]
    pad_id, device = _pad_id(tokenizer), _device(model)
    with _scoring(model):
        for start in _progress(len(rows), batch_size, "score choices", progress):
            chunk = rows[start:start + batch_size]
            width = max(len(r[2]) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, (_, _, seq, _) in enumerate(chunk):  # right padding: real tokens keep positions 0..n-1
                ids[j, :len(seq)] = torch.tensor(seq)
                mask[j, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for j, (i, label, seq, n_target) in enumerate(chunk):
                end = len(seq)
                # logits at position p predict token p + 1
                lp = F.log_softmax(logits[j, end - n_target - 1:end - 1].float(), dim=-1)
                target = torch.tensor(seq[end - n_target:], device=lp.device)
                scores[i][label] = lp.gather(1, target[:, None]).sum().item()
    return scores


def score_choices(model: torch.nn.Module, tokenizer, examples: Sequence[dict[str, Any]], task: str | None,
                  batch_size: int, progress: bool = True) -> list[str]:
    """Log-likelihood predictions for multiple-choice examples.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        examples: examples of multiple-choice tasks.
        task: task for examples without a ``task`` key.
        batch_size: sequences (example x option) per forward pass.
        progress: show a tqdm bar.

    Returns:
        For each example, the target text of its best option (``"the correct answer is answer2"``), so that the
        task's answer rule reads the label back as for a generated response. Ties go to the first option.
    """
    return [choice_target(max(s, key=s.get)) for s in
            choice_logprobs(model, tokenizer, examples, task, batch_size, progress)]


def evaluate_examples(model: torch.nn.Module, tokenizer, examples: Sequence[dict[str, Any]],
                      task: str | None = None, *, mode: str = "generate", max_new_tokens: int = 256,
                      batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Accuracy of ``model`` on ``examples`` under LLM-Adapters' answer rules.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        examples: LLM-Adapters examples; a ``task`` key on an example overrides ``task``.
        task: default task name or alias.
        mode: ``generate`` (greedy decoding) or ``loglik`` (best option by log-likelihood).
        max_new_tokens: generation budget per example (``generate`` mode).
        batch_size: prompts per batch (``generate``) or sequences per forward pass (``loglik``).
        progress: show a tqdm bar.

    Returns:
        ``{"accuracy", "n", "per_task": {task: {"accuracy", "n"}}, "predictions": [...]}``; each prediction has
        ``prompt``, ``generated``, ``extracted``, ``gold``, ``correct`` and ``task``.

    Raises:
        ValueError: no examples, an unknown mode or task, a gold answer the rule cannot read, or (``loglik``) a
            task without answer options. All are checked before the model runs.
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {', '.join(MODES)}, got {mode!r}")
    if not examples:
        raise ValueError("no examples to evaluate")
    examples = settle(examples, task)
    tasks = [_rule(ex) for ex in examples]
    golds = [parse_gold(t, ex["answer"]) for t, ex in zip(tasks, examples)]
    if mode == "loglik":
        for t, ex in zip(tasks, examples):
            choices_for(ex, t)  # raises for tasks without options, before any compute
    prompts = [prompt_text(ex, tokenizer) for ex in examples]
    if mode == "generate":
        ids = [prompt_ids(ex, tokenizer, text) for ex, text in zip(examples, prompts)]  # rendered once, above
        generated = generate(model, tokenizer, ids, max_new_tokens, batch_size, progress)
    else:
        generated = score_choices(model, tokenizer, examples, None, batch_size, progress)
    predictions = []
    for prompt, text, t, gold in zip(prompts, generated, tasks, golds):
        extracted = extract_answer(t, text)
        predictions.append({"prompt": prompt, "generated": text, "extracted": extracted, "gold": gold,
                            "correct": answers_match(t, extracted, gold), "task": t})
    return {**summarize(predictions), "predictions": predictions}


def summarize(predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``accuracy``, ``n`` and ``per_task`` computed from prediction records."""
    per_task: dict[str, dict[str, Any]] = {}
    for p in predictions:
        d = per_task.setdefault(p["task"], {"correct": 0, "n": 0})
        d["correct"] += bool(p["correct"])
        d["n"] += 1
    n = len(predictions)
    correct = sum(d["correct"] for d in per_task.values())
    return {"accuracy": correct / n if n else 0.0, "n": n,
            "per_task": {t: {"accuracy": d["correct"] / d["n"], "n": d["n"]} for t, d in per_task.items()}}


def eval_loss(model: torch.nn.Module, tokenizer, examples: Sequence[dict[str, Any]], max_seq_len: int,
              batch_size: int, progress: bool = False) -> float:
    """Mean cross-entropy (nats per token) over the output tokens (plus EOS) of ``examples``.

    Prompt tokens are masked as in training (:func:`grass_ft.data.tokenize_example`); the mean is weighted by
    tokens across batches, so it does not depend on ``batch_size``.

    Raises:
        ValueError: no output token survives truncation to ``max_seq_len``.
    """
    return eval_loss_by_task(model, tokenizer, examples, max_seq_len, batch_size, progress)[0]


def eval_loss_by_task(model: torch.nn.Module, tokenizer, examples: Sequence[dict[str, Any]], max_seq_len: int,
                      batch_size: int, progress: bool = False,
                      task: str | None = None) -> tuple[float, dict[str, float]]:
    """:func:`eval_loss` over all ``examples`` and over each task's examples (``{task: nats/token}``).

    An example's task is its ``task`` key, else ``task``, else ``"default"``. Every mean is weighted by tokens,
    so the overall figure is the token-weighted mean of the per-task ones.
    """
    _check_positive(max_seq_len=max_seq_len, batch_size=batch_size)
    examples = settle(examples, task)
    features = [tokenize_example(tokenizer, ex, max_seq_len) for ex in examples]
    tasks = [ex["_task"] or "default" for ex in examples]
    pad_id, device = _pad_id(tokenizer), _device(model)
    sums: dict[str, list[float]] = {}  # task -> [summed loss, tokens]
    with _scoring(model):
        for start in _progress(len(features), batch_size, "eval loss", progress):
            batch = collate(features[start:start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            labels = batch["labels"][:, 1:].to(logits.device)
            # summed per example, not averaged, so that examples weigh by their tokens
            per_tok = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                      ignore_index=IGNORE_INDEX, reduction="none")
            loss_rows = per_tok.sum(dim=1).tolist()
            count_rows = (labels != IGNORE_INDEX).sum(dim=1).tolist()
            for t, loss_sum, n in zip(tasks[start:start + batch_size], loss_rows, count_rows):
                acc = sums.setdefault(t, [0.0, 0])
                acc[0] += loss_sum
                acc[1] += int(n)
    count = sum(n for _, n in sums.values())
    if count == 0:
        raise DataError(f"no output tokens to score: every example's prompt fills max_seq_len={max_seq_len}; "
                        f"raise max_seq_len")
    return (sum(v for v, _ in sums.values()) / count,
            {t: v / n for t, (v, n) in sums.items() if n > 0})
