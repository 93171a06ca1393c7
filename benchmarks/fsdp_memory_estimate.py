"""Per-rank device memory of one FSDP2 training step, estimated without a GPU: FFT-FSDP vs GRASS-FSDP.

    python benchmarks/fsdp_memory_estimate.py                       # LLaMA-2-7B and a 70B config, 8 ranks
    python benchmarks/fsdp_memory_estimate.py --models 7b --ranks 8 --batch 4 --seq 1024 --gamma 2

An ESTIMATE: nothing is allocated and nothing computed. The model is built under
``torch._subclasses.fake_tensor.FakeTensorMode`` in a fake process group of ``--ranks`` ranks (PyTorch's
``fake`` backend, as PyTorch's own FSDP2 memory tests use), every decoder block and the root wrapped with
``torch.distributed.fsdp.fully_shard``, and PyTorch's ``FSDPMemTracker`` counts the live bytes of rank 0 by category
through two steps of forward, backward (non-reentrant activation checkpointing), ``optimizer.step()``; the peak is
over both (torch AdamW creates its state at the first step, so only in the second does it coexist with activations).

Arms (bf16 parameters):
- ``fft-fsdp``: stock FSDP2, every parameter trains, torch AdamW with ``foreach=False`` and its state in bf16
  (the parameter dtype: pure-bf16 AdamW, as the paper's FFT). The foreach and fused implementations report an
  implausible optimizer state under fake DTensors -- 27x the state's bytes for the 7B config -- which we have not
  explained, so the single-tensor one is used.
- ``grass-fsdp``: grass-ft's own ``fsdp=true`` path: ``grass_ft.fsdp.shard_model`` shards the model and
  ``grass_ft.methods.prepare`` (method ``grass``, ``offload=true``, ``master_weights=true``) builds the optimizer
  it always uses under fsdp, ``LayerwiseOffloadAdamW`` over each rank's local shards of every decoder block. Its
  fp32 moments and fp32 masters (12 B per parameter of the rank's shard) live in a host slab allocated by the
  constructor; ``--gamma`` decoder blocks train (embeddings and head frozen, the GRASS default) and ``step()``
  streams their records through a bounded ring of device buffers. The slab is host memory: it is reported apart
  (``host_optimizer_bytes``) and subtracted from the tracker's device peak (the fake device is "cpu", so the
  tracker would otherwise count it; it is registered with the inputs so that it is counted once and removed).

Not a measurement: the caching allocator's fragmentation, NCCL buffers and the CUDA context are not modelled;
FSDP2's all-gather and reduce-scatter buffers are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the shared harness, however this runs
from harness import use_checkout  # noqa: E402

use_checkout()

OPT_KW = {"foreach": False}  # see the module docstring

CONFIGS = {
    # LLaMA-2-7B and LLaMA-2-70B shapes (Touvron et al. 2023)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
    # a tiny config for the test
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def _fake_group(ranks: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", rank=0, world_size=ranks, store=FakeStore())


def estimate(model_key: str, arm: str, ranks: int, batch: int, seq: int, gamma: int) -> dict:
    """Peak bytes of rank 0 by FSDPMemTracker category over two steps; host optimizer bytes reported apart."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from grass_ft.config import TrainConfig
    from grass_ft.fsdp import shard_model
    from grass_ft.methods import prepare

    if arm not in ("fft-fsdp", "grass-fsdp"):
        raise ValueError(f"unknown arm {arm!r}")
    _fake_group(ranks)
    mesh = init_device_mesh("cpu", (ranks,))
    cfg = LlamaConfig(**CONFIGS[model_key], use_cache=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # model.to(bf16) cannot swap fake parameters
    try:
        with FakeTensorMode():
            model = LlamaForCausalLM(cfg)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            if arm == "fft-fsdp":  # stock FSDP2 and torch AdamW, pure bf16 state
                for layer in model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **OPT_KW)
                slabs: list[torch.Tensor] = []
            else:  # grass-ft's fsdp=true path: its sharding, and its optimizer on each rank's local shards
                shard_model(model, mesh=mesh)
                # the paper's layout and probe (the measuring probe was the default when this was designed; the
                # default is now probe_mode=train, whose group sweep draws from a generator fake tensors cannot read)
                tcfg = TrainConfig(method="grass", gamma=gamma, fsdp=True, offload=True, master_weights=True,
                                   train_embeddings=False, train_head=False, probe_mode="measure")
                opt = prepare(model, tcfg).optimizer
                assert type(opt).__name__ == "LayerwiseOffloadAdamW", type(opt)
                model.requires_grad_(False)
                step = max(1, cfg.num_hidden_layers // gamma)
                for i in range(0, step * gamma, step):  # spread over the depth; which ones barely matters
                    model.model.layers[i].requires_grad_(True)
                slabs = list(opt._slabs)  # its host memory (the fake device is "cpu" too)
            trainable = [p for p in model.parameters() if p.requires_grad]
            x = torch.randint(0, cfg.vocab_size, (batch, seq))
            tracker = FSDPMemTracker(model, opt)
            # the host slab is registered with the inputs, before the step, so that its views in step() are not
            # counted as device optimizer state; it is constant through the steps and subtracted below
            # (FSDPMemTracker has no host category)
            tracker.track_inputs((x, *slabs))
            with tracker:
                for it in range(2):
                    model(input_ids=x, labels=x).loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if it == 0:  # torch AdamW creates its state at the first step; the peak is over both
                        tracker.reset_mod_stats()
                between = tracker.get_tracker_snapshot("current")
            peak = tracker.get_tracker_snapshot("peak")
            report = opt.memory_report() if slabs else None
    finally:
        torch.set_default_dtype(default)
    (by_cat,) = peak.values()
    out = {str(getattr(k, "value", k)): int(v) for k, v in by_cat.items()}
    host = sum(t.nbytes for t in slabs)
    assert out.get("Inputs", 0) - host == x.nbytes, out  # the slab was counted once, with the inputs
    out["Inputs"] -= host
    out["Total"] -= host
    out["host_optimizer_bytes"] = host
    (now,) = between.values()
    out["optstate_between_steps"] = int(next((v for k, v in now.items() if getattr(k, "value", k) == "OptState"), 0))
    if report is not None:
        assert report["host_state_bytes"] == host, (report, host)
        out["optimizer_device_bytes_between_steps"] = report["device_state_bytes"]
        out["optimizer_step_device_peak"] = report["peak_device_state_bytes"]  # its ring slots + compute buffers
    out["trainable_params_per_rank"] = sum(p.numel() for p in trainable) // ranks
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="7b,70b")
    ap.add_argument("--arms", default="fft-fsdp,grass-fsdp")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="per rank")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--gamma", type=int, default=2)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    rows = []
    for m in a.models.split(","):
        for arm in a.arms.split(","):
            t0 = time.time()
            r = estimate(m, arm, a.ranks, a.batch, a.seq, a.gamma)
            rows.append({"model": m, "arm": arm, "ranks": a.ranks, "batch": a.batch, "seq": a.seq,
                         "gamma": a.gamma if arm == "grass-fsdp" else None, "seconds": round(time.time() - t0), **r})
            print(json.dumps(rows[-1]), flush=True)
    cats = ["Sharded Param", "Unsharded Param", "Sharded Grad", "Unsharded Grad", "Activation", "Temp",
            "All Gather", "Reduce Scatter", "OptState", "Total", "optstate_between_steps", "host_optimizer_bytes"]
    print("\n| model | arm | " + " | ".join(cats) + " |  (GiB per rank; device peak by category and Total without "
          "the host slab; OptState between steps; host optimizer bytes; estimate)")
    print("|---|---|" + "---|" * len(cats))
    for r in rows:
        print(f"| {r['model']} | {r['arm']} | " + " | ".join(f"{r.get(c, 0) / 2**30:.2f}" for c in cats) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
