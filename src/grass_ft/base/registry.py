"""The method registry's table: every method's name and what it can do, in one place.

How a method prepares a model (its builder) is registered in :mod:`grass_ft.method.methods` under one of these names;
everything that asks what a method *can do* — config validation, the CLI, the HF callback, reports, benchmarks —
reads it here. This module imports nothing from grass_ft, so the lowest modules (config) can use it; adding a
method is one row here and one ``@register_method`` builder there (methods.py checks that the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

SAMPLING_KINDS = ("adaptive", "static", "uniform", "cyclic")


@dataclass(frozen=True)
class MethodTraits:
    """What a method can do.

    Attributes:
        sampling: how decoder blocks are drawn — ``adaptive`` (MGN from a probe, refreshed by an EMA: GRASS),
            ``static`` (probe only: GRASS*), ``uniform`` (no probe), ``cyclic`` (blocks in order, γ at a time:
            BAdam) — or None for no layer sampling.
        fsdp: can shard with FSDP2 (``fsdp=true``); a peft-wrapped model cannot yet.
        offload: the default of ``offload``: block optimizer state on the host between steps.
        lr: the default of ``lr``: the method's best rate in the 200-update experiment (docs/DEFAULTS.md).
    """

    sampling: str | None = None
    fsdp: bool = False
    offload: bool = False
    lr: float = 3e-4

    def __post_init__(self) -> None:
        assert self.sampling is None or self.sampling in SAMPLING_KINDS, self.sampling

    @property
    def measures(self) -> bool:
        """Reads block importance from gradients (a measuring probe; probe_steps, tau, probe_mode apply)."""
        return self.sampling in ("adaptive", "static")

    @property
    def refreshes(self) -> bool:
        """Refreshes the importance while training (alpha, update_interval, importance=relative apply)."""
        return self.sampling == "adaptive"


# The order is the order error messages and help lines list the methods in.
# Rates: the frontier experiment's seed-1 validation grids (docs/RESULTS.md; 500 updates, 5 % warm-up then cosine,
# the default schedule): FFT's, grass-uniform's for every layer-wise method, LoRA's (DoRA, not measured, takes it).
METHODS: dict[str, MethodTraits] = {
    "grass": MethodTraits("adaptive", fsdp=True, offload=True, lr=3e-5),
    "grass-static": MethodTraits("static", fsdp=True, offload=True, lr=3e-5),
    "lisa": MethodTraits("uniform", fsdp=True, lr=3e-5),  # as shipped: torch AdamW, state on the device
    "fft": MethodTraits(fsdp=True, lr=1e-5),
    "lora": MethodTraits(lr=1e-4),  # peft adapters: not sharded yet
    "dora": MethodTraits(lr=1e-4),
    "grass-uniform": MethodTraits("uniform", fsdp=True, offload=True, lr=3e-5),
    # BAdam's block order (Luo et al., 2024), a peer users run: blocks in order, moments restarted at each switch;
    # not in the 200-update experiment, so grass-uniform's rate (same parameters, same optimizer); FSDP2 not
    # claimed until a two-process test runs it
    "badam": MethodTraits("cyclic", offload=True, lr=3e-5),
}
# GrassCallback's default `method` (it only samples): the best sampling arm of the 200-update experiment.
DEFAULT_SAMPLING = "grass-uniform"


def traits(method: str) -> MethodTraits:
    """The traits of ``method``; an unknown name has none (validation reports it as unknown)."""
    return METHODS.get(method, MethodTraits())


def with_sampling() -> tuple[str, ...]:
    """The methods that draw decoder blocks (and so take gamma, sample_interval and GrassCallback)."""
    return tuple(m for m, t in METHODS.items() if t.sampling)


def with_fsdp() -> tuple[str, ...]:
    return tuple(m for m, t in METHODS.items() if t.fsdp)
