"""LeanK decode kernels.

``reference`` (pure PyTorch) and ``supports`` (``capability``: can the TileLang kernel run
this call? None, or the reason) are always importable and import no TileLang. TileLang
kernels live in their own modules and are imported only when the ``tilelang`` backend is
used on CUDA:
``decode_attention`` (``tilelang_kernels.decode``) is resolved lazily and imports
TileLang on its first call, never at import time.
"""

from .capability import supports
from .lse import merge_states
from .reference import decode_attention_reference, validate_decode_inputs

__all__ = ["decode_attention", "decode_attention_reference", "merge_states", "supports", "validate_decode_inputs"]


def __getattr__(name):
    if name == "decode_attention":
        from .decode import decode_attention

        return decode_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
