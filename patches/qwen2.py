"""Qwen2 / Qwen2.5: GQA with q/k/v bias; YaRN rope scaling selects the ``yarn`` mask set."""

from __future__ import annotations

from .base import ModelFamily, context_set_from_rope


def _check(config) -> None:
    if getattr(config, "use_sliding_window", False):
        raise ValueError(
            "config.use_sliding_window: LeanK needs full attention in every layer, got use_sliding_window=True"
        )


QWEN2 = ModelFamily(model_type="qwen2", qkv_bias=True, check=_check, context_set=context_set_from_rope)
