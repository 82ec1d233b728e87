"""``leank.patch`` / ``leank.unpatch``: switch a Llama or Qwen2 model to LeanK decoding.

``patch`` changes three things on the model instance, all undone by ``unpatch``:

1. ``config._attn_implementation`` becomes ``"leank"`` (registered with transformers'
   ``AttentionInterface`` and ``AttentionMaskInterface`` on first use, never at import);
2. ``model.generate`` (an instance attribute shadowing the class method) supplies a
   fresh ``LeanKCache`` when the caller passes no ``past_key_values``;
3. ``model._leank`` records the mask, the config and what to restore.

Weights are never touched.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Optional

from .config import LeanKConfig

logger = logging.getLogger(__name__)

_STATE_ATTR = "_leank"


@dataclass
class PatchState:
    mask: object  # ChannelMask
    config: LeanKConfig
    original_attn_implementation: Optional[str]
    family: str


def _register() -> None:
    """Register the ``"leank"`` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .attention import ATTENTION_NAME, leank_attention_forward, leank_mask

    AttentionInterface.register(ATTENTION_NAME, leank_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, leank_mask)


def is_patched(model) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def patch(model, masks, config: Optional[LeanKConfig] = None, *, context_set: Optional[str] = None, allow_fallback: bool = False):
    """Make ``model`` decode with LeanK.

    Args:
        model: a transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (or base model).
        masks: a ``ChannelMask``, a mask file (``.safetensors`` or published ``.pth``), or a
            model id / alias from the registry (``leank masks list``).
        config: window sizes and backend (``LeanKConfig()`` by default).
        context_set: mask set to use (``"default"``, ``"yarn"``); by default chosen from
            the model's rope scaling.
        allow_fallback: when the wanted set is missing, use the default set (logged)
            instead of raising.

    Returns the same model, patched. Raises ``ValueError`` for unsupported architectures,
    masks that do not fit the model, or a model that is already patched.
    """
    from patches import family_for

    from .masks import resolve_mask

    if is_patched(model):
        raise ValueError("model: already patched by leank; call leank.unpatch(model) first")
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    family = family_for(cfg)
    mask = resolve_mask(masks, cfg, context_set=context_set, allow_fallback=allow_fallback)
    config = config or LeanKConfig()
    if not isinstance(config, LeanKConfig):
        raise ValueError(f"config: expected a LeanKConfig, got {type(config).__name__}")
    _register()
    state = PatchState(mask, config, cfg._attn_implementation, family.model_type)
    model.set_attn_implementation("leank")
    setattr(model, _STATE_ATTR, state)
    model.generate = functools.partial(_generate, model, type(model).generate)
    logger.info(
        "leank: patched %s (%s, mask sparsity %.1f%%, sink=%d recent=%d flush_every=%d backend=%s)",
        type(model).__name__, family.model_type, 100 * float(_sparsity(mask)), config.sink, config.recent,
        config.flush_every, config.backend,
    )
    return model


def _sparsity(mask) -> float:
    keep = mask.keep
    return 1.0 - keep.float().mean().item()


def unpatch(model):
    """Undo ``patch``: restore the attention implementation and ``generate``; weights untouched."""
    state: Optional[PatchState] = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("model: not patched by leank")
    try:
        model.set_attn_implementation(state.original_attn_implementation)
    finally:
        model.__dict__.pop("generate", None)
        delattr(model, _STATE_ATTR)
    return model


def new_cache(model):
    """A fresh ``LeanKCache`` for a patched model (to pass as ``past_key_values``)."""
    from .cache import LeanKCache

    state: Optional[PatchState] = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("model: not patched by leank; call leank.patch(model, masks=...) first")
    return LeanKCache(state.mask, state.config)


def _generate(model, original_generate, *args, **kwargs):
    """``generate`` with a fresh ``LeanKCache`` unless the caller passes a cache.

    The cache reserves archive rows for ``max_new_tokens`` so that decoding never grows it.
    """
    from .cache import LeanKCache

    if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True) is not False:
        kwargs["past_key_values"] = new_cache(model)
    cache = kwargs.get("past_key_values")
    if isinstance(cache, LeanKCache):
        gen_cfg = kwargs.get("generation_config") or model.generation_config
        new_tokens = kwargs.get("max_new_tokens", getattr(gen_cfg, "max_new_tokens", None))
        if isinstance(new_tokens, int) and new_tokens > 0:
            cache.reserve(new_tokens + 1)
    return original_generate(model, *args, **kwargs)
