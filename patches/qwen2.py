"""Qwen2 / Qwen2.5: GQA with q/k/v bias (applied before RoPE: nothing to do); sliding window refused.

YaRN rope scaling selects the ``yarn`` mask set (``patches.base.standard_context_set``).
"""

from __future__ import annotations

from .base import ModelFamily


def _check(config) -> None:
    if getattr(config, "use_sliding_window", False):
        raise ValueError(
            "config.use_sliding_window: LeanK needs full attention in every layer, got use_sliding_window=True"
        )


QWEN2 = ModelFamily(model_type="qwen2", check=_check)
