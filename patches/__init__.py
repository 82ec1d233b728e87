"""Per-model glue: what really differs between the supported architectures.

Both Llama and Qwen2 compute attention through transformers' ``AttentionInterface``
and cache through ``Cache.update``, so LeanK needs no change to their ``forward``.
What differs lives in a :class:`ModelFamily` per architecture: Qwen2's q/k/v bias (applied
before RoPE, nothing to do), Qwen2's optional sliding window (refused: the archive assumes
full attention), how a config gives the attention shape and the rope scaling that selects a
mask set (Qwen2.5 YaRN beyond 32K), and where the decoder stack is. The library asks
:func:`model_dims`, :func:`context_set_of` and :func:`decoder_of`; adding a family is one
new module plus one entry in ``FAMILIES``.
"""

from __future__ import annotations

from .base import (
    DEFAULT_SET,
    GENERIC,
    YARN_SET,
    ModelFamily,
    context_set_of,
    decoder_of,
    family_for,
    family_or_generic,
    model_dims,
    rope_scaling_of,
)
from .llama import LLAMA
from .qwen2 import QWEN2

FAMILIES = {f.model_type: f for f in (LLAMA, QWEN2)}

__all__ = ["DEFAULT_SET", "FAMILIES", "GENERIC", "LLAMA", "ModelFamily", "QWEN2", "YARN_SET", "context_set_of",
           "decoder_of", "family_for", "family_or_generic", "model_dims", "rope_scaling_of"]
