"""Masks with the kept-count mix of the published LeanK masks: moved to :mod:`leank.baselines`.

Kept so that ``from leank.mixes import mix_mask, LLAMA_MIX, QWEN_MIX`` keeps working.
"""

from __future__ import annotations

from .baselines import LLAMA_MIX, QWEN_MIX, low_frequency_order, mix_counts, mix_mask

_counts_for = mix_counts  # the former private name

__all__ = ["LLAMA_MIX", "QWEN_MIX", "low_frequency_order", "mix_counts", "mix_mask"]
