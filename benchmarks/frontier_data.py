"""The frontier experiment's data (docs/RESULTS.md, "The frontier experiment"): GSM-style problems split by
template, the accuracy task, the forgetting set and the quantisation-noise model.

- **Templates.** reasoning-gym's ``gsm_symbolic`` draws each problem from one of 100 generator functions
  (``generate_<k>`` in ``generators_00_49.py`` / ``generators_50_99.py``); ``tasks_ok`` lists the 85 that it
  uses (``GSMSymbolicDataset.task_indices = Random(seed).choices(tasks_ok, k=size)``; problem ``idx`` is
  ``generators[task_indices[idx]](Random(seed + idx), difficulty)``). :func:`template_split` cuts those 85 by a
  fixed seeded permutation into 55 training, 15 validation and 15 test templates, and the reasoning-gym data set
  ``gsm_symbolic_split`` draws only from one part: a test problem's template never appears in training, so
  memorising templates does not count as generalising (the 200-update experiment's leak).
- **Accuracy task.** Single-digit arithmetic saturates (38 % as loaded, 86-98 % after 200 updates); the task
  here, two-term problems of one or two digits with ``+``, ``-`` and ``*`` (32 % as loaded), was picked by
  measuring the base model on candidates (``python benchmarks/frontier.py tasks``; :data:`ACC_TASK_NAME`).
- **Forgetting set.** 64 passages of general English prose the model is not fine-tuned on: paragraphs of the
  long descriptions that installed packages ship in their metadata, and of Python's own reference manual
  (``pydoc_data/topics.py``), committed in ``benchmarks/data/frontier_prose.jsonl`` with each passage's source
  and licence; runs check the file's hash (:data:`PROSE_SHA256`).
- **Quantisation noise.** SmolLM2's packaged weights are de-quantised Q4_1: in every 32-element block of a
  decoder block's linear weight the values are ``min + d * q`` with ``q`` in 0..15, so the step is
  ``d = (max - min) / 15`` and rounding to that grid leaves an error uniform on ``[-d/2, d/2]``, of standard
  deviation ``d / sqrt(12)``. :func:`add_q4_1_noise_` adds Gaussian noise of that size to each such block.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROSE_FILE = ROOT / "benchmarks" / "data" / "frontier_prose.jsonl"
PROSE_SHA256 = "d9db00796ee33952c6adb98396ecc4bee0b095c5fcaec53d448e3314f6acd54f"  # `frontier.py prose` prints it

SPLIT_SEED = 27  # issue 27
SPLIT_SIZES = {"train": 55, "validation": 15, "test": 15}
SPLIT_DATASET = "gsm_symbolic_split"


def gsm_templates() -> tuple[int, ...]:
    """The template ids reasoning-gym's ``gsm_symbolic`` draws from (its ``tasks_ok``)."""
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    return tuple(sorted(tasks_ok))


def template_split(templates: tuple[int, ...] | None = None, seed: int = SPLIT_SEED) -> dict[str, tuple[int, ...]]:
    """The templates cut into ``train`` / ``validation`` / ``test`` by a seeded permutation (sizes
    :data:`SPLIT_SIZES`; each part sorted)."""
    ids = sorted(gsm_templates() if templates is None else templates)
    if len(ids) != sum(SPLIT_SIZES.values()):
        raise ValueError(f"expected {sum(SPLIT_SIZES.values())} templates, got {len(ids)}: the split's sizes "
                         f"were fixed for reasoning-gym's 85; a new version needs a new protocol")
    random.Random(seed).shuffle(ids)
    out, start = {}, 0
    for part, n in SPLIT_SIZES.items():
        out[part] = tuple(sorted(ids[start:start + n]))
        start += n
    return out


def register() -> None:
    """Registers ``gsm_symbolic_split`` with reasoning-gym (once per process) and the training mix with
    :data:`grass_ft.data.GENERATORS`, so the library's own generator path builds every set."""
    import reasoning_gym.factory as factory
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import GSMSymbolicDataset, GSMSymbolicDatasetConfig

    from grass_ft import data

    if SPLIT_DATASET not in factory.DATASETS:
        @dataclass
        class SplitConfig(GSMSymbolicDatasetConfig):
            split: str = "train"

        class SplitDataset(GSMSymbolicDataset):
            """``gsm_symbolic`` drawing its templates from one part of :func:`template_split` only."""

            def __init__(self, config: SplitConfig):
                super().__init__(config)
                self.task_indices = random.Random(self.seed).choices(template_split()[config.split], k=self.size)

            def __getitem__(self, idx: int) -> dict:
                item = super().__getitem__(idx)
                item["metadata"]["template"] = self.task_indices[idx]
                return item

        factory.register_dataset(SPLIT_DATASET, SplitDataset, SplitConfig)
    data.GENERATORS[TRAIN_MIX] = ((SPLIT_DATASET, 0.25, {"split": "train"}), ("basic_arithmetic", 0.75, ACC_TASK))


# ------------------------------------------------------------------------------------------ accuracy task

# Candidates for a task whose accuracy is not saturated, all reasoning-gym basic_arithmetic / chain_sum
# (measured on the base model by `frontier.py tasks`; docs/RESULTS.md has the table and the choice).
_PLAIN = {"allow_parentheses": False, "allow_negation": False}
TASK_CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    "1-digit +*": ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                                        "operators": ("+", "*"), **_PLAIN}),
    "2-digit +-": ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2,
                                        "operators": ("+", "-"), **_PLAIN}),
    "1-2 digit +-*": ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
                                           "operators": ("+", "-", "*"), **_PLAIN}),
    "3 terms 1-digit +-*": ("basic_arithmetic", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1,
                                                 "operators": ("+", "-", "*"), **_PLAIN}),
}
# As loaded (`frontier.py tasks`, 100 problems each): 55 %, 7 %, 32 %, 7 %. Chosen on that measurement of the
# base model alone (no arm had run): the candidate between the floor (7 %, where a 135M model may not move in 500
# updates) and the single-digit task that saturates, with room to rise: 32 %.
ACC_TASK_NAME = "1-2 digit +-*"
ACC_TASK = TASK_CANDIDATES[ACC_TASK_NAME][1]
TRAIN_MIX = "frontier-mix"  # a quarter GSM-style problems of the training templates, three quarters the task


