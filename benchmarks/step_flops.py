"""Matmul-FLOP model of a layer-sampling step against a full fine-tuning step, from a model's config.json.

Why GRASS cannot reach 0.5x FFT step time on a model like SmolLM2-135M: forward costs the same for every method
(F); FFT's backward costs about 2F (input and weight gradients everywhere); a sampling step's backward needs input
gradients from the head down to the lowest active block and weight gradients only for the γ active ones. With
γ blocks drawn uniformly from L, the lowest is at index ~L/(γ+1), so most blocks still carry an input gradient.

Counts multiply-accumulates of the linear layers per token (attention scores and elementwise work left out; they
are small at these sequence lengths), embeddings and head frozen, head tied or not. Usage:

    python benchmarks/step_flops.py [--config ~/.cache/grass-ft/smollm2-135m/config.json] [--preset llama-2-7b] [--gammas 1 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
from math import comb
from pathlib import Path


# Published config.json values of two models of the paper's tables (no download needed).
PRESETS = {
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
}


def block_macs(c: dict) -> int:
    h, i = c["hidden_size"], c["intermediate_size"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or c["num_attention_heads"]
    return 2 * h * h + 2 * h * head_dim * kv + 3 * h * i  # q, o; k, v; gate, up, down


def sampling_ratio(c: dict, gamma: int) -> float:
    """Expected (sampling step) / (FFT step) matmul cost with γ of L blocks drawn uniformly without replacement."""
    n, blk, head = c["num_hidden_layers"], block_macs(c), c["hidden_size"] * c["vocab_size"]
    fwd = n * blk + head
    expected_bwd = 0.0
    for low in range(n - gamma + 1):  # index of the lowest active block
        p = comb(n - 1 - low, gamma - 1) / comb(n, gamma)
        # head input-grad, input-grads of the blocks above the lowest active one, weight-grads of the active ones
        expected_bwd += p * (head + (n - 1 - low) * blk + gamma * blk)
    return (fwd + expected_bwd) / (3 * fwd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cache = Path(os.environ.get("GRASS_FT_CACHE", Path.home() / ".cache" / "grass-ft"))
    ap.add_argument("--config", default=str(cache / "smollm2-135m" / "config.json"))
    ap.add_argument("--preset", choices=sorted(PRESETS), help="use a published config instead of --config")
    ap.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    c = PRESETS[args.preset] if args.preset else json.loads(Path(args.config).read_text())
    name = args.preset or args.config
    n, blk, head = c["num_hidden_layers"], block_macs(c), c["hidden_size"] * c["vocab_size"]
    print(f"{name}: {n} blocks of {blk:,} MACs/token, head {head:,} MACs/token "
          f"({head / (n * blk + head):.1%} of the forward)")
    print("| γ | expected step cost / FFT step cost |\n|---|---|")
    for g in args.gammas:
        print(f"| {g} | {sampling_ratio(c, g):.3f} |")


if __name__ == "__main__":
    main()
