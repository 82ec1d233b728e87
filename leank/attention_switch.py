"""One way to switch a model's attention function, undone in ``finally``.

    with use_attention(model, "my_attention", fn):
        model(...)            # every attention layer calls fn

transformers routes attention through ``config._attn_implementation`` and its
``AttentionInterface`` registry. :func:`use_attention` registers ``fn`` under ``name``
(and optionally a mask function with ``AttentionMaskInterface``), points every config of
the model (the top one and any sub-config a module carries) at ``name``, and on exit puts
every config back and the registry entry back to what it was. Only public API is used:
``register`` and the interfaces' mapping reads. As the registry has no public removal, a
name that was not registered before is left pointing to a function that raises, so no
closure (and nothing it holds, e.g. recorded tensors) outlives the block.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional


def _configs(model: Any) -> list:
    """Every distinct config of ``model`` that has ``_attn_implementation``, top config first."""
    found = {}
    top = getattr(model, "config", None)
    if top is not None and hasattr(top, "_attn_implementation"):
        found[id(top)] = top
    modules = model.modules() if hasattr(model, "modules") else ()
    for m in modules:
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            found.setdefault(id(c), c)
    return list(found.values())


def _outside(name: str) -> Callable:
    def not_active(*args, **kwargs):
        raise RuntimeError(f"attention implementation {name!r} is only valid inside leank's use_attention() block "
                           f"that registered it")

    return not_active


@contextlib.contextmanager
def _registered(interface: Any, name: str, fn: Callable) -> Iterator[None]:
    previous = interface().get(name)
    interface.register(name, fn)
    try:
        yield
    finally:
        interface.register(name, previous if previous is not None else _outside(name))


@contextlib.contextmanager
def use_attention(model: Any, name: str, fn: Callable, mask_fn: Optional[Callable] = None) -> Iterator[None]:
    """Run ``model``'s attention through ``fn`` inside the block; restored in ``finally``.

    Args:
        model: a transformers model (or any module whose submodules carry configs).
        name: the implementation name to register ``fn`` under (a fixed name per use).
        fn: an ``AttentionInterface`` function ``(module, query, key, value,
            attention_mask, **kwargs) -> (out [B, Q, H, D], weights or None)``.
        mask_fn: optional ``AttentionMaskInterface`` function for ``name`` (e.g. the one of
            the implementation being wrapped); None leaves transformers' default mask.

    Nesting works (an inner block with the same name restores the outer's function).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    configs = _configs(model)
    saved = [c._attn_implementation for c in configs]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_registered(AttentionInterface, name, fn))
        if mask_fn is not None:
            stack.enter_context(_registered(AttentionMaskInterface, name, mask_fn))
        try:
            for c in configs:
                c._attn_implementation = name
            yield
        finally:
            for c, impl in zip(configs, saved):  # top first: its setter also resets sub-configs
                c._attn_implementation = impl


def mask_function_of(implementation: str) -> Optional[Callable]:
    """The ``AttentionMaskInterface`` function registered for ``implementation``, or None."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS.get(implementation)
