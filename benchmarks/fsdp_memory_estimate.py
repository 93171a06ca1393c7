"""Per-rank device memory of one FSDP2 training step, estimated without a GPU: FFT-FSDP vs GRASS-FSDP.

    python benchmarks/fsdp_memory_estimate.py                       # LLaMA-2-7B and a 70B config, 8 ranks
    python benchmarks/fsdp_memory_estimate.py --models 7b --ranks 8 --batch 4 --seq 1024 --gamma 2

An ESTIMATE: nothing is allocated and nothing computed. The model is built under
``torch._subclasses.fake_tensor.FakeTensorMode`` in a fake process group of ``--ranks`` ranks (PyTorch's
``fake`` backend, as PyTorch's own FSDP2 memory tests use), every decoder block and the root wrapped with
``torch.distributed.fsdp.fully_shard``, and PyTorch's ``FSDPMemTracker`` counts the live bytes of rank 0 by category
through one warm-up step (so the optimizer state exists) and one tracked step of forward, backward (non-reentrant
activation checkpointing), ``optimizer.step()``.

Arms (bf16 parameters, torch AdamW with ``foreach=False``, its state in the parameter dtype; the foreach and fused
implementations report an implausible optimizer state under fake DTensors -- 27x the state's bytes for the 7B
config -- which we have not explained, so the single-tensor one is used):
- ``fft-fsdp``: every parameter trains.
- ``grass-fsdp``: ``--gamma`` decoder blocks train (embeddings and head frozen, the GRASS default); the optimizer
  holds only their state, which is what a rank keeps on the device when the other blocks' state is offloaded to
  the host (grass-ft's layer-wise offload; host bytes are not device memory and are not counted here).

Not what grass-ft runs today: the native loop does not shard (FSDP2 + GRASS is not built; docs/DISTRIBUTED.md).
This estimates what that design would need per rank, with stock FSDP2 doing the sharding.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

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
    """Peak bytes of rank 0 by FSDPMemTracker category for one tracked step."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

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
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if arm == "grass-fsdp":
                model.requires_grad_(False)
                step = max(1, cfg.num_hidden_layers // gamma)
                for i in range(0, step * gamma, step):  # spread over the depth; which ones barely matters
                    model.model.layers[i].requires_grad_(True)
            elif arm != "fft-fsdp":
                raise ValueError(f"unknown arm {arm!r}")
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=1e-5, **OPT_KW)
            x = torch.randint(0, cfg.vocab_size, (batch, seq))
            tracker = FSDPMemTracker(model, opt)
            tracker.track_inputs((x,))
            with tracker:
                for it in range(2):
                    model(input_ids=x, labels=x).loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if it == 0:  # the first step creates the optimizer state; track the second
                        tracker.reset_mod_stats()
            peak = tracker.get_tracker_snapshot("peak")
    finally:
        torch.set_default_dtype(default)
    (by_cat,) = peak.values()
    out = {str(getattr(k, "value", k)): int(v) for k, v in by_cat.items()}
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
            "All Gather", "Reduce Scatter", "OptState", "Total"]
    print("\n| model | arm | " + " | ".join(cats) + " |  (GiB per rank, peak, estimate)")
    print("|---|---|" + "---|" * len(cats))
    for r in rows:
        print(f"| {r['model']} | {r['arm']} | " + " | ".join(f"{r.get(c, 0) / 2**30:.2f}" for c in cats) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
