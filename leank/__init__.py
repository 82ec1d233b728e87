"""LeanK: learned static K-cache channel pruning for long-context decoding.

    import leank
    leank.patch(model, masks="meta-llama/Llama-3.1-8B-Instruct")
    out = model.generate(**inputs, max_new_tokens=256)
    leank.unpatch(model)

Importing this package patches nothing and imports no TileLang.
"""

from __future__ import annotations

import importlib
import logging

from .config import LeanKConfig

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

_LAZY = {
    "patch": ("leank.patching", "patch"),
    "unpatch": ("leank.patching", "unpatch"),
    "is_patched": ("leank.patching", "is_patched"),
    "new_cache": ("leank.patching", "new_cache"),
    "LeanKCache": ("leank.cache", "LeanKCache"),
    "ChannelMask": ("leank.masks", "ChannelMask"),
    "load_mask": ("leank.masks", "load_mask"),
    "resolve_mask": ("leank.masks", "resolve_mask"),
    "compact": ("leank.compaction", "compact"),
}

__all__ = ["LeanKConfig", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'leank' has no attribute {name!r}")
