"""The ``ModelFamily`` description shared by the per-model modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class ModelFamily:
    """What LeanK needs to know about an architecture.

    Attributes:
        model_type: ``config.model_type`` handled by this family.
        check: raises ``ValueError`` for configs of this type LeanK cannot serve.

    The mask set (``default`` / ``yarn``) follows the config's rope scaling and is chosen
    by ``leank.masks.resolve_mask``.
    """

    model_type: str
    check: Callable[[object], None]


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
