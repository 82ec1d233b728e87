"""Llama (Llama-3.x): GQA, no q/k/v bias; ``llama3`` rope scaling uses the default mask set."""

from __future__ import annotations

from .base import ModelFamily

LLAMA = ModelFamily(model_type="llama")  # the standard readers of patches.base
