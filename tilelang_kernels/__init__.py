"""LeanK decode kernels.

``reference`` (pure PyTorch) is always importable. TileLang kernels live in their own
modules and are imported only when the ``tilelang`` backend is used on CUDA.
"""

from .reference import decode_attention_reference, merge_states, validate_decode_inputs

__all__ = ["decode_attention_reference", "merge_states", "validate_decode_inputs"]
