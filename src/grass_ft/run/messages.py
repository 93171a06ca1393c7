"""What a run says when it warns, when it is interrupted or runs out of device memory, and when its settings would
waste it: one line each, naming what is on disk and the keys or the command that work from there."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..base.errors import UserError
from ..base.registry import traits
from ..config import TrainConfig
from ..method.methods import resolved_offload


def warn(message: str) -> None:
    """One warning line on stderr (above any progress bar)."""
    tqdm.write(f"grass-ft: warning: {message}", file=sys.stderr)


@dataclass
class RunStage:
    """How far a run got, for the message of an interruption: whether it had claimed its output directory (before
    that, nothing in it was touched)."""
    claimed: bool = False


def kept_checkpoint(cfg: TrainConfig) -> str:
    """What a diverged run leaves to go back to: its newest checkpoint (every checkpoint holds finite weights)."""
    newest = newest_checkpoint(Path(cfg.output_dir))
    if newest is None:
        return "no checkpoint was written before it (save_steps=N keeps one to go back to)"
    return (f"the checkpoints from before it went bad are kept, the newest {newest} (a resume must keep lr, so a "
            f"lower lr starts a new run: another output_dir, or overwrite_output_dir=true)")


def newest_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``resume=auto`` would take in ``out`` (None: none, or every one damaged)."""
    from .checkpoint import find_checkpoint

    try:
        return find_checkpoint(out, "auto")
    except UserError:
        return None


def interrupted_state(cfg: TrainConfig, stage: RunStage | None, command: list[str]) -> str:
    """The half of an interruption's line that says what is on disk and the command that works from there.

    Args:
        cfg: the interrupted run's configuration.
        stage: how far it got (None: unknown, read from the disk alone).
        command: the ``grass-ft train`` command line that was interrupted.
    """
    import shlex

    out = Path(cfg.output_dir)
    again = shlex.join([a for a in command if a.split("=")[0] not in ("resume", "resume_from_checkpoint")]
                       + ["resume=auto"])
    if stage is not None and not stage.claimed:
        return f"nothing in {out} was touched; `{shlex.join(command)}` starts the run"
    if (out / "final").is_dir() and not (out / "summary.json").exists():
        if cfg.eval_samples == 0:
            return f"training finished: {out / 'final'} holds the trained model (summary.json was not written)"
        overwrite = " overwrite_output_dir=true" if (out / "eval.json").exists() else ""
        return (f"training finished and {out / 'final'} holds the trained model, but the evaluation after it was "
                f"cut short (no summary.json): `grass-ft eval model={shlex.quote(str(out / 'final'))} "
                f"output_dir={shlex.quote(str(out))}{overwrite}` evaluates it on the run's held-out examples")
    newest = newest_checkpoint(out)
    if newest is not None:
        return f"the newest checkpoint, {newest}, is intact: `{again}` continues from it"
    return f"no checkpoint was written (save_steps=N writes them); `{again}` starts the run again"


def sweep_outlasts_run(cfg: TrainConfig, sampler, n_steps: int) -> str | None:
    """A warning when a training probe's sweep (every block once, gamma at a time, probe_steps steps each) lasts
    the whole run, so that a method that measures importance never draws by it; None otherwise."""
    if sampler is None or not traits(cfg.method).measures or sampler.sweep_steps < n_steps:
        return None
    return (f"probe_mode=train: the sweep over {sampler.num_blocks} blocks, gamma={cfg.gamma} at a time and "
            f"probe_steps={cfg.probe_steps} steps each, takes {sampler.sweep_steps} steps, the whole run of "
            f"{n_steps}: method={cfg.method} will never draw by importance. Raise max_steps or gamma, lower "
            f"probe_steps, or set probe_mode=measure")


def out_of_memory_message(cfg: TrainConfig, error: BaseException) -> str:
    """The one line for a device that ran out of memory: what ran out, that nothing looks finished, and the keys
    that need less memory -- first, for a method that keeps all its optimizer state on the device (the default
    `fft` among them), the offloaded layer-wise method."""
    said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    fitting = _fitting_settings(cfg)
    if fitting:
        return (f"out of device memory with method={cfg.method} ({said}); the run is not finished (no final/, "
                f"checkpoints already written are intact). Settings the planner expects to fit this device: "
                f"{'; '.join(fitting)} (grass-ft plan lists them all)")
    lower = "lower batch_size (with grad_accum to keep the batch) or max_seq_len, or set gradient_checkpointing=true"
    if traits(cfg.method).sampling:
        offload = "" if resolved_offload(cfg) else "set offload=true, "
        fix = f"lower gamma (now {cfg.gamma}), {offload}or {lower}"
    elif cfg.method == "fft":
        fix = (f"method=grass-uniform trains gamma blocks at a time with their optimizer state on the host "
               f"(far below fft's peak: docs/gpu_memory.md), or {lower}")
    else:
        fix = lower[0].upper() + lower[1:]
    return (f"out of device memory with method={cfg.method} ({said}); the run is not finished (no final/, "
            f"checkpoints already written are intact). To fit: {fix}")


def _fitting_settings(cfg: TrainConfig, most: int = 4) -> list[str]:
    """The best fitting setting of each family, in the planner's order of preference, for this GPU's total memory
    (empty on a CPU, or when the planner cannot price the model)."""
    if not torch.cuda.is_available():
        return []
    from dataclasses import replace

    from ..planner import detect_budgets
    from ..planner.sizes import format_size
    from ..planner.table import build_plan

    try:
        total = format_size(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
        auto = replace(cfg, method="auto", gamma="auto", offload=None)
        plan = build_plan(auto, detect_budgets(total, cfg.host_memory, "cuda"), margin=cfg.memory_margin)
    except Exception:  # noqa: BLE001 - the advice must never hide the out-of-memory error itself
        return []
    out = []
    for family in ("fft", "fft-offload", "layer-wise", "layer-wise host-lean", "paper layout", "lora"):
        rows = [r for r in plan.rows if r.family == family and r.fits and not r.lisa_long_run]
        if rows:
            best = max(rows, key=lambda r: (r.setting.gamma or 0, r.setting.lora_r or 0))
            out.append(" ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                for k, v in best.setting.overrides().items()))
    return out[:most]
