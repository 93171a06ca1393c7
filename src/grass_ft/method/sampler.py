"""Which decoder blocks train: uniform (LISA), static (GRASS*), adaptive (GRASS) layer sampling, and BAdam's
cyclic order.

Functional core (pure, unit-tested without a model): :func:`normalize_mgn`, :func:`softmax_probs`,
:func:`draw`, :func:`cyclic_group`, :func:`ema`; :class:`LayerSampler` holds the state and the schedule.

Cyclic order (``cyclic``, ``method=badam``). BAdam (Luo et al., 2024) trains one block at a time and moves to
the next one in order every K steps; here γ blocks at a time: draw k trains blocks ``kγ .. kγ+γ-1`` modulo the
number of blocks, so every block is visited once per ⌈blocks/γ⌉ draws whatever the seed. The order is a pure
function of the step, so a resumed run continues the cycle where it stopped.

Normalisation. Raw MGN values are tiny (1e-4…1e-2), so a softmax over them is uniform at any sensible τ. We
divide by the mean, ``z = m / mean(m)``: z is scale-free (mean 1), so τ means the same on every model and at
every point of training; a block twice as important as average has z = 2 and, at τ = 1, e¹ ≈ 2.7 times the
odds of an average block.

Drawing. γ distinct blocks are drawn without replacement with probability proportional to p (successive
draws, Plackett-Luce), implemented as Gumbel-top-k on log p: exact, stable as τ → 0 (where it becomes top-γ),
and driven by one seeded generator so that every process draws the same set.

Probe modes (``probe_mode``). ``measure`` is the paper's probe: ``probe_steps`` forward/backward passes in
which every block gets a gradient and nothing updates. ``train`` wastes no update: the first steps visit the
blocks γ at a time in a seeded random permutation (every block once; the last group is filled up with blocks
drawn from the others so that every step trains γ blocks), each group trained for ``probe_steps`` steps while
its gradient RMS is read; importance sampling then starts from those readings. Only γ blocks have gradients at
any step, as in the training phase. One caveat: the groups are read at different points of training (gradients
usually shrink as training goes on), so a block visited late reads lower than it would have at step 0; the
permutation is random per seed, so this is noise, not a bias toward particular blocks.

Importance metrics (``importance``). ``mgn`` is the paper's: the EMA of each block's MGN. ``relative``
divides it by the block's own probe reading, ``s_l = m_l / m_l(probe)``: how far a block's gradient has fallen
since the probe, i.e. how much of what it could learn it has learnt. Why (docs/RESULTS.md, "Why these two
improvements"): under Adam the size of an update does not depend on the gradient's scale, so the cross-block spread of
raw MGN (larger near the output, shaped by depth and the residual stream) says little about where an update pays
off, yet it makes the same high-MGN blocks redrawn while others are never trained (12–14 of 30 blocks in 20
steps). The relative score is 1 for every block at the first draw (a uniform first draw), falls for blocks that
have been trained and fitted, and stays at 1 for blocks not trained since the probe: it favours coverage and
blocks still far from fitted. With GRASS* (no refresh) it is uniform throughout, so it is meant for ``grass``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .importance import MGNWindow

KINDS = ("adaptive", "static", "uniform", "cyclic")
PROBE_MODES = ("measure", "train")
IMPORTANCE = ("mgn", "relative")


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


def cyclic_group(k: int, gamma: int, num_blocks: int) -> list[int]:
    """The blocks of cyclic draw ``k``: ``kγ .. kγ+γ-1`` modulo ``num_blocks`` (wrapping), sorted ascending."""
    if not 1 <= gamma <= num_blocks:
        raise ValueError(f"cannot draw {gamma} distinct blocks out of {num_blocks}")
    return sorted({(k * gamma + i) % num_blocks for i in range(gamma)})


def ema(old: torch.Tensor, new: torch.Tensor, alpha: float, observed: torch.Tensor) -> torch.Tensor:
    """``alpha * new + (1 - alpha) * old`` where ``observed``; ``old`` elsewhere."""
    return torch.where(observed, alpha * new + (1 - alpha) * old, old)


@dataclass
class LayerSampler:
    """Draw schedule and importance state of one run.

    Steps are counted from 0 and probe steps count. With ``probe_mode="measure"``, steps
    ``0 .. probe_steps-1`` probe (every block gets a gradient, nothing updates). With ``probe_mode="train"``,
    steps ``0 .. sweep_steps-1`` train the sweep's groups of γ blocks, ``probe_steps`` steps each, and their
    gradient RMS is recorded. At the end of either (step :attr:`start`) the readings become ``mgn`` and the first
    importance draw happens; then a draw every ``sample_interval`` steps and, for ``adaptive``, a refresh every
    ``update_interval`` steps (a refresh falling on a draw step comes first, so the draw uses it).
    ``uniform`` (LISA, the uniform control) and ``cyclic`` (BAdam's order) have no probe and draw from step 0.
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
    probe_mode: str = "measure"
    importance: str = "mgn"
    mgn: torch.Tensor = field(init=False)
    reference: torch.Tensor = field(init=False)
    probs: torch.Tensor = field(init=False)
    active: list[int] = field(init=False, default_factory=list)
    sweep: list[list[int]] = field(init=False, default_factory=list)
    window: MGNWindow = field(init=False)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"sampler kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.probe_mode not in PROBE_MODES:
            raise ValueError(f"probe_mode must be one of {', '.join(PROBE_MODES)}, got {self.probe_mode!r}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if not self.measures:
            self.probe_steps = 0
        self.mgn = torch.zeros(self.num_blocks, dtype=torch.float64)
        self.reference = torch.ones(self.num_blocks, dtype=torch.float64)
        self.probs = torch.full((self.num_blocks,), 1.0 / self.num_blocks, dtype=torch.float64)
        self.window = MGNWindow(self.num_blocks)
        self.generator = torch.Generator().manual_seed(self.seed)
        if self.probe_mode == "train" and self.probe_steps > 0:
            self.sweep = sweep_groups(self.num_blocks, self.gamma, self.generator)

    # ---------------------------------------------------------------------------------------- schedule

    @property
    def measures(self) -> bool:
        """Whether draws follow measured importance (GRASS, GRASS*), not a fixed rule (uniform, cyclic)."""
        return self.kind in ("adaptive", "static")

    @property
    def sweep_steps(self) -> int:
        """Steps of the training probe (0 with the measuring probe)."""
        return len(self.sweep) * self.probe_steps

    @property
    def measure_steps(self) -> int:
        """Steps of the measuring probe, which update nothing (0 with the training probe)."""
        return self.probe_steps if self.probe_mode == "measure" else 0

    @property
    def start(self) -> int:
        """The step of the first importance draw (0 for uniform sampling)."""
        return self.measure_steps + self.sweep_steps

    def in_probe(self, step: int) -> bool:
        """Whether ``step`` is a measuring probe step (every block gets a gradient, nothing updates)."""
        return step < self.measure_steps

    def in_sweep(self, step: int) -> bool:
        return step < self.sweep_steps

    def begin_step(self, step: int) -> list[dict]:
        """Advance the schedule to the start of ``step``; returns the events (probe/refresh/draw) it caused."""
        events: list[dict] = []
        if self.in_probe(step):
            return events
        if self.in_sweep(step):
            if step % self.probe_steps == 0:
                self.active = list(self.sweep[step // self.probe_steps])
                events.append(self._event(step, "draw") | {"sweep": True})
            return events
        since = step - self.start
        if since == 0 and self.start > 0:
            self.mgn = self.window.mean()
            self.reference = torch.where(self.mgn > 0, self.mgn, torch.ones_like(self.mgn))
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
            if self.kind == "cyclic":
                self.active = cyclic_group(since // self.sample_interval, self.gamma, self.num_blocks)
            else:
                logp = torch.log(self.probs) if self.kind == "uniform" else log_probs(self.score(), self.tau)
                self.active = draw(logp, self.gamma, self.generator)
            events.append(self._event(step, "draw"))
        return events

    def score(self) -> torch.Tensor:
        """What the probabilities are a softmax of (before normalisation): the MGN, or the MGN relative to the
        block's probe reading (``importance="relative"``)."""
        return self.mgn if self.importance == "mgn" else self.mgn / self.reference

    def _set_probs(self) -> None:
        if self.measures:
            self.probs = softmax_probs(self.score(), self.tau)

    def observe(self, rms: dict[int, float]) -> None:
        """Record one step's gradient RMS of the blocks that had gradients (probe: all; later: the active)."""
        if not self.measures:
            return
        self.window.add(rms)

    @property
    def records_importance(self) -> bool:
        """Whether gradient RMS is measured after the measuring probe at some step (see :meth:`records`)."""
        return self.kind == "adaptive" or (self.measures and self.sweep_steps > 0)

    def records(self, step: int) -> bool:
        """Whether the active blocks' gradient RMS is recorded at non-probe ``step``: during the training
        probe for GRASS and GRASS*, and at every later step for adaptive GRASS."""
        if not self.measures or self.in_probe(step):
            return False
        return self.in_sweep(step) or self.kind == "adaptive"

    def _event(self, step: int, name: str) -> dict:
        return {"step": step, "event": name, "active": list(self.active) if name == "draw" else [],
                "mgn": [float(x) for x in self.mgn], "probs": [float(x) for x in self.probs]}

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"kind": self.kind, "mgn": self.mgn.clone(), "probs": self.probs.clone(),
                "reference": self.reference.clone(), "sweep": [list(g) for g in self.sweep],
                "active": list(self.active), "window": self.window.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"sampler state is for kind {state['kind']!r}, this run uses {self.kind!r}")
        self.mgn = state["mgn"].clone().double()
        self.probs = state["probs"].clone().double()
        if "reference" in state:  # absent in checkpoints from before the relative metric
            self.reference = state["reference"].clone().double()
        if "sweep" in state:
            self.sweep = [[int(b) for b in g] for g in state["sweep"]]
        self.active = [int(b) for b in state["active"]]
        self.window.load_state_dict(state["window"])
        self.generator.set_state(state["generator"])


def sweep_groups(num_blocks: int, gamma: int, generator: torch.Generator) -> list[list[int]]:
    """The training probe's groups: a seeded permutation of all blocks cut into groups of γ (each sorted); a
    short last group is filled up with distinct blocks drawn uniformly from the others, so every group has γ."""
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    groups = [perm[i:i + gamma] for i in range(0, num_blocks, gamma)]
    last = groups[-1]
    if len(last) < gamma:
        others = [b for b in range(num_blocks) if b not in last]
        pick = torch.randperm(len(others), generator=generator)[:gamma - len(last)].tolist()
        last += [others[i] for i in pick]
    return [sorted(g) for g in groups]