def split_examples(part: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` GSM-style problems of one template part (each with its template id under ``template``)."""
    from grass_ft.data import _rg_examples

    register()
    return _rg_examples(SPLIT_DATASET, n, seed, split=part)


# ------------------------------------------------------------------------------------------ forgetting set

PROSE_N = 64
PROSE_MIN_CHARS = 300
_NOT_PROSE = re.compile(r"```|>>>|^\s{2,}|\||https?:|\[|\]|<|>|\$|=|\{|\}|::|\*\*|_", re.M)


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of ``text`` that read as prose: long, mostly letters, no code, markup, tables or links; wrapped
    lines joined with single spaces."""
    out = []
    for p in re.split(r"\n\s*\n", text):
        p = p.strip()
        if len(p) < PROSE_MIN_CHARS or _NOT_PROSE.search(p):
            continue
        if sum(c.isalpha() or c.isspace() for c in p) / len(p) < 0.93 or not p.endswith((".", "!", "?")):
            continue
        out.append(" ".join(p.split()))
    return out


def extract_prose() -> list[dict[str, str]]:
    """The forgetting set, extracted afresh: half from installed packages' long descriptions (at most two
    paragraphs a package, packages in name order), half from Python's reference manual (at most two paragraphs a
    topic, topics in name order). Run once and committed; runs read the committed file."""
    import importlib.metadata as md

    import pydoc_data.topics

    half = PROSE_N // 2
    packages = []
    for dist in sorted(md.distributions(), key=lambda d: d.metadata["Name"].lower()):
        meta = dist.metadata
        body = meta.get_payload() or meta.get("Description") or ""
        licence = (meta.get("License-Expression") or meta.get("License") or "see package").splitlines()[0][:60]
        packages += [{"text": p, "source": f"{meta['Name']} {dist.version} (package metadata)", "license": licence}
                     for p in _prose_paragraphs(body)[:2]]
    manual = [{"text": p, "source": f"Python reference manual, topic {k!r} (pydoc_data)", "license": "PSF-2.0"}
              for k, v in sorted(pydoc_data.topics.topics.items()) for p in _prose_paragraphs(v)[:2]]
    chosen = packages[:half] + manual[:PROSE_N - min(half, len(packages))]
    if len(chosen) < PROSE_N:
        raise RuntimeError(f"only {len(chosen)} prose passages found (want {PROSE_N})")
    return chosen


def prose_bytes(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()


def prose_passages(path: Path = PROSE_FILE, sha256: str | None = None) -> list[str]:
    """The committed forgetting set's texts; raises when the file's hash is not the protocol's."""
    blob = path.read_bytes()
    want = PROSE_SHA256 if sha256 is None else sha256
    got = hashlib.sha256(blob).hexdigest()
    if got != want:
        raise RuntimeError(f"{path}: sha256 {got[:12]}… is not the protocol's {want[:12]}…: the forgetting set "
                           f"changed, so its losses would not compare with the ledger's")
    return [json.loads(line)["text"] for line in blob.decode().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ quantisation noise

Q_BLOCK = 32
Q4_1_LEVELS = 15  # 4 bits: q in 0..15


def q4_1_step(weight) -> Any:
    """Each 32-element block's Q4_1 step ``d = (max - min) / 15`` (one value per block), or None when the tensor
    does not lie on a Q4_1 grid (its values are not ``min + d * q`` with integer ``q``; fp32 norms and the
    Q8_0 embedding are not)."""
    import torch

    if weight.dim() != 2 or weight.numel() % Q_BLOCK:
        return None
    w = weight.detach().reshape(-1, Q_BLOCK).double()
    lo = w.min(dim=1, keepdim=True).values
    d = (w.max(dim=1, keepdim=True).values - lo) / Q4_1_LEVELS
    q = torch.where(d > 0, (w - lo) / d.clamp_min(1e-30), torch.zeros_like(w))
    # the grid's values are d*q + min computed in fp32 from fp16 d and min: off the integers by ~1e-6, not by 1e-3
    if float((q - q.round()).abs().max()) > 1e-3:
        return None
    return d.squeeze(1)


NOISE_SEED = 2027


def add_q4_1_noise_(model, seed: int = NOISE_SEED) -> dict[str, float]:
    """Adds Gaussian noise of the Q4_1 rounding error's size (sd ``d / sqrt(12)`` per 32-element block) to every
    weight that lies on a Q4_1 grid; returns the count of tensors and elements touched and the mean sd."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = elements = 0
    sd_sum = 0.0
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            d = q4_1_step(p)
            if d is None:
                continue
            sd = (d / math.sqrt(12)).to(p.dtype)
            noise = torch.randn(p.numel() // Q_BLOCK, Q_BLOCK, generator=gen, dtype=p.dtype) * sd[:, None]
            p.add_(noise.reshape(p.shape))
            tensors, elements, sd_sum = tensors + 1, elements + p.numel(), sd_sum + float(sd.sum()) * Q_BLOCK
    return {"tensors": tensors, "elements": elements, "mean_sd": sd_sum / max(1, elements)}
