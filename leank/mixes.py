"""Masks with the kept-count mix of the published LeanK masks, for benchmarks and the demo.

Of Llama-3.1-8B-Instruct's 256 KV heads the published mask keeps 0 channels in 47,
32 in 120, 64 in 67 and 96 in 22; of Qwen2.5-7B-Instruct's 112: 35, 34, 33 and 10.
``mix_mask`` places such counts at random (fixed seed) on any model shape, scaling the
counts to the number of heads; the kept channels are the lowest-frequency RoPE pairs
first (as a learned mask mostly keeps), so the mask is realistic for timing and memory.
"""

from __future__ import annotations

import torch

from .masks import ChannelMask

LLAMA_MIX = {0: 47, 32: 120, 64: 67, 96: 22}
QWEN_MIX = {0: 35, 32: 34, 64: 33, 96: 10}


def _counts_for(mix: dict[int, int], total: int, gen: torch.Generator) -> torch.Tensor:
    """``total`` kept counts in the proportions of ``mix`` (largest remainder), shuffled."""
    n = sum(mix.values())
    exact = {d: c * total / n for d, c in mix.items()}
    alloc = {d: int(v) for d, v in exact.items()}
    for d in sorted(exact, key=lambda d: exact[d] - alloc[d], reverse=True)[: total - sum(alloc.values())]:
        alloc[d] += 1
    counts = torch.tensor([d for d, c in alloc.items() for _ in range(c)], dtype=torch.long)
    return counts[torch.randperm(total, generator=gen)]


def low_frequency_order(head_dim: int) -> torch.Tensor:
    """Channel indices from lowest to highest RoPE frequency, pairs (i, i + head_dim/2) together."""
    half = head_dim // 2
    order = []
    for i in reversed(range(half)):
        order += [i, i + half]
    return torch.tensor(order)


def mix_mask(num_layers: int, num_kv_heads: int, head_dim: int = 128, mix: dict[int, int] = LLAMA_MIX, seed: int = 0, model_id: str = "") -> ChannelMask:
    """A ``ChannelMask`` whose per-head kept counts follow ``mix`` ({count: heads}), placed at random."""
    if any(d > head_dim or d % 32 for d in mix):
        raise ValueError(f"mix: kept counts must be multiples of 32 up to head_dim={head_dim}, got {sorted(mix)}")
    gen = torch.Generator().manual_seed(seed)
    counts = _counts_for(mix, num_layers * num_kv_heads, gen).view(num_layers, num_kv_heads)
    order = low_frequency_order(head_dim)
    keep = torch.zeros(num_layers, num_kv_heads, head_dim, dtype=torch.bool)
    for l in range(num_layers):
        for h in range(num_kv_heads):
            keep[l, h, order[: int(counts[l, h])]] = True
    return ChannelMask(keep=keep, model_id=model_id, align=32, source=f"kept-count mix {mix}, seed {seed}")
