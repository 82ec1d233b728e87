"""Per-model glue: what really differs between the supported architectures.

Both Llama and Qwen2 compute attention through transformers' ``AttentionInterface``
and cache through ``Cache.update``, so LeanK needs no change to their ``forward``.
What differs is checked here: Qwen2's q/k/v bias (applied before RoPE, nothing to do),
Qwen2's optional sliding window (refused: the archive assumes full attention), and
the rope scaling that selects a mask set (Qwen2.5 YaRN beyond 32K).
"""

from __future__ import annotations

from .base import ModelFamily, family_for
from .llama import LLAMA
from .qwen2 import QWEN2

FAMILIES = {f.model_type: f for f in (LLAMA, QWEN2)}

__all__ = ["FAMILIES", "ModelFamily", "family_for", "LLAMA", "QWEN2"]
