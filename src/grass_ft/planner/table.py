"""The plan: every setting a user would consider, what it needs, whether it fits, and the one to run.

The order of preference among settings that fit (``method=auto``) is, until the quality-per-second experiment
(docs/RESULTS.md) decides otherwise: fft; fft with its optimizer state and masters on the host (``offload=true``);
the layer-wise default (``grass-uniform``, the embeddings and head trained) at the largest γ; the same with the
host-lean layout (``reset_state_on_switch=true``: the host keeps no Adam moments for undrawn blocks); the paper's
layout (embeddings and head frozen, the lowest peak) at the largest γ; LoRA at the largest rank. Within each,
without gradient checkpointing before with it (it costs a recomputed forward). Once the experiment has decided
(:data:`AUTO_ORDER_FROM_FRONTIER`), ``method=auto`` walks its order (:data:`FRONTIER_ORDER`) instead. ``gamma=auto``
alone (the method given) takes the largest γ of that method that fits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig
from ..base.errors import UserError
from ..base.registry import DEFAULT_SAMPLING, traits
from .compute import step_cost
from .memory import CATEGORIES, Prediction, Setting, predict
from .profile import Profile, RunProfile, measure
from .shape import ModelShape, load_model_config, model_shape
from .sizes import GiB, Budgets

LORA_RANKS = (8, 16, 32, 64, 128)
DEFAULT_MARGIN = 0.10


class NothingFits(UserError, RuntimeError):
    """No setting of the plan fits the budgets."""


@dataclass
class Row:
    setting: Setting
    prediction: Prediction
    cost: float
    fits: bool
    device_margin: int  # budget (less the safety margin) minus need; negative: short by that much
    host_margin: int
    family: str
    lisa_long_run: bool = False

    def to_json(self) -> dict:
        s, p = self.setting, self.prediction
        return {"label": s.label, "family": self.family, "method": s.method,
                "gamma": s.gamma if s.sampling else None, "lora_r": s.lora_r if s.adapters else None,
                "offload": s.offload, "master_weights": s.master_weights,
                "gradient_checkpointing": s.gradient_checkpointing, "train_embeddings": s.train_embeddings,
                "train_head": s.train_head, "reset_state_on_switch": s.reset_state_on_switch,
                "lisa_long_run": self.lisa_long_run,
                "device_gib": round(p.device / GiB, 3), "host_gib": round(p.host / GiB, 3),
                "host_resident_gib": round(p.host_resident / GiB, 3), "host_load_gib": round(p.host_load / GiB, 3),
                "host_finish_gib": round(p.host_finish / GiB, 3),
                "device_parts_gib": {k: round(v / GiB, 3) for k, v in p.parts.items()}, "peak_phase": p.phase,
                "step_cost_vs_fft": round(self.cost, 3), "transfer_gib_per_step": round(p.transfer_bytes / GiB, 3),
                "trained_params": p.trained_numel, "fits": self.fits,
                "device_margin_gib": round(self.device_margin / GiB, 3),
                "host_margin_gib": round(self.host_margin / GiB, 3), "overrides": s.overrides()}


@dataclass
class Plan:
    model: str
    shape: ModelShape
    budgets: Budgets
    margin: float
    rows: list[Row]
    recommended: Row | None
    world_size: int = 1
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        b = self.budgets
        return {"model": self.model, "num_blocks": self.shape.num_blocks, "params": self.shape.numel,
                "world_size": self.world_size,
                "device_memory_gib": round(b.device / GiB, 3), "device_memory_source": b.device_source,
                "host_memory_gib": round(b.host / GiB, 3), "host_memory_source": b.host_source, "margin": self.margin,
                "rows": [r.to_json() for r in self.rows],
                "recommended": self.recommended.setting.overrides() if self.recommended else None,
                "recommended_label": self.recommended.setting.label if self.recommended else None,
                "notes": self.notes}


# ------------------------------------------------------------------------------------------------ profiles


def _profile_cache() -> Path:
    return Path(os.environ.get("GRASS_FT_CACHE", Path.home() / ".cache" / "grass-ft")) / "plan"


def profile_for(config, cfg: TrainConfig, checkpointing: bool, adapters: bool) -> Profile:
    """The measured profile of ``config`` at the run's batch, length, dtype and loss (cached on disk: the fake
    runs take a second or two, the cache file a millisecond)."""
    import transformers

    key = json.dumps({"config": config.to_dict(), "batch": cfg.batch_size, "seq": cfg.max_seq_len,
                      "dtype": cfg.dtype, "loss": cfg.supervised_only_loss, "ckpt": checkpointing,
                      "adapters": adapters, "targets": cfg.lora_target_modules, "dropout": cfg.lora_dropout,
                      "layers": cfg.layers_attribute, "torch": torch.__version__,
                      "transformers": transformers.__version__, "v": 1}, sort_keys=True, default=str)
    path = _profile_cache() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            runs = {k: RunProfile(**v) if isinstance(v, dict) else v for k, v in d.items()}
            return Profile(**runs)
        except (OSError, ValueError, TypeError):
            pass
    from ..config import lora_targets

    prof = measure(config, cfg.batch_size, cfg.max_seq_len, dtype=getattr(torch, cfg.dtype),
                   supervised_only=cfg.supervised_only_loss, checkpointing=checkpointing,
                   layers_attribute=cfg.layers_attribute, adapters=("lora", "dora") if adapters else (),
                   lora_dropout=cfg.lora_dropout, lora_targets=lora_targets(cfg.lora_target_modules))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(prof.to_dict()))
        tmp.replace(path)
    except OSError:
        pass
    return prof


# ------------------------------------------------------------------------------------------------ settings


def _settings(cfg: TrainConfig, shape: ModelShape, ckpts: tuple[bool, ...],
              world_size: int) -> list[tuple[str, Setting, bool]]:
    """``(family, setting, lisa_long_run)`` for every row of the plan."""
    common = dict(master_weights=cfg.master_weights, supervised_only_loss=cfg.supervised_only_loss, dtype=cfg.dtype,
                  world_size=world_size, fsdp=cfg.fsdp)
    L = shape.num_blocks
    layer = cfg.method if cfg.method not in ("auto", "fft", "lora", "dora", "lisa") else DEFAULT_SAMPLING
    gammas = [cfg.gamma] if isinstance(cfg.gamma, int) else list(range(1, L + 1))
    out: list[tuple[str, Setting, bool]] = []
    for ck in ckpts:
        tag = " + gradient checkpointing" if ck and not cfg.gradient_checkpointing else ""
        out.append(("fft", Setting(method="fft", gradient_checkpointing=ck, label=f"fft{tag}", **common), False))
        out.append(("fft-offload", Setting(method="fft", offload=True, gradient_checkpointing=ck,
                                           label=f"fft, optimizer on the host{tag}", **common), False))
        layouts = [("layer-wise", cfg.train_embeddings, cfg.train_head, False),
                   ("layer-wise host-lean", cfg.train_embeddings, cfg.train_head, True)]
        if cfg.train_embeddings or cfg.train_head:
            layouts += [("paper layout", False, False, False), ("paper layout host-lean", False, False, True)]
        for family, emb, head, lean in layouts:
            for g in gammas:
                off = True if cfg.offload is None else cfg.offload
                if lean and not off:
                    continue
                what = ("embeddings/head trained" if emb or head else "embeddings/head frozen") + \
                    (", host-lean" if lean else "")
                out.append((family, Setting(method=layer, gamma=g, offload=off, train_embeddings=emb, train_head=head,
                                            reset_state_on_switch=lean, gradient_checkpointing=ck,
                                            label=f"{layer} gamma={g} ({what}){tag}", **common), False))
        g = cfg.gamma if isinstance(cfg.gamma, int) else min(4, L)
        for long_run in (False, True):
            out.append(("lisa", Setting(method="lisa", gamma=g, gradient_checkpointing=ck,
                                        label=f"lisa gamma={g} as shipped, {'long run' if long_run else 'first draw'}"
                                              f"{tag}", **common), long_run))
        for kind in () if cfg.fsdp else ("lora", "dora"):  # peft adapters are not sharded (registry: fsdp)
            for r in LORA_RANKS:
                out.append((kind, Setting(method=kind, lora_r=r, gradient_checkpointing=ck,
                                          label=f"{kind} r={r}{tag}", **common), False))
        if cfg.method == "auto" and AUTO_ORDER_FROM_FRONTIER:
            for entry in FRONTIER_ORDER:
                if (layer_row := frontier_layerwise(entry, L)) is not None:
                    method, gamma, lean = layer_row
                    if cfg.fsdp and not traits(method).fsdp:
                        continue
                    out.append((entry, Setting(method=method, gamma=gamma, offload=traits(method).offload,
                                               reset_state_on_switch=lean, gradient_checkpointing=ck,
                                               label=f"{method} gamma={gamma}{', host-lean' if lean else ''} "
                                                     f"(frontier: {entry}){tag}", **common), method == "lisa"))
    return out


def build_plan(cfg: TrainConfig, budgets: Budgets, world_size: int = 1, margin: float = DEFAULT_MARGIN,
               config=None) -> Plan:
    """Every row, its prediction and fit, and the recommended setting (None when nothing fits). ``dtype=auto`` is
    priced as the dtype a run on this machine trains in (:func:`grass_ft.model.load.resolve_dtype`: float32 on a CPU;
    give dtype=bfloat16 to plan a GPU run from a CPU-only machine)."""
    if cfg.dtype == "auto":
        from ..model.load import resolve_dtype

        here = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cfg = dataclasses.replace(cfg, dtype=resolve_dtype("auto", here))
    config = config if config is not None else load_model_config(cfg.model)
    shape = model_shape(config, cfg.layers_attribute)
    if isinstance(cfg.gamma, int) and not 1 <= cfg.gamma <= shape.num_blocks:
        from ..config import ConfigError

        raise ConfigError([f"`gamma` must be between 1 and {shape.num_blocks} (the model has {shape.num_blocks} "
                           f"decoder blocks), got {cfg.gamma}"])
    ckpts = (True,) if cfg.gradient_checkpointing else (False, True)
    profiles = {ck: profile_for(config, cfg, ck, adapters=True) for ck in ckpts}
    rows = []
    usable_dev = int(budgets.device * (1 - margin))
    usable_host = int(budgets.host * (1 - margin))
    for family, s, long_run in _settings(cfg, shape, ckpts, world_size):
        p = predict(shape, profiles[s.gradient_checkpointing], s, drawn_blocks=None if long_run else 0)
        if family == "lisa" and not long_run:  # the first draw: state for the drawn blocks only
            pass
        dev_margin, host_margin = usable_dev - p.device, usable_host - p.host
        fits = dev_margin >= 0 and host_margin >= 0
        if budgets.shared is not None:
            fits = fits and p.device + p.host_resident <= budgets.shared * (1 - margin)
        rows.append(Row(s, p, step_cost(shape, s, cfg.max_seq_len), fits, dev_margin, host_margin, family, long_run))
    plan = Plan(cfg.model, shape, budgets, margin, rows, None, world_size)
    plan.recommended = recommend(plan, cfg)
    return plan


# The frontier experiment (docs/RESULTS.md, rule 1 and the amendments of 2026-12-07) decides method=auto's order; until
# every main arm has its three seeds at equal time, the interim order below holds. tests/test_frontier_harness.py
# fails once the committed ledger has decided while this is still False: the change that brings the deciding
# records copies the order `make frontier` prints (docs/results/frontier.md) into FRONTIER_ORDER and sets it True.
AUTO_ORDER_FROM_FRONTIER = False
# Rule 1's order of SmolLM2-135M settings, best first: "fft", "<arm> gamma=<γ or all>", "lora r=<r>"; arms as in
# benchmarks/frontier_protocol.py (grass-uniform-reset: grass-uniform with reset_state_on_switch=true).
FRONTIER_ORDER: tuple[str, ...] = ()
FRONTIER_BLOCKS = 30  # SmolLM2-135M's decoder blocks, on which the order's γ were measured
_FRONTIER_ARMS = {"grass-uniform": ("grass-uniform", False), "grass": ("grass", False), "badam": ("badam", False),
                  "lisa": ("lisa", False), "grass-uniform-reset": ("grass-uniform", True)}


def frontier_gamma(gamma: int, num_blocks: int) -> int:
    """γ of a SmolLM2-135M setting read on a model of ``num_blocks`` blocks (docs/RESULTS.md, second amendment):
    max(1, round(γ · L / 30)), at most L; γ = all (30) → L."""
    if gamma == FRONTIER_BLOCKS:
        return num_blocks
    return max(1, min(num_blocks, round(gamma * num_blocks / FRONTIER_BLOCKS)))


def frontier_layerwise(entry: str, num_blocks: int) -> tuple[str, int, bool] | None:
    """A layer-wise entry of :data:`FRONTIER_ORDER` read on a model of ``num_blocks`` blocks: (method,
    :func:`frontier_gamma`, host-lean); None for fft and LoRA."""
    arm, _, rest = entry.partition(" gamma=")
    if arm not in _FRONTIER_ARMS:
        return None
    method, lean = _FRONTIER_ARMS[arm]
    return method, frontier_gamma(FRONTIER_BLOCKS if rest == "all" else int(rest), num_blocks), lean


def _frontier_rows(plan: Plan, entry: str) -> list[list[Row]]:
    """The rows that stand for one entry of the order, in the order they are tried: fft → fft, then fft with its
    optimizer on the host; LoRA at rank r; a layer-wise setting → its own rows (:func:`_settings`)."""
    if entry == "fft":
        return [[r for r in plan.rows if r.family == fam] for fam in ("fft", "fft-offload")]
    if entry.startswith("lora r="):
        return [[r for r in plan.rows if r.family == "lora" and r.setting.lora_r == int(entry[len("lora r="):])]]
    return [[r for r in plan.rows if r.family == entry]]


def _preference(cfg: TrainConfig) -> list[str]:
    if cfg.method == "auto":
        return ["fft", "fft-offload", "layer-wise", "layer-wise host-lean", "paper layout", "paper layout host-lean",
                "lora"]
    if traits(cfg.method).sampling:
        return ["layer-wise"] if cfg.method != "lisa" else ["lisa"]
    return [cfg.method]


def recommend(plan: Plan, cfg: TrainConfig) -> Row | None:
    """The first family in the order of preference with a row that fits: its largest γ (or rank), without
    gradient checkpointing if that fits (with ``method=auto`` it may be turned on; otherwise the run's own).
    Once the frontier has decided (:data:`AUTO_ORDER_FROM_FRONTIER`), ``method=auto`` walks its order instead and
    takes the first setting that fits, without gradient checkpointing where that fits."""
    if cfg.method == "auto" and AUTO_ORDER_FROM_FRONTIER:
        for entry in FRONTIER_ORDER:
            for rows in _frontier_rows(plan, entry):
                if fitting := [r for r in rows if r.fits]:
                    return min(fitting, key=lambda r: r.setting.gradient_checkpointing)
        return None
    for family in _preference(cfg):
        fitting = [r for r in plan.rows if r.family == family and r.fits and not r.lisa_long_run
                   and (cfg.method == "auto" or r.setting.gradient_checkpointing == cfg.gradient_checkpointing)]
        if cfg.method not in ("auto",) and traits(cfg.method).sampling:
            fitting = [r for r in fitting if r.setting.reset_state_on_switch == cfg.reset_state_on_switch]
        if fitting:
            def capacity(r: Row):
                return (r.setting.gamma or 0, r.setting.lora_r or 0, not r.setting.gradient_checkpointing)
            return max(fitting, key=capacity)
    return None


def smallest(plan: Plan) -> Row:
    """The row with the lowest device need (a long-run LISA row aside)."""
    return min((r for r in plan.rows if not r.lisa_long_run), key=lambda r: (r.prediction.device, r.prediction.host))


def nothing_fits_message(plan: Plan, cfg: TrainConfig) -> str:
    low = smallest(plan)
    b = plan.budgets
    return (f"no setting of model {cfg.model} fits device_memory={b.device / GiB:.1f}GiB ({b.device_source}) and "
            f"host_memory={b.host / GiB:.1f}GiB ({b.host_source}) with the {plan.margin:.0%} margin; the smallest, "
            f"{_cmd(low.setting)}, needs {low.prediction.device / GiB:.1f} GiB on the device and "
            f"{low.prediction.host / GiB:.1f} GiB on the host (lower batch_size or max_seq_len; `grass-ft plan` lists "
            f"every setting)")


def _cmd(s: Setting) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in s.overrides().items())


# ------------------------------------------------------------------------------------------------ rendering


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def render(plan: Plan, cfg: TrainConfig, every_gamma: bool = False) -> str:
    """The plan as a text table (γ rows thinned to 1, 2, 4, ... and the largest fitting unless ``every_gamma``),
    ending with the recommended command line."""
    b = plan.budgets
    L = plan.shape.num_blocks
    lines = [f"grass-ft plan: {cfg.model} ({plan.shape.model_type}, {plan.shape.numel / 1e9:.2f}B parameters, "
             f"{L} blocks), {cfg.dtype}, batch {cfg.batch_size} x {cfg.max_seq_len} tokens"
             + (f", {plan.world_size} processes (fsdp)" if cfg.fsdp else ""),
             f"device {b.device / GiB:.1f} GiB ({b.device_source}), host {b.host / GiB:.1f} GiB ({b.host_source}); "
             f"a setting fits with {plan.margin:.0%} of each to spare",
             "", f"{'setting':<62} {'device GiB':>10}  {'= W + G + opt + mst + act + tmp':<33} {'host GiB':>8} "
                 f"{'compute':>7}  fits"]
    keep = {r.setting.gamma for r in plan.rows if r.setting.gamma} if every_gamma else \
        {g for g in range(1, L + 1) if g & (g - 1) == 0} | {L}
    best = {}
    for r in plan.rows:
        if r.fits and r.setting.gamma:
            k = (r.family, r.setting.gradient_checkpointing)
            best[k] = max(best.get(k, 0), r.setting.gamma)
    for r in plan.rows:
        s, p = r.setting, r.prediction
        if s.sampling and s.method != "lisa" and s.gamma not in keep \
                and s.gamma != best.get((r.family, s.gradient_checkpointing)):
            continue
        parts = " + ".join(_gib(p.parts[c]) for c in CATEGORIES)
        fit = ("yes" if r.fits else "no") + f" ({_gib(min(r.device_margin, r.host_margin))})"
        mark = "*" if r is plan.recommended else " "
        lines.append(f"{mark}{s.label[:61]:<61} {_gib(p.device):>10}  {parts:<33} {_gib(p.host):>8} "
                     f"{r.cost:>6.2f}x  {fit}")
    lines += ["", "W weights, G gradients, opt Adam moments, mst fp32 masters, act activations, tmp temporaries (GiB, "
                  "at the peak); host: the optimizer's host state (or the weights while they load); compute: one "
                  "step's matmul work / fft's; fits (margin GiB). Layer-wise rows are priced at their worst draw.",
              "Predicted, not measured: within 5% of the FakeTensor estimator on the paper's models (docs/PLAN.md)."]
    if plan.recommended is not None:
        lines += ["", f"recommended ({plan.recommended.setting.label}):",
                  f"  grass-ft train model={cfg.model} {_cmd(plan.recommended.setting)}"]
    else:
        lines += ["", nothing_fits_message(plan, cfg)]
    return "\n".join(lines)
