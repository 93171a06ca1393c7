"""Which decoder blocks train: uniform (LISA), static (GRASS*) and adaptive (GRASS) layer sampling.

Functional core (pure, unit-tested without a model): :func:`normalize_mgn`, :func:`softmax_probs`,
:func:`draw`, :func:`ema`; :class:`LayerSampler` holds the state and the schedule.

Normalisation. Raw MGN values are tiny (1e-4…1e-2), so a softmax over them is uniform at any sensible τ. We
divide by the mean, ``z = m / mean(m)``: z is scale-free (mean 1), so τ means the same on every model and at
every point of training; a block twice as important as average has z = 2 and, at τ = 1, e¹ ≈ 2.7 times the
odds of an average block.

Drawing. γ distinct blocks are drawn without replacement with probability proportional to p (successive
draws, Plackett-Luce), implemented as Gumbel-top-k on log p: exact, stable as τ → 0 (where it becomes top-γ),
and driven by one seeded generator so that every process draws the same set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .importance import MGNWindow

KINDS = ("adaptive", "static", "uniform")


def normalize_mgn(mgn: torch.Tensor) -> torch.Tensor:
    """``z = m / mean(m)``; all-ones when the MGN is all zero (nothing measured yet)."""
    mgn = mgn.double()
    mean = mgn.mean()
    return mgn / mean if mean > 0 else torch.ones_like(mgn)


def log_probs(mgn: torch.Tensor, tau: float) -> torch.Tensor:
    """``log softmax(z / τ)`` of the normalised MGN."""
    return torch.log_softmax(normalize_mgn(mgn) / tau, dim=0)


def softmax_probs(mgn: torch.Tensor, tau: float) -> torch.Tensor:
    """Sampling probabilities ``p = softmax(z / τ)``; τ → ∞ gives uniform, τ → 0 puts all mass on the top."""
    return log_probs(mgn, tau).exp()


def draw(logp: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """``k`` distinct block ids drawn without replacement with probability ∝ exp(logp), sorted ascending."""
    if not 1 <= k <= logp.numel():
        raise ValueError(f"cannot draw {k} distinct blocks out of {logp.numel()}")
    u = torch.rand(logp.shape, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
    gumbel = -torch.log(-torch.log(u))
    return sorted(torch.topk(logp.double() + gumbel, k).indices.tolist())


def ema(old: torch.Tensor, new: torch.Tensor, alpha: float, observed: torch.Tensor) -> torch.Tensor:
    """``alpha * new + (1 - alpha) * old`` where ``observed``; ``old`` elsewhere."""
    return torch.where(observed, alpha * new + (1 - alpha) * old, old)


@dataclass
class LayerSampler:
    """Draw schedule and importance state of one run.

    Steps are counted from 0 and probe steps count. Steps ``0 .. probe_steps-1`` probe (every block gets a
    gradient, nothing updates). At step ``probe_steps`` the probe's MGN becomes ``mgn`` and the first draw
    happens; then a draw every ``sample_interval`` steps and, for ``adaptive``, a refresh every
    ``update_interval`` steps (a refresh falling on a draw step comes first, so the draw uses it).
    ``uniform`` (LISA) has no probe and draws from step 0.
    """

    kind: str
    num_blocks: int
    gamma: int
    tau: float = 1.0
    alpha: float = 0.5
    probe_steps: int = 0
    sample_interval: int = 10
    update_interval: int = 20
    seed: int = 0
    mgn: torch.Tensor = field(init=False)
    probs: torch.Tensor = field(init=False)
    active: list[int] = field(init=False, default_factory=list)
    window: MGNWindow = field(init=False)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"sampler kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "uniform":
            self.probe_steps = 0
        self.mgn = torch.zeros(self.num_blocks, dtype=torch.float64)
        self.probs = torch.full((self.num_blocks,), 1.0 / self.num_blocks, dtype=torch.float64)
        self.window = MGNWindow(self.num_blocks)
        self.generator = torch.Generator().manual_seed(self.seed)

    # ---------------------------------------------------------------------------------------- schedule

    def in_probe(self, step: int) -> bool:
        return step < self.probe_steps

    def begin_step(self, step: int) -> list[dict]:
        """Advance the schedule to the start of ``step``; returns the events (probe/refresh/draw) it caused."""
        events: list[dict] = []
        if self.in_probe(step):
            return events
        since = step - self.probe_steps
        if since == 0 and self.probe_steps > 0:
            self.mgn = self.window.mean()
            self.window.reset()
            self._set_probs()
            events.append(self._event(step, "probe"))
        elif self.kind == "adaptive" and since > 0 and since % self.update_interval == 0:
            observed = self.window.observed()
            self.mgn = ema(self.mgn, self.window.mean(), self.alpha, observed)
            self.window.reset()
            self._set_probs()
            events.append(self._event(step, "refresh"))
        if since % self.sample_interval == 0:
            logp = torch.log(self.probs) if self.kind == "uniform" else log_probs(self.mgn, self.tau)
            self.active = draw(logp, self.gamma, self.generator)
            events.append(self._event(step, "draw"))
        return events

    def _set_probs(self) -> None:
        if self.kind != "uniform":
            self.probs = softmax_probs(self.mgn, self.tau)

    def observe(self, rms: dict[int, float]) -> None:
        """Record one step's gradient RMS of the blocks that had gradients (probe: all; later: the active)."""
        if self.kind == "uniform":
            return
        self.window.add(rms)

    @property
    def records_importance(self) -> bool:
        """Whether gradient RMS is measured after the probe (only adaptive GRASS uses it)."""
        return self.kind == "adaptive"

    def _event(self, step: int, name: str) -> dict:
        return {"step": step, "event": name, "active": list(self.active) if name == "draw" else [],
                "mgn": [float(x) for x in self.mgn], "probs": [float(x) for x in self.probs]}

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"kind": self.kind, "mgn": self.mgn.clone(), "probs": self.probs.clone(),
                "active": list(self.active), "window": self.window.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"sampler state is for kind {state['kind']!r}, this run uses {self.kind!r}")
        self.mgn = state["mgn"].clone().double()
        self.probs = state["probs"].clone().double()
        self.active = [int(b) for b in state["active"]]
        self.window.load_state_dict(state["window"])
        self.generator.set_state(state["generator"])
