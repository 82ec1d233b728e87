"""Baseline channel masks: RoPE-frequency, random, the published kept-count mixes, same-budget.

* :func:`kept_counts_for` spreads a model-wide budget of ``align``-channel blocks over the
  heads (as training's stage 2 does); :func:`rope_keep` / :func:`random_keep` place given
  kept counts (lowest RoPE frequencies first / at random);
* :func:`from_rope_frequency` (data-free) and ``ChannelMask.random`` build masks at a target
  sparsity from them;
* :func:`mix_mask` follows the kept-count mix of the published LeanK masks (benchmarks, demo):
  of Llama-3.1-8B-Instruct's 256 KV heads the published mask keeps 0 channels in 47, 32 in
  120, 64 in 67 and 96 in 22; of Qwen2.5-7B-Instruct's 112: 35, 34, 33 and 10. The counts
  are placed at random (fixed seed) on any model shape, scaled to the number of heads; the
  kept channels are the lowest-frequency RoPE pairs first (as a learned mask mostly keeps);
* :func:`same_budget_baselines`: RoPE and random masks with a learned mask's total kept
  channels and align (the mask-quality comparison).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from leank.patches import context_set_of, model_dims

from .masks import ChannelMask, _warn

logger = logging.getLogger(__name__)


def rope_keep(counts: torch.Tensor, head_dim: int) -> torch.Tensor:
    """bool ``[*counts.shape, head_dim]``: each head keeps its ``counts`` lowest-frequency
    channels, whole RoPE pairs (HF ``rotate_half`` layout: channel ``i`` pairs with
    ``i + head_dim/2``, both at frequency index ``i mod head_dim/2``; a higher index is a
    lower frequency). ``counts`` are even."""
    half = head_dim // 2
    freq_index = torch.arange(head_dim) % half
    return freq_index >= half - counts[..., None] // 2


def random_keep(counts: torch.Tensor, head_dim: int, generator: torch.Generator) -> torch.Tensor:
    """bool ``[*counts.shape, head_dim]``: each head keeps ``counts`` channels drawn uniformly
    at random (individual channels, not RoPE pairs) with ``generator``."""
    scores = torch.rand(*counts.shape, head_dim, generator=generator)
    ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return ranks < counts[..., None]


def kept_counts_for(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    sparsity: float,
    align: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Kept channels per head for a target ``sparsity`` over the whole model: int64
    ``[num_layers, num_kv_heads]``, multiples of ``align``.

    As stage 2 of training does with its global quantile, the budget is model-wide: the
    total kept is ``(1 - sparsity) * num_layers * num_kv_heads * head_dim`` rounded to the
    nearest multiple of ``align`` (ties keep more), and the aligned blocks are distributed
    over the heads, every head getting ``floor`` of the share and the remainder one more
    block (evenly spread over the heads, or at heads drawn with ``generator``). So the
    achieved sparsity is within half a block over the whole model of the request even when
    one head's share is less than one block (head_dim 64, align 32, sparsity 0.8 keeps 32
    channels in 40% of the heads instead of pruning everything). A request whose budget
    rounds to 0 channels raises ``ValueError`` (use a smaller ``align`` or a lower sparsity).
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity: expected a float in [0, 1), got {sparsity!r}")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1 or head_dim % align:
        raise ValueError(f"align: expected an int >= 1 dividing head_dim={head_dim}, got {align!r}")
    for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    heads = num_layers * num_kv_heads
    total = heads * head_dim
    exact_units = (1.0 - float(sparsity)) * total / align
    units = int(math.floor(exact_units + 0.5 + 1e-9))
    if units == 0:
        raise ValueError(
            f"sparsity: expected at most {1 - align / (2 * total):.6f} for {num_layers} layers x {num_kv_heads} KV "
            f"heads of head_dim {head_dim} with align={align} (a higher sparsity keeps less than half of one "
            f"{align}-channel block in the whole model, i.e. prunes every channel), got {sparsity!r}; "
            f"lower the sparsity or the align"
        )
    base, extra = divmod(units, heads)
    counts = torch.full((heads,), base, dtype=torch.int64)
    if extra:
        if generator is not None:
            chosen = torch.randperm(heads, generator=generator)[:extra]
        else:  # evenly spread over layers and heads
            chosen = torch.tensor([int((i + 0.5) * heads / extra) for i in range(extra)])
        counts[chosen] += 1
    counts = (counts * align).view(num_layers, num_kv_heads)
    achieved = _achieved(counts, head_dim)
    logger.info("sparsity %.4f requested, %.4f achieved (align=%d, %d heads of head_dim %d, kept counts %s)",
                sparsity, achieved, align, heads, head_dim, sorted(set(counts.flatten().tolist())))
    if abs(achieved - float(sparsity)) > SPARSITY_WARN_TOLERANCE:
        _warn(f"sparsity {float(sparsity):.4f} was requested but {achieved:.4f} is the nearest this model allows "
              f"with align={align} ({heads} KV heads x head_dim {head_dim}: steps of "
              f"{align / total:.4f} over the whole model)")
    return counts


# a baseline whose achieved sparsity differs from the request by more than this warns
SPARSITY_WARN_TOLERANCE = 0.01


def _achieved(counts: torch.Tensor, head_dim: int) -> float:
    return 1.0 - float(counts.sum()) / (counts.numel() * head_dim)


def from_rope_frequency(config: Any, sparsity: float, align: int = 32) -> ChannelMask:
    """Data-free baseline: every KV head keeps its lowest-frequency RoPE channel pairs.

    HF ``rotate_half`` layout: channel ``i`` pairs with ``i + head_dim/2`` and both rotate
    at frequency index ``i mod head_dim/2``; a higher index is a lower frequency. Head
    ``(l, h)`` keeps ``k = counts[l, h]`` channels, the pairs with frequency index
    ``>= head_dim/2 - k/2``, where ``counts = kept_counts_for(...)`` spreads the model-wide
    budget over the heads (see there: the achieved sparsity is within half an aligned block
    over the whole model of the request; it is logged, stored in
    ``metadata["achieved_sparsity"]``, and warned about when it differs by more than
    ``SPARSITY_WARN_TOLERANCE``). ``align`` must be even so that whole pairs are kept.
    """
    layers, kv_heads, head_dim = model_dims(config)
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise ValueError(f"config.partial_rotary_factor: expected 1.0, got {config.partial_rotary_factor}")
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even RoPE head dim, got {head_dim}")
    if isinstance(align, int) and not isinstance(align, bool) and align % 2:
        raise ValueError(f"align: expected an even value so whole RoPE pairs are kept, got {align}")
    counts = kept_counts_for(layers, kv_heads, head_dim, sparsity, align)
    keep = rope_keep(counts, head_dim)
    return ChannelMask(
        keep,
        model_id=getattr(config, "name_or_path", "") or "",
        align=align,
        context_set=context_set_of(config),
        source="rope-frequency baseline",
        metadata={"method": "rope_frequency", "requested_sparsity": float(sparsity),
                  "achieved_sparsity": _achieved(counts, head_dim)},
    )


# ----------------------------------------------------------------------------- published mixes
LLAMA_MIX = {0: 47, 32: 120, 64: 67, 96: 22}
QWEN_MIX = {0: 35, 32: 34, 64: 33, 96: 10}


def mix_counts(mix: dict[int, int], total: int, gen: torch.Generator) -> torch.Tensor:
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
    counts = mix_counts(mix, num_layers * num_kv_heads, gen).view(num_layers, num_kv_heads)
    keep = rope_keep(counts, head_dim)
    return ChannelMask(keep=keep, model_id=model_id, align=32, source=f"kept-count mix {mix}, seed {seed}")



def same_budget_baselines(learned: ChannelMask, seed: int) -> dict[str, ChannelMask]:
    """``{"rope": ..., "random": ...}``: baselines with the *same total kept channels and
    align* as ``learned``, kept counts spread as evenly as ``align`` allows over the heads
    (the heads with one more block drawn with ``seed``; random channels drawn with it too)."""
    total = int(learned.keep.sum())
    L, H, D = learned.num_layers, learned.num_kv_heads, learned.head_dim
    gen = torch.Generator().manual_seed(seed)
    counts = kept_counts_for(L, H, D, 1.0 - total / (L * H * D), learned.align, generator=gen)
    common = dict(model_id=learned.model_id, align=learned.align, context_set=learned.context_set)
    return {
        "rope": ChannelMask(rope_keep(counts, D), source="rope-frequency baseline (same budget)",
                            metadata={"method": "rope_frequency_even_counts"}, **common),
        "random": ChannelMask(random_keep(counts, D, torch.Generator().manual_seed(seed)),
                              source="random baseline (same budget)",
                              metadata={"method": "random_even_counts", "seed": seed}, **common),
    }
