#!/usr/bin/env python
"""Peak GPU memory and throughput of FFT / LoRA / DoRA / LISA / GRASS / GRASS* on TinyLlama-1.1B and LLaMA-2-7B
shapes (issues 3, 12).

Random-init models built from the published shapes (no hub access), bf16 parameters, batch 4 x 1024 tokens as
in the paper, random token batches. Every (model, method) arm runs in its own subprocess, so CUDA peaks and
caching-allocator state never mix, through the project's own code path: ``TrainConfig`` ->
``methods.prepare`` -> ``step.StepRunner.train_step``. The setting is the one under which the CPU estimate
(benchmarks/memory_estimate.py, docs/gpu_memory.md) matches the paper's figures: gradient checkpointing on
(non-reentrant), sdpa attention, and torch AdamW arms with ``fused=True`` (transformers' default on CUDA). The
peak of the training steps is measured alone (peak stats reset after model building, after GRASS's probe and
after every step); the probe's peak is reported apart.

    python benchmarks/gpu_memory.py                                   # both models, every arm
    python benchmarks/gpu_memory.py --models tinyllama --methods fft,lora,lisa,grass --steps 10
    python benchmarks/gpu_memory.py --smoke --out /tmp/x.md           # CPU, tiny Llama, peak RSS (CI check)

Writes a markdown report (``--out``) and one JSON line per arm to stdout; progress goes to stderr.
Exit code: 0 when every arm finished, 1 when at least one failed (it is in the table), 2 for bad arguments or
no CUDA without ``--smoke``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the shared harness, however this runs
from harness import git_revision, package_versions, use_checkout  # noqa: E402

use_checkout()
from grass_ft.config import PAPER_LAYOUT, PAPER_PROBE

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
MiB = 2**20

# Published shapes (config.json of TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T and meta-llama/Llama-2-7b-hf).
MODELS: dict[str, dict] = {
    "tinyllama": dict(label="TinyLlama-1.1B", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama2-7b": dict(label="LLaMA-2-7B", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
}
SMOKE_MODEL = dict(label="tiny Llama (smoke)", hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                   rms_norm_eps=1e-5, tie_word_embeddings=False)

# Arm name -> TrainConfig fields (as memory_estimate.ARMS). "lisa" is LISA as LMFlow/axolotl ship it (uniform
# draws, embeddings and head always trained, torch AdamW whose state is created on first use and never freed);
# "grass" is GRASS in the paper's layout (embeddings and head frozen, offload on); "grass-head" the project's
# default (embeddings and head trained at every step, docs/DEFAULTS.md); "grass-no-offload" is the same sampler and
# LayerwiseOffloadAdamW with offload=False (its fp32 moments stay on the device); "grass-static" is GRASS*
# (probe-only importance); "lora"/"dora" use the paper's table rank r=128 on every linear layer but the head.
# The paper's layout and probe (its peak reported apart): the defaults when these arms were designed, no longer.
FROZEN, MEASURE = PAPER_LAYOUT, PAPER_PROBE
METHODS: dict[str, dict] = {
    # stock pure-bf16 torch AdamW, as the paper's FFT and LISA as shipped (master_weights defaults to true)
    "fft": dict(method="fft", master_weights=False, supervised_only_loss=False),
    "lora": dict(method="lora", lora_r=128, supervised_only_loss=False),
    "dora": dict(method="dora", lora_r=128, supervised_only_loss=False),
    "lisa": dict(method="lisa", master_weights=False, supervised_only_loss=False),
    "grass-no-offload": dict(method="grass", offload=False, **FROZEN, **MEASURE),
    "grass": dict(method="grass", offload=True, **FROZEN, **MEASURE),
    "grass-static": dict(method="grass-static", offload=True, **FROZEN, **MEASURE),
    "grass-head": dict(method="grass", offload=True, train_embeddings=True, train_head=True, **MEASURE),
}
DEFAULT_METHODS = "fft,lora,dora,lisa,grass-no-offload,grass,grass-static,grass-head"

# Peak GPU memory in GB as the paper reports it (batch 4, sequence 1024); /work/shared/GRASS.md.
PAPER_GB: dict[str, dict[str, float]] = {
    "tinyllama": {"fft": 8.76, "lora": 4.71, "dora": 5.71, "lisa": 4.93, "grass": 4.49},
    "llama2-7b": {"fft": 51.32, "lora": 19.97, "dora": 23.23, "lisa": 22.31, "grass": 19.08},
}


def _import_project():
    use_checkout()
    sys.path.insert(0, str(ROOT / "benchmarks"))  # memory_estimate: fused_adamw, optimizer_tensors


def _traits(method: str):
    """What ``method`` can do, from the project's method registry."""
    _import_project()
    from grass_ft.registry import traits

    return traits(method)


