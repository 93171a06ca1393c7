#!/usr/bin/env python
"""Per-rank peak memory of FFT-FSDP vs GRASS-FSDP, ESTIMATED without GPUs (issue 16).

PyTorch's FSDP2 memory tracker (``torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker``) follows one
training step of one rank: the model is built from the published shapes under ``FakeTensorMode`` (no memory, no
data), sharded with ``fully_shard`` (each decoder block a unit, then the root, as ``fsdp=true`` does) over a fake
process group of ``--ranks`` ranks (``init_process_group("fake")``, PyTorch's own test tool: collectives do not
communicate, shapes are as with real ranks), and every tensor the step allocates is counted by category
(sharded and unsharded parameters, gradients, optimizer state, activations, temporaries).

Arms (bf16 parameters, batch ``--batch`` x ``--seq`` tokens per rank, the full-vocabulary loss):

- ``fft-fsdp``: every parameter trains; torch AdamW in pure bf16 (``master_weights=false``, as the paper's FFT);
  its state is created at the first step and stays on the device.
- ``grass-fsdp``: ``--gamma`` decoder blocks train (here the first ones: which ones does not change the peak
  much, all blocks have the same size); the project's optimizer (``LayerwiseOffloadAdamW``, fp32 moments and
  fp32 masters per shard, offloaded: its host slab is allocated before the step and is host memory, not counted;
  its device ring and compute buffers are).

What this is NOT: a measurement. The device is faked (tensors are counted on "cpu"), the caching allocator's
fragmentation, NCCL buffers and the CUDA context are not modelled; FSDP2's all-gather/reduce-scatter buffers are.
Run:

    python benchmarks/fsdp_memory.py                     # llama2-7b and llama2-70b, 8 ranks
    python benchmarks/fsdp_memory.py --models llama2-7b --ranks 2 --gamma 4

Prints one JSON line per (model, arm) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30

# Published shapes (config.json of meta-llama/Llama-2-7b-hf and meta-llama/Llama-2-70b-hf).
MODELS: dict[str, dict] = {
    "llama2-7b": dict(label="LLaMA-2-7B", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama2-70b": dict(label="LLaMA-2-70B", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(label="tiny Llama (smoke)", hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
}
ARMS = ("fft-fsdp", "grass-fsdp")


def estimate(model_key: str, arm: str, ranks: int, batch: int, seq: int, gamma: int, steps: int = 2) -> dict:
    """One step of one rank under FSDPMemTracker; returns the peak and its breakdown in bytes."""
    try:
        import grass_ft  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaConfig, LlamaForCausalLM

    from grass_ft.config import TrainConfig
    from grass_ft.fsdp import shard_model
    from grass_ft.methods import prepare

    shape = {k: v for k, v in MODELS[model_key].items() if k != "label"}
    cfg = LlamaConfig(**shape, max_position_embeddings=max(seq, 64), tie_word_embeddings=False,
                      attn_implementation="sdpa")
    mesh = init_device_mesh("cpu", (ranks,))  # outside FakeTensorMode: the mesh is built from real rank tensors
    with FakeTensorMode():
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        shard_model(model, mesh=mesh)  # every decoder block a fully_shard unit, then the root, as fsdp=true
        assert next(model.parameters()).device_mesh.size() == ranks  # sharded over the fake group's ranks
        tcfg = TrainConfig(method="fft" if arm == "fft-fsdp" else "grass", gamma=gamma, fsdp=arm == "grass-fsdp",
                           master_weights=arm != "fft-fsdp", offload=arm == "grass-fsdp")
        prepared = prepare(model, tcfg)  # fft: torch AdamW (pure bf16); grass: LayerwiseOffloadAdamW, offloaded
        if prepared.layout is not None and arm == "grass-fsdp":
            train = {n for b in range(gamma) for n in prepared.layout.blocks[b]}
            for n, p in model.named_parameters():
                p.requires_grad_(n in train)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq))
        tracker = FSDPMemTracker(model, prepared.optimizer)
        host = getattr(prepared.optimizer, "_slabs", [])  # LayerwiseOffloadAdamW's host memory (fake "cpu" too)
        # registered with the inputs, before the step, so that its views in step() are not counted as device
        # optimizer state; it is constant for the step and subtracted below (FSDPMemTracker has no "host" category)
        tracker.track_inputs((ids, *host))
        with tracker:
            # two steps: torch AdamW creates its state at the first step, so only from the second on does the
            # state coexist with activations and gradients (the steady-state peak)
            for i in range(steps):
                if i:
                    tracker.reset_mod_stats()  # per-module stats are per iteration; the global peak is kept
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                prepared.optimizer.step()
                prepared.optimizer.zero_grad(set_to_none=True)
        peak = tracker.get_tracker_snapshot("peak")
    per_device = {str(d): {getattr(k, "value", str(k)): int(v) for k, v in s.items()} for d, s in peak.items()}
    breakdown = next(iter(per_device.values()))  # one (fake) device
    host_bytes = sum(t.nbytes for t in host)
    breakdown["Inputs"] -= host_bytes
    assert breakdown["Inputs"] == ids.nbytes, breakdown  # the slab was counted (once) with the inputs
    total = breakdown["Total"] - host_bytes
    return {"model": MODELS[model_key]["label"], "arm": arm, "ranks": ranks, "batch": batch, "seq": seq,
            "gamma": gamma if arm == "grass-fsdp" else None, "steps": steps, "peak_bytes_per_rank": total,
            "host_optimizer_bytes_per_rank": host_bytes, "breakdown": {**breakdown, "Total": total}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b,llama2-70b", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated: {', '.join(ARMS)}")
    ap.add_argument("--ranks", type=int, default=8, help="FSDP ranks (simulated)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--gamma", type=int, default=4, help="blocks trained at a time (grass-fsdp)")
    ap.add_argument("--steps", type=int, default=2, help="training steps followed (the peak is over all of them)")
    args = ap.parse_args(argv)
    models, arms = args.models.split(","), args.arms.split(",")
    bad = [m for m in models if m not in MODELS] + [a for a in arms if a not in ARMS]
    if bad or args.ranks < 1 or args.steps < 1:
        print(f"fsdp_memory: unknown model/arm {bad} (models: {', '.join(MODELS)}; arms: {', '.join(ARMS)}) "
              f"or --ranks/--steps < 1", file=sys.stderr)
        return 2
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=args.ranks, store=FakeStore())
    rows = []
    try:
        for m in models:
            for a in arms:
                r = estimate(m, a, args.ranks, args.batch, args.seq, args.gamma, args.steps)
                print(json.dumps(r), flush=True)
                rows.append(r)
    finally:
        dist.destroy_process_group()
    print(f"\nESTIMATE (FSDPMemTracker, fake tensors, fake process group of {args.ranks} ranks; batch {args.batch} x "
          f"{args.seq} tokens per rank, bf16, peak over {args.steps} steps):\n")
    print("| model | arm | peak per rank (GiB) | parameters | gradients | optimizer state | activations + temp | "
          "all-gather + reduce-scatter buffers | host optimizer state per rank (GiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = r["breakdown"]

        def g(*keys: str) -> str:
            return f"{sum(b.get(k, 0) for k in keys) / GiB:.2f}"

        print(f"| {r['model']} | {r['arm']} | {r['peak_bytes_per_rank'] / GiB:.2f} | "
              f"{g('Sharded Param', 'Unsharded Param')} | {g('Sharded Grad', 'Unsharded Grad')} | {g('OptState')} | "
              f"{g('Activation', 'Temp')} | {g('All Gather', 'Reduce Scatter')} | "
              f"{r['host_optimizer_bytes_per_rank'] / GiB:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
