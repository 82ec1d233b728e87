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
import os

from .config import LeanKConfig

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _checkout_root():
    """The repository root when running from a checkout, where ``patches/`` and
    ``tilelang_kernels/`` are top-level folders beside ``leank/``; None in an installed wheel,
    which holds them as ``leank/patches`` and ``leank/tilelang_kernels``."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if os.path.isdir(os.path.join(here, "patches")):
        return None
    if all(os.path.isfile(os.path.join(root, p, "__init__.py")) for p in ("patches", "tilelang_kernels")):
        return root
    return None


# ``leank.patches`` / ``leank.tilelang_kernels`` resolve in a checkout too (only this package's
# own search path changes; nothing else is touched).
if (_root := _checkout_root()) is not None and _root not in __path__:
    __path__.append(_root)

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
