"""Key-selection methods of attention matching, registered in one place.

A method picks, per problem (KV head of one sequence), at most ``budget[g]`` of the ``T``
keys to keep; the rest of attention matching (beta by NNLS, C_v by least squares) is shared.
``compact_heads``, ``leank.compact`` and ``leank compact --method`` all read this registry.
Each built-in method is one small module (``select_hak``, ``select_omp``); a new one is

    @register_selection("mine")
    def select(p: SelectionProblem) -> tuple[Tensor, Tensor]: ...

Contract: return ``index`` int64 ``[G, t]`` in token order, clamped to ``[0, T)``, and bool
``active [G, t]`` (which slots hold a selected key; at most ``budget[g]`` per row, never an
invalid key). Problems whose budget covers all their valid keys are handled by the caller.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Tensor = torch.Tensor
SelectFn = Callable[["SelectionProblem"], tuple[Tensor, Tensor]]

_METHODS: dict[str, SelectFn] = {}
_BUILTIN_MODULES = ("select_hak", "select_omp")  # registration order = listing order
_loaded = False


@dataclass
class SelectionProblem:
    """What a selection method sees.

    Attributes:
        queries: ``[G, n, D]`` reference queries.
        keys: ``[G, T, D]``.
        bias: float32 ``[G, T]`` existing logit bias (``-inf`` = no entry) or None.
        valid: bool ``[G, T]``: keys that exist.
        lse: ``[G, n]`` log-sum-exp of the queries against all keys (the targets).
        scale: softmax scale.
        budget: int64 ``[G]`` keys to keep per problem (``<=`` its valid keys).
        t: ``budget.max()``: the number of slots to return.
        chunk: keys per scoring chunk (bounds the workspace).
        options: method-specific options (e.g. ``keys_per_step`` of OMP); None = defaults.
    """

    queries: Tensor
    keys: Tensor
    bias: Optional[Tensor]
    valid: Tensor
    lse: Tensor
    scale: float
    budget: Tensor
    t: int
    chunk: int
    options: dict = field(default_factory=dict)


def register_selection(name: str) -> Callable[[SelectFn], SelectFn]:
    """Decorator: register ``fn`` as selection method ``name`` (a later registration replaces it)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty str, got {name!r}")

    def deco(fn: SelectFn) -> SelectFn:
        _METHODS[name] = fn
        return fn

    return deco


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{mod}")


def selection_methods() -> tuple[str, ...]:
    """Names of the registered selection methods (built-ins first)."""
    _load_builtins()
    return tuple(_METHODS)


def get_selection(name: str) -> SelectFn:
    """The selection function registered as ``name``; ``ValueError`` listing the choices."""
    _load_builtins()
    fn = _METHODS.get(name)
    if fn is None:
        raise ValueError(f"method: expected one of {tuple(_METHODS)}, got {name!r}")
    return fn
