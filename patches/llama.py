"""Llama (Llama-3.x): GQA, no q/k/v bias; ``llama3`` rope scaling uses the default mask set."""

from __future__ import annotations

from .base import ModelFamily, context_set_from_rope

LLAMA = ModelFamily(model_type="llama", qkv_bias=False, check=lambda config: None, context_set=context_set_from_rope)
