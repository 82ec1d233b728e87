"""The ``ModelFamily`` description shared by the per-model modules, and the generic readers.

A family says what LeanK needs to know about an architecture: which configs it can serve,
how to read the attention shape and the rope scaling (-> mask set) from a config, and where
the decoder stack is. The defaults here read the standard transformers fields; a family
whose model stores them elsewhere passes its own functions. The rest of the library asks
:func:`model_dims`, :func:`context_set_of` and :func:`decoder_of`, never the config itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

DEFAULT_SET = "default"  # mask set of configs without YaRN rope scaling
YARN_SET = "yarn"


# ----------------------------------------------------------------------------- generic readers
def standard_dims(config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` from the standard transformers fields:
    ``num_hidden_layers``, ``num_key_value_heads`` (default: ``num_attention_heads``) and
    ``head_dim`` (default: ``hidden_size // num_attention_heads``)."""
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
    except AttributeError as e:
        raise ValueError(f"config: expected a decoder config with num_hidden_layers and "
                         f"num_attention_heads, got {type(config).__name__}") from e
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return layers, int(kv), int(head_dim)


def rope_scaling_of(config: Any) -> dict:
    """The rope scaling dict of a config: ``rope_parameters`` (transformers 5) or
    ``rope_scaling`` (4.x); ``{}`` when absent. A per-layer-type dict of dicts is flattened
    to the first entry that names a non-default rope type."""
    for name in ("rope_parameters", "rope_scaling"):
        d = getattr(config, name, None)
        if not isinstance(d, dict) or not d:
            continue
        if all(isinstance(v, dict) for v in d.values()):
            typed = [v for v in d.values() if rope_type(v) not in ("", "default")]
            return typed[0] if typed else next(iter(d.values()))
        return d
    return {}


def rope_type(d: dict) -> str:
    """The (lower-case) rope type named by a rope scaling dict, ``""`` when none."""
    return str(d.get("rope_type") or d.get("type") or "").lower()


def standard_context_set(config: Any) -> str:
    """Mask set implied by the config's rope scaling: ``"yarn"`` for YaRN, else ``"default"``."""
    return YARN_SET if rope_type(rope_scaling_of(config)) == "yarn" else DEFAULT_SET


def standard_decoder(model: Any) -> Any:
    """The decoder stack returning ``last_hidden_state`` without the LM head:
    ``model.get_decoder()`` (``model.model`` for ``*ForCausalLM``, the model itself for a
    base model), else ``model.model`` when it has ``layers``, else ``model``."""
    if hasattr(model, "get_decoder"):
        return model.get_decoder()
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "layers") else model


def _no_check(config: Any) -> None:
    return None


# ----------------------------------------------------------------------------- the family
@dataclass(frozen=True)
class ModelFamily:
    """What LeanK needs to know about an architecture.

    Attributes:
        model_type: ``config.model_type`` handled by this family.
        check: raises ``ValueError`` for configs of this type LeanK cannot serve.
        dims: config -> ``(num_layers, num_kv_heads, head_dim)`` of the attention layers.
        context_set: config -> name of the mask set its rope scaling calls for
            (``"default"`` / ``"yarn"``; ``leank.masks.resolve_mask`` picks the file).
        decoder: model -> the decoder stack (no LM head) returning ``last_hidden_state``.

    Adding a family is one module defining a ``ModelFamily`` plus one entry in
    ``patches.FAMILIES``.
    """

    model_type: str
    check: Callable[[Any], None] = _no_check
    dims: Callable[[Any], tuple[int, int, int]] = standard_dims
    context_set: Callable[[Any], str] = standard_context_set
    decoder: Callable[[Any], Any] = standard_decoder


GENERIC = ModelFamily(model_type="")  # the standard readers, for configs of no known family


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


def family_or_generic(config) -> ModelFamily:
    """The family of ``config.model_type`` without checking it, or :data:`GENERIC` (the
    standard readers) for configs of no known family (e.g. a bare namespace in tests)."""
    from . import FAMILIES

    return FAMILIES.get(getattr(config, "model_type", None), GENERIC)


def model_dims(config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers config, read by its family."""
    return family_or_generic(config).dims(config)


def context_set_of(config: Any) -> str:
    """Mask set (``"default"`` / ``"yarn"``) the config calls for, read by its family."""
    return family_or_generic(config).context_set(config)


def decoder_of(model: Any) -> Any:
    """The decoder stack of ``model`` (no LM head; returns ``last_hidden_state``), by its family."""
    return family_or_generic(getattr(model, "config", None)).decoder(model)