# ---------------------------------------------------------------------------------------------- one arm


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower() \
        or "CUBLAS_STATUS_ALLOC_FAILED" in str(e)


def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _state_dtypes(optimizer, model) -> list[str]:
    """The dtypes of the optimizer's own tensors (moments, stores, master copies) as they are, not as assumed."""
    from memory_estimate import optimizer_tensors

    params = {id(p) for p in model.parameters()}
    return sorted({str(t.dtype).replace("torch.", "") for t in optimizer_tensors(optimizer, params) if t.dim() > 0})


def _fake_oom(arm: str, checkpointing: bool) -> bool:
    """Test hook: ``GPU_MEMORY_FAKE_OOM="lisa:no-ckpt,grass:always"`` makes those arms raise a CUDA
    out-of-memory error at their second step (``no-ckpt``: only without gradient checkpointing), so the
    failure and retry paths can be tested on a CPU."""
    for item in os.environ.get("GPU_MEMORY_FAKE_OOM", "").split(","):
        name, _, when = item.strip().partition(":")
        if name == arm and (when == "always" or (when == "no-ckpt" and not checkpointing)):
            return True
    return False


def run_arm(spec: dict) -> dict:
    """Builds the model, prepares the method and runs ``warmup + steps`` training steps; returns the record.

    A CUDA out-of-memory error ends the arm with ``status: "oom"`` and what was measured until then.
    """
    _import_project()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from grass_ft import methods as methods_mod
    from grass_ft.config import TrainConfig, validate
    from grass_ft.loss import loss_forward
    from grass_ft.models import enable_checkpointing
    from grass_ft.step import StepRunner, optimizer_state_bytes

    smoke = spec["smoke"]
    cuda = not smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, spec["dtype"])
    rec: dict = {"model": spec["model"], "method": spec["arm"], "status": "error", "phase": "build",
                 "gradient_checkpointing": spec["checkpointing"], "measure": "cuda_max_allocated" if cuda else "rss"}
    t_start = time.perf_counter()
    if cuda:
        rec["gpu"] = torch.cuda.get_device_name(device)
        rec["gpu_total_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GiB, 2)
    try:
        shape = dict(SMOKE_MODEL if smoke else MODELS[spec["model"]])
        shape.pop("label")
        config = LlamaConfig(**shape, attn_implementation="sdpa", use_cache=False)
        torch.manual_seed(spec["seed"])
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
        if spec["checkpointing"]:
            enable_checkpointing(model)
        total_steps = spec["warmup"] + spec["steps"]
        cfg = TrainConfig(**METHODS[spec["arm"]], gamma=spec["gamma"], probe_steps=spec["probe_steps"],
                          sample_interval=spec["sample_interval"], update_interval=spec["update_interval"],
                          lr=spec["lr"], batch_size=spec["batch_size"], max_seq_len=spec["seq_len"],
                          max_steps=total_steps, dtype=spec["dtype"], seed=spec["seed"],
                          gradient_checkpointing=spec["checkpointing"], eval_samples=0)
        sampling = bool(_traits(cfg.method).sampling)  # gamma is bounded only where it is used
        errors = validate(cfg, num_blocks=config.num_hidden_layers if sampling else None,
                          known_methods=methods_mod.method_names())
        if errors:
            raise ValueError("; ".join(errors))
        prepared = methods_mod.prepare(model, cfg)
        from memory_estimate import fused_adamw

        rec["fused_adamw"] = fused_adamw(prepared)  # torch AdamW arms: fused=True, transformers' CUDA default
        model = prepared.model
        runner = StepRunner(prepared, max_grad_norm=cfg.max_grad_norm, max_bad_steps=total_steps + 1)
        rec["offload"] = prepared.offload
        rec["optimizer"] = type(prepared.optimizer).__name__ + (" (fused)" if rec["fused_adamw"] else "")
        rec["params"] = sum(p.numel() for p in model.parameters())
        rec["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
        gen = torch.Generator().manual_seed(spec["seed"])
        batches = []
        for _ in range(total_steps):
            ids = torch.randint(0, config.vocab_size, (spec["batch_size"], spec["seq_len"]), generator=gen).to(device)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        rec["build_s"] = time.perf_counter() - t_start

        def sync():
            if cuda:
                torch.cuda.synchronize(device)

        def peak_and_reset() -> int:
            if not cuda:
                return _rss_bytes()
            p = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            return p

        sync()
        rec["alloc_before_steps_gib"] = (torch.cuda.memory_allocated(device) if cuda else _rss_bytes()) / GiB
        peak_and_reset()
        step_peaks, step_s, tokens, losses, drawn, skipped, probe = [], [], [], [], set(), 0, []
        trainable_last = 0
        for step in range(total_steps):
            rec["phase"] = f"step {step}"
            sync()
            t0 = time.perf_counter()
            if step == 1 and _fake_oom(spec["arm"], spec["checkpointing"]):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated by GPU_MEMORY_FAKE_OOM)")
            # the native loop's loss: supervised-only for GRASS (the default), transformers' full-logits loss for
            # the baselines as shipped (supervised_only_loss=False above), as in memory_estimate.py
            res = runner.train_step(step, [batches[step]], forward=loss_forward(cfg.supervised_only_loss))
            sync()
            step_s.append(time.perf_counter() - t0)
            step_peaks.append(peak_and_reset())
            probe.append(res.probe)
            tokens.append(res.tokens)
            losses.append(res.loss)
            drawn |= set(res.active) if not res.probe else set()
            skipped += int(res.skipped)
            trainable_last = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rec["phase"] = "done"
        rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - the arm reports its own failure; the parent carries on
        rec["status"] = "oom" if _is_oom(e) else "error"
        rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        if cuda:
            rec["peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB
            if "step_peaks" in locals():
                rec["peak_gib"] = max([rec["peak_gib"]] + [p / GiB for p in step_peaks])
        else:
            rec["peak_gib"] = _rss_bytes() / GiB
        rec["wall_s"] = time.perf_counter() - t_start
        return rec
    w = spec["warmup"]
    # each step's peak was read and reset after it: the probe's, the warm-up's and the measured steps' apart
    probe_peaks = [p for p, is_probe in zip(step_peaks, probe) if is_probe]
    warm = [p for p, is_probe in zip(step_peaks[:w], probe[:w]) if not is_probe]
    rec["peak_gib"] = max(step_peaks[w:]) / GiB
    rec["probe_peak_gib"] = max(probe_peaks) / GiB if probe_peaks else None
    rec["peak_warmup_gib"] = max(warm) / GiB if warm else None
    rec["peak_measured_gib"] = rec["peak_gib"]
    rec["peak_minus_weights_gib"] = rec["peak_gib"] - rec["weights_gib"]
    rec["step_peaks_gib"] = [round(p / GiB, 4) for p in step_peaks]
    rec["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GiB if cuda else None
    rec["tokens_per_s"] = sum(tokens[w:]) / sum(step_s[w:])
    rec["step_s"] = sum(step_s[w:]) / len(step_s[w:])
    state = optimizer_state_bytes(prepared.optimizer)
    rec["opt_state_device_gib"] = state["device"] / GiB
    rec["opt_state_peak_device_gib"] = state["peak_device"] / GiB
    rec["opt_state_host_gib"] = state["host"] / GiB
    rec["opt_state_dtype"] = ",".join(_state_dtypes(prepared.optimizer, model)) or "-"
    rec["blocks_drawn"] = len(drawn) if prepared.sampler is not None else None
    rec["num_blocks"] = config.num_hidden_layers
    rec["trainable_last_step"] = trainable_last
    rec["skipped_steps"] = skipped
    rec["loss_first"], rec["loss_last"] = losses[0], losses[-1]
    rec["wall_s"] = time.perf_counter() - t_start
    return rec


# ------------------------------------------------------------------------------------------------ driver


def _launch(spec: dict, timeout: float) -> dict:
    """Runs one arm in a fresh interpreter; a crash, kill or timeout becomes an ``error``/``timeout`` record."""
    with tempfile.TemporaryDirectory(prefix="gpu_memory_") as tmp:
        result = Path(tmp) / "arm.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec), "--_result", str(result)]
        t0 = time.perf_counter()
        base = {"model": spec["model"], "method": spec["arm"], "gradient_checkpointing": spec["checkpointing"]}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**base, "status": "timeout", "error": f"arm exceeded {timeout:.0f} s and was killed",
                    "wall_s": time.perf_counter() - t0}
        if result.is_file():
            rec = json.loads(result.read_text())
        else:
            tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])[-400:]
            rec = {**base, "status": "oom" if "out of memory" in tail.lower() else "error",
                   "error": f"worker exited with code {proc.returncode}: {tail}"}
        rec["process_wall_s"] = time.perf_counter() - t0
        return rec


