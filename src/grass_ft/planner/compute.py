"""A step's matrix-multiply work relative to full fine-tuning's, from the parameter counts (a model, not a timing).

Per token, a linear layer of N parameters costs N multiply-accumulates forward, N more for the gradient of its
input and N for the gradient of its weight; attention adds about ``seq x hidden`` per block each way (causal: half
of the full square, twice). Full fine-tuning pays forward + both gradients everywhere (3F). A layer-wise step pays
the input gradients from the head down to the lowest active block, and weight gradients only for what trains;
with the embeddings trained, backward always reaches the input. Gradient checkpointing recomputes the forward of
every block backward passes through. LoRA pays the input gradients everywhere and the weight gradients of its
adapters only. Host <-> device copies of an offloaded optimizer are not in this figure (see ``transfer_bytes``).
"""

from __future__ import annotations

from math import comb

from .memory import Setting
from .shape import ModelShape


def _lowest_expected(L: int, gamma: int) -> float:
    """Expected index of the lowest of ``gamma`` blocks drawn uniformly without replacement from ``L``."""
    return sum(low * comb(L - 1 - low, gamma - 1) for low in range(L - gamma + 1)) / comb(L, gamma)


def step_cost(shape: ModelShape, s: Setting, seq: int) -> float:
    """Matmul work of one step of ``s`` divided by that of full fine-tuning without checkpointing."""
    L = shape.num_blocks
    blk = max(shape.block_numel) + seq * shape.hidden  # a block's MACs per token, attention included
    head = shape.vocab * shape.hidden
    fwd = L * blk + head
    fft = 3 * fwd
    if s.method == "fft":
        cost = fft + (L * blk if s.gradient_checkpointing else 0)
        return cost / fft
    if s.adapters:
        adapters = shape.lora_numel(s.lora_r or 8)
        cost = fwd + adapters + (head + L * blk) + 2 * adapters + (L * blk if s.gradient_checkpointing else 0)
        return cost / fft
    gamma = min(max(1, s.gamma or 1), L)
    embeddings = s.train_embeddings or s.method == "lisa"
    head_trained = s.train_head or s.method == "lisa"
    lowest = 0.0 if embeddings else _lowest_expected(L, gamma)
    depth = L - lowest  # blocks backward passes through
    bwd = head + depth * blk + gamma * max(shape.block_numel) + (head if head_trained else 0)
    cost = fwd + bwd + (depth * blk if s.gradient_checkpointing else 0)
    return cost / fft
