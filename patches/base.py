"""The ``ModelFamily`` description shared by the per-model modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


def rope_type(config) -> str:
    """The rope scaling type of a config (transformers 5 ``rope_parameters`` or ``rope_scaling``)."""
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if isinstance(params, dict):
            kind = params.get("rope_type") or params.get("type")
            if kind:
                return str(kind)
    return "default"


def context_set_from_rope(config) -> str:
    """``"yarn"`` when the config uses YaRN rope scaling, else ``"default"``."""
    return "yarn" if rope_type(config) == "yarn" else "default"


@dataclass(frozen=True)
class ModelFamily:
    """What LeanK needs to know about an architecture.

    Attributes:
        model_type: ``config.model_type`` handled by this family.
        qkv_bias: whether q/k/v projections carry a bias (informational: applied before RoPE).
        check: raises ``ValueError`` for configs of this type LeanK cannot serve.
        context_set: mask set implied by the config (``"default"`` or ``"yarn"``).
    """

    model_type: str
    qkv_bias: bool
    check: Callable[[object], None]
    context_set: Callable[[object], str]


def family_for(config) -> ModelFamily:
    """The family of ``config.model_type``; ``ValueError`` for unsupported architectures."""
    from . import FAMILIES

    model_type = getattr(config, "model_type", None)
    fam: Optional[ModelFamily] = FAMILIES.get(model_type)
    if fam is None:
        raise ValueError(
            f"model: unsupported architecture {model_type!r}; LeanK supports {sorted(FAMILIES)}"
        )
    fam.check(config)
    return fam