def _ratio(x, ref) -> float | None:
    return None if x is None or not ref else x / ref


def _fmt(x, nd=2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def write_report(path: Path, records: list[dict], settings: dict, command: str, smoke: bool,
                 complete: bool) -> None:
    unit, scale = ("MiB", GiB / MiB) if smoke else ("GiB", 1.0)
    gpu = next((r["gpu"] for r in records if r.get("gpu")), None)
    gpu_mem = next((r["gpu_total_gib"] for r in records if r.get("gpu_total_gib")), None)
    v = settings["versions"]
    lines = ["# GPU memory benchmark" + (" (smoke: CPU, tiny model, peak RSS)" if smoke else ""), ""]
    if not complete:
        lines += ["**Incomplete: the run is still going or was interrupted; the rows below are what finished.**", ""]
    lines += [
        f"- command: `{command}`",
        f"- date: {settings['date'][:10]}, commit {settings['commit']}",
        f"- device: {gpu + f' ({gpu_mem} GiB)' if gpu else ('CPU (smoke mode)' if smoke else 'unknown')}",
        f"- torch {v['torch']} (CUDA {settings['cuda']}), transformers {v['transformers']}, peft {v['peft']}",
        "- model: " + ("tiny Llama config (hidden 64, 4 blocks, vocab 128), random init" if smoke else
                       "random init from the published configs (TinyLlama-1.1B: hidden 2048, 22 blocks, 4 KV heads; "
                       "LLaMA-2-7B: hidden 4096, 32 blocks, 32 KV heads; vocab 32000, untied head)")
        + f", {settings['dtype']} parameters, sdpa attention",
        f"- data: batch {settings['batch_size']} x {settings['seq_len']} tokens of random ids (labels = inputs), "
        f"one optimizer step per batch",
        f"- steps per arm: {settings['warmup']} warm-up (GRASS's probe, T_p = {settings['probe_steps']}, is part of "
        f"them) + {settings['steps']} measured; each arm in its own process",
        f"- LISA / GRASS: gamma = {settings['gamma']} blocks trainable at a time, T_s = {settings['sample_interval']} "
        f"steps between re-draws, GRASS T_u = {settings['update_interval']}, tau 1.0, alpha 0.5, embeddings and "
        f"head trained by LISA only (as shipped), moments resumed on re-draw; lr {settings['lr']}, clipping at "
        f"1.0, constant LR",
        f"- gradient checkpointing: {settings['checkpointing_note']}",
        f"- wall time: {settings.get('wall_s', 0):.0f} s",
        "",
    ]
    peak_head = f"peak RSS {unit}" if smoke else f"peak alloc {unit}"
    lines += [f"| model | method | status | {peak_head} | ratio | tokens/s | ratio | opt state device {unit} "
              f"(after / in step) | opt state host {unit} | state dtype | blocks drawn | ckpt | paper GB | "
              f"paper ratio | probe peak {unit} |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ref = next((x for x in records if x["model"] == r["model"] and x["method"] == "fft"
                    and x["status"] == "ok"), None)
        peak = r.get("peak_gib")
        peak_ratio = _ratio(peak, ref and ref["peak_gib"]) if r["status"] == "ok" else None
        tps_ratio = _ratio(r.get("tokens_per_s"), ref and ref["tokens_per_s"])
        paper = PAPER_GB.get(r["model"], {})
        p = paper.get(r["method"])
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:120]}"
        if r["status"] != "ok" and peak is not None:
            status += f" (peak {peak * scale:.2f} {unit} when it stopped)"
        peak_cell = _fmt(peak * scale) if (peak is not None and r["status"] == "ok") else "–"
        dev = r.get("opt_state_device_gib")
        dev_cell = "–" if dev is None else f"{dev * scale:.2f} / {r['opt_state_peak_device_gib'] * scale:.2f}"
        host = r.get("opt_state_host_gib")
        blocks = r.get("blocks_drawn")
        lines.append(" | ".join([
            f"| {r['model']}", r["method"], status.replace("|", "/"), peak_cell, _fmt(peak_ratio),
            _fmt(r.get("tokens_per_s"), 0), _fmt(tps_ratio), dev_cell,
            "–" if host is None else f"{host * scale:.2f}", r.get("opt_state_dtype", "–"),
            "–" if blocks is None else f"{blocks}/{r['num_blocks']}",
            "on" if r.get("gradient_checkpointing") else "off",
            _fmt(p), _fmt(_ratio(p, paper.get("fft"))),
            "–" if r.get("probe_peak_gib") is None else _fmt(r["probe_peak_gib"] * scale),
        ]) + " |")
    lines += [
        "",
        "How to read it:",
        "",
        f"- **peak** is the largest `torch.cuda.max_memory_allocated` over the measured training steps alone (peak "
        f"stats are reset after building the model and after every step, so loading, the warm-up and GRASS's probe "
        f"are not in it; the probe's own peak is the last column; weights, gradients, optimizer state, activations "
        f"and temporaries), in {unit} "
        f"(2^30 bytes); the paper's column is its \"GB\" as printed. The ratios (to FFT of the same model, in the "
        f"same run) are the comparable figures: the paper's stack (framework, precision, attention kernel) is not "
        f"stated, ours is plain PyTorch as above."
        if not smoke else
        "- **smoke mode**: CPU, fp32, a 4-block tiny Llama; **peak** is the arm process's peak RSS, dominated by "
        "the Python/torch runtime, so the ratios say nothing about the methods. It checks the script end to end.",
        "- **tokens/s** is tokens of the measured steps over their wall time (synchronised per step); "
        "the warm-up and probe steps are excluded.",
        "- **opt state device** is `step.optimizer_state_bytes` after the last step (state left on the device "
        "between steps) and its peak during that step; **host** is state in (pinned) host memory. With offload the "
        "first is 0 and the second at most three blocks' moments; LISA's and grass-no-offload's state is "
        "`torch.optim.AdamW`'s, created for each block the first time it is drawn and never freed, so it grows "
        "with the number of **blocks drawn** so far (of all blocks) and the peak would grow further in a longer run "
        "(grass-no-offload's is our LayerwiseOffloadAdamW with offload=False: per-block fp32 stores kept on the "
        "device once created).",
        "- **state dtype** is read from the optimizer's tensors after the run: `torch.optim.AdamW` (fused) keeps "
        "its moments in the parameters' dtype (bf16 here; peft keeps LoRA/DoRA adapters in fp32, so theirs are "
        "fp32); `LayerwiseOffloadAdamW` keeps fp32 moments, on the host with offload and on the device in the "
        "grass-no-offload arm (both GRASS arms: fp32).",
        "- The paper reports that offloading cut the extra memory of layer-wise tuning on LLaMA-2-7B from 1.63 GB "
        "to 0.14 GB; compare grass-no-offload's and grass's opt-state columns.",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tinyllama,llama2-7b", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated: {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per arm (default 10; smoke 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up steps per arm before the measured ones, GRASS's probe included (default 3; smoke 2)")
    ap.add_argument("--probe-steps", type=int, default=None, help="GRASS probe steps T_p (default 2; smoke 1)")
    ap.add_argument("--gamma", type=int, default=2, help="blocks trainable at a time for LISA and GRASS")
    ap.add_argument("--sample-interval", type=int, default=None, help="T_s: steps between re-draws (default 2; smoke 1)")
    ap.add_argument("--update-interval", type=int, default=4, help="GRASS T_u: steps between probability refreshes")
    ap.add_argument("--batch-size", type=int, default=None, help="default 4 (smoke 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 1024 (smoke 32)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--checkpointing", choices=("off", "on", "auto"), default="on",
                    help="gradient checkpointing: on (the paper's setting, default), off, or auto = off, and an arm "
                         "that runs out of memory is "
                         "run again once with it (the table says which arms used it)")
    ap.add_argument("--out", default=None, help="markdown report (default docs/gpu_memory_measured.md; smoke: "
                                                "runs/gpu_memory_smoke.md)")
    ap.add_argument("--arm-timeout", type=float, default=180.0, help="seconds one arm may take, start-up included")
    ap.add_argument("--budget", type=float, default=450.0,
                    help="seconds for the whole run; arms that would start after it are reported as skipped")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, fp32, tiny Llama (hidden 64, 4 blocks, vocab 128), batch 2 x 32, peak RSS: checks "
                         "that the script runs end to end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._worker:
        rec = run_arm(json.loads(args._worker))
        Path(args._result).write_text(json.dumps(rec))
        return 0

    smoke = args.smoke
    d = (lambda gpu, sm: sm if smoke else gpu)
    steps = args.steps if args.steps is not None else d(10, 3)
    warmup = args.warmup if args.warmup is not None else d(3, 2)
    probe = args.probe_steps if args.probe_steps is not None else d(2, 1)
    sample_interval = args.sample_interval if args.sample_interval is not None else d(2, 1)
    models = ["smoke-tiny"] if smoke else [m.strip() for m in args.models.split(",") if m.strip()]
    arms = [m.strip() for m in args.methods.split(",") if m.strip()]
    errors = [f"unknown model {m!r} (known: {', '.join(MODELS)})" for m in models if m not in MODELS and not smoke]
    errors += [f"unknown method {m!r} (known: {', '.join(METHODS)})" for m in arms if m not in METHODS]
    sampling = any(_traits(METHODS[a]["method"]).sampling for a in arms if a in METHODS)
    blocks = [SMOKE_MODEL["num_hidden_layers"]] if smoke else [MODELS[m]["num_hidden_layers"] for m in models
                                                               if m in MODELS]
    if sampling and blocks and not 1 <= args.gamma <= min(blocks):
        errors.append(f"--gamma must be between 1 and {min(blocks)} (the smallest model's block count), "
                      f"got {args.gamma}")
    if steps < 1:
        errors.append("--steps must be >= 1")
    if any(_traits(METHODS[a]["method"]).measures for a in arms if a in METHODS) and not 1 <= probe < warmup:
        errors.append(f"--probe-steps ({probe}) must be >= 1 and below --warmup ({warmup}), so that the measured "
                      f"steps are training steps")
    if errors:
        print("gpu_memory.py: " + "; ".join(errors), file=sys.stderr)
        return 2
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            print("gpu_memory.py: no CUDA device is available; this benchmark measures GPU memory and needs one "
                  "(run with --smoke to check the script on the CPU with a tiny model)", file=sys.stderr)
            return 2
    if smoke and args.models != "tinyllama,llama2-7b":
        print("gpu_memory.py: --smoke uses its tiny model; --models is ignored", file=sys.stderr)
    out = Path(args.out) if args.out else ROOT / d("docs/gpu_memory_measured.md", "runs/gpu_memory_smoke.md")
    settings = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_revision(), "versions": package_versions(), "dtype": d("bfloat16", "float32"),
        "batch_size": args.batch_size or d(4, 2), "seq_len": args.seq_len or d(1024, 32),
        "warmup": warmup, "steps": steps, "probe_steps": probe, "gamma": args.gamma,
        "sample_interval": sample_interval, "update_interval": args.update_interval, "lr": args.lr,
    }
    try:
        import torch

        settings["cuda"] = torch.version.cuda or "none"
    except ImportError:
        settings["cuda"] = "unknown"
    settings["checkpointing_note"] = {"off": "off for every arm",
                                      "on": "on for every arm (non-reentrant)",
                                      "auto": "off; an arm that ran out of memory without it was rerun once with "
                                              "it (column ckpt)"}[args.checkpointing]
    command = shlex.join(["python", "benchmarks/gpu_memory.py"] + argv)
    t_start = time.perf_counter()
    records: list[dict] = []
    for model in models:
        for arm in arms:
            spec = {"model": model, "arm": arm, "smoke": smoke, "dtype": settings["dtype"],
                    "batch_size": settings["batch_size"], "seq_len": settings["seq_len"], "warmup": warmup,
                    "steps": steps, "probe_steps": probe, "gamma": args.gamma, "sample_interval": sample_interval,
                    "update_interval": args.update_interval, "lr": args.lr, "seed": args.seed,
                    "checkpointing": args.checkpointing == "on"}
            left = args.budget - (time.perf_counter() - t_start)
            if left < 20:
                rec = {"model": model, "method": arm, "status": "skipped",
                       "error": f"time budget of {args.budget:.0f} s spent", "gradient_checkpointing": False}
            else:
                print(f"[gpu_memory] {model} / {arm} ...", file=sys.stderr, flush=True)
                rec = _launch(spec, min(args.arm_timeout, left))
                left = args.budget - (time.perf_counter() - t_start)
                if rec["status"] == "oom" and args.checkpointing == "auto" and left >= 20:
                    print(f"[gpu_memory] {model} / {arm}: out of memory, again with gradient checkpointing",
                          file=sys.stderr, flush=True)
                    first = rec
                    rec = _launch({**spec, "checkpointing": True}, min(args.arm_timeout, left))
                    rec["without_checkpointing"] = {k: first.get(k) for k in ("status", "error", "peak_gib")}
            ref = next((r for r in records if r["model"] == model and r["method"] == "fft" and r["status"] == "ok"),
                       None)
            if rec["status"] == "ok" and ref is not None:
                rec["peak_ratio_to_fft"] = rec["peak_gib"] / ref["peak_gib"]
                rec["tokens_per_s_ratio_to_fft"] = rec["tokens_per_s"] / ref["tokens_per_s"]
            records.append(rec)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
            settings["wall_s"] = time.perf_counter() - t_start
            write_report(out, records, settings, command, smoke, complete=False)
    settings["wall_s"] = time.perf_counter() - t_start
    write_report(out, records, settings, command, smoke, complete=True)
    print(f"[gpu_memory] wrote {out} in {settings['wall_s']:.0f} s", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
