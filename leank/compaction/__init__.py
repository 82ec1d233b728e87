"""Attention matching KV compaction (arXiv 2602.16284) for LeanK caches.

    cache = leank.compact(model, cache, ratio=0.02, input_ids=ids)   # 50x fewer archive entries

``compact`` is the entry point; ``compact_heads`` is the cache-independent math on a batch
of KV heads; ``nnls`` and ``fit_values`` are the batched solvers it uses. Key selection
methods live in a registry (``selection_methods()``, ``register_selection``), one module each.
"""

from .api import collect_queries, compact, leank_cache_from_dense
from .core import (
    CompactedHeads,
    Targets,
    attention_targets,
    compact_heads,
    reconstruction_error,
    top_attention_baseline,
)
from .queries import REPEAT_PROMPT, QueryRecorder, record_queries
from .selection import SelectionProblem, register_selection, selection_methods
from .solvers import NNLSResult, fit_values, nnls

__all__ = [
    "CompactedHeads",
    "NNLSResult",
    "QueryRecorder",
    "REPEAT_PROMPT",
    "SelectionProblem",
    "Targets",
    "attention_targets",
    "collect_queries",
    "compact",
    "compact_heads",
    "fit_values",
    "leank_cache_from_dense",
    "nnls",
    "reconstruction_error",
    "record_queries",
    "register_selection",
    "selection_methods",
    "top_attention_baseline",
]
