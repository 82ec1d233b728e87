"""``leank.patch`` / ``leank.unpatch``: switch a Llama or Qwen2 model to LeanK decoding.

``patch`` changes three things on the model instance, all undone by ``unpatch``:

1. ``config._attn_implementation`` becomes ``"leank"`` (registered with transformers'
   ``AttentionInterface`` and ``AttentionMaskInterface`` on first use, never at import);
2. ``model.generate`` (an instance attribute shadowing the class method, for models
   that have one) supplies a fresh ``LeanKCache`` sized for the call when the caller
   passes no cache, and for the duration of the call lets ``leank.capture`` serve the
   decode steps as CUDA graphs (``LeanKConfig.capture``);
3. ``model._leank`` records the mask, the config and what to restore;
4. under tensor parallelism (``LeanKConfig.tp_balance``), each layer's attention weights
   are permuted by KV head across the ranks so that the ranks' K/V bytes are even
   (``leank.tp``; the model computes the same function). A tensor-parallel ``patch`` and
   ``unpatch`` are collectives: every rank calls them.

No other weight value changes. A patch that fails part-way leaves the model as it was.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .config import LeanKConfig
from .diagnostics import warn_once

logger = logging.getLogger(__name__)

_STATE_ATTR = "_leank"


@dataclass
class PatchState:
    mask: object  # ChannelMask
    config: LeanKConfig
    original_attn_implementation: Optional[str]
    runner: object = None  # leank.capture.DecodeGraphRunner, created on first generate
    head_order: object = None  # tensor parallel: [layers, kv_heads] order the weights were permuted to (leank.tp)
    emulate_capture: bool = False  # tests: exercise the capture bookkeeping on the CPU


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
        model: a transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``, or a base
            ``LlamaModel`` / ``Qwen2Model`` (no ``generate``: pass ``leank.new_cache(model)``
            to its forward).
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
    from leank.patches import family_for

    from .masks import resolve_mask
    from .tp import shard_mask_for

    if is_patched(model):
        raise ValueError("model: already patched by leank; call leank.unpatch(model) first")
    if not isinstance(allow_fallback, bool):
        raise ValueError(f"allow_fallback: expected True or False, got {allow_fallback!r}")
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    family = family_for(cfg)
    mask = resolve_mask(masks, cfg, context_set=context_set, allow_fallback=allow_fallback)
    config = config or LeanKConfig()
    if not isinstance(config, LeanKConfig):
        raise ValueError(f"config: expected a LeanKConfig, got {type(config).__name__}")
    _register()
    # tensor parallel: keep this rank's KV heads, reordered across the ranks first (leank.tp; a collective)
    mask, head_order = shard_mask_for(model, mask, balance=config.tp_balance)
    state = PatchState(mask, config, cfg._attn_implementation, head_order=head_order)
    try:
        model.set_attn_implementation("leank")
        setattr(model, _STATE_ATTR, state)
        if callable(getattr(type(model), "generate", None)):
            model.generate = functools.partial(_generate, model, type(model).generate)
    except BaseException:
        model.__dict__.pop("generate", None)
        model.__dict__.pop(_STATE_ATTR, None)
        model.set_attn_implementation(state.original_attn_implementation)
        _restore_heads(model, state)
        raise
    logger.info(
        "leank: patched %s (%s, mask sparsity %.1f%%, sink=%d recent=%d flush_every=%d backend=%s capture=%s)",
        type(model).__name__, family.model_type, 100 * float(_sparsity(mask)), config.sink, config.recent,
        config.flush_every, config.backend, config.capture,
    )
    return model


def _sparsity(mask) -> float:
    keep = mask.keep
    return 1.0 - keep.float().mean().item()


def unpatch(model):
    """Undo ``patch``: restore the attention implementation, ``generate`` and, under tensor
    parallelism, the KV head order of the attention weights (a collective).

    The captured decode step's graphs are released first (``DecodeGraphRunner.release``); under
    tensor parallelism call this before ``torch.distributed.destroy_process_group()``, which
    otherwise hangs on the NCCL collectives the graphs recorded.
    """
    state: Optional[PatchState] = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("model: not patched by leank")
    try:
        if state.runner is not None:
            state.runner.release()
            state.runner = None
        model.set_attn_implementation(state.original_attn_implementation)
        _restore_heads(model, state)
    finally:
        model.__dict__.pop("generate", None)
        delattr(model, _STATE_ATTR)
    return model


def _restore_heads(model, state: PatchState) -> None:
    """Put KV heads that ``patch`` reordered across tensor-parallel ranks back (a collective)."""
    from .tp import restore_heads, shard_of

    if state.head_order is not None:
        restore_heads(model, state.head_order, shard_of(state.mask))
        state.head_order = None


def new_cache(model):
    """A fresh ``LeanKCache`` for a patched model (to pass as the model's cache)."""
    from .cache import LeanKCache

    state: Optional[PatchState] = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("model: not patched by leank; call leank.patch(model, masks=...) first")
    cache = LeanKCache(state.mask, state.config)
    cache.bind(model.config)
    return cache


def cache_kwarg(model) -> str:
    """The name ``generate``/``forward`` take the cache under: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The cache a ``generate`` / forward output returns (``out.cache`` on transformers >= 5.2x, else
    ``out.past_key_values``), read without the deprecated name's warning; None when there is none."""
    if "cache" in out:
        return out["cache"]
    return out["past_key_values"] if "past_key_values" in out else None


def _generate(model, original_generate, *args, **kwargs):
    """``generate`` with a fresh ``LeanKCache`` unless the caller passes a cache.

    The cache reserves rows for ``max_new_tokens`` so that decoding never grows it, and
    (``LeanKConfig.capture``) decode steps after the first replay a CUDA graph.
    """
    from .cache import LeanKCache
    from .tp import sync_sampling_rng

    state: PatchState = getattr(model, _STATE_ATTR)
    name = cache_kwarg(model)
    other = "past_key_values" if name == "cache" else "cache"
    if other in kwargs and kwargs[other] is None:
        del kwargs[other]
    if kwargs.get(other) is not None:  # accept either spelling, pass the current one
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: pass the cache once, got both '{name}' and '{other}'")
        kwargs[name] = kwargs.pop(other)
    _refuse_unsupported(model, kwargs)
    _cache_implementation(model, kwargs, name)
    _check_padding(kwargs.get("attention_mask"))
    if kwargs.get("use_cache", True) is False:
        warn_once(__name__, "leank: generate(use_cache=False) runs exact dense attention without a cache: no LeanK saving")
    elif kwargs.get(name) is None:
        kwargs[name] = new_cache(model)
    cache = kwargs.get(name)
    if cache is not None and not isinstance(cache, LeanKCache):
        warn_once(__name__, f"leank: generate() got a {type(cache).__name__}, not a LeanKCache: it runs exact dense attention "
                   "with no LeanK saving (pass leank.new_cache(model) or no cache)")
    if isinstance(cache, LeanKCache):
        layers = getattr(model.config, "num_hidden_layers", len(cache.layers))
        if len(cache.layers) != layers:
            raise ValueError(f"{name}: expected a LeanKCache of this model's {layers} layers (leank.new_cache(model)), "
                             f"got one of {len(cache.layers)}")
        new_tokens = _new_tokens(model, args, kwargs)
        if new_tokens is not None and new_tokens > 0:
            cache.reserve(new_tokens + 1)
    sync_sampling_rng(state.mask, model.device)  # tensor parallel: every rank samples what rank 0 samples
    if isinstance(cache, LeanKCache):
        from . import defer

        defer.install()  # with leank.defer.ENABLED, transformers defers its stop decision for this cache on CUDA
    if not (state.config.capture and isinstance(cache, LeanKCache)):
        return original_generate(model, *args, **kwargs)
    _warn_speculative(model, state, kwargs)
    from .capture import DecodeGraphRunner

    if state.runner is None:
        state.runner = DecodeGraphRunner(model, emulate=state.emulate_capture)
    model.__dict__["__call__"] = state.runner  # generate's decode loop looks up `self.__call__` once
    try:
        return original_generate(model, *args, **kwargs)
    finally:
        model.__dict__.pop("__call__", None)


def _check_padding(attention_mask) -> None:
    """Warn (once per process) about padding LeanK serves differently from transformers: a row with no
    token, and padding that is not left padding (transformers warns about right padding too)."""
    from .attention import _suffix_padding

    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or not attention_mask.numel():
        return
    valid = attention_mask.bool()
    if not bool(valid.any(1).all()):
        warn_once(__name__, "leank: a row of attention_mask is all zeros: that sequence has no tokens, LeanK stores "
                            "none and its output is not transformers' (drop the row)")
    if not _suffix_padding(valid):
        warn_once(__name__, "leank: padding that is not left padding (e.g. right padding): padded positions are "
                            "not stored, and a row whose last position is padding generates from that position "
                            "(its logits differ from transformers'); pad on the left (tokenizer.padding_side='left')")


def _cache_implementation(model, kwargs, name: str) -> None:
    """A cache implementation the caller asks for (argument, or their ``generation_config``) is refused by
    name; one the checkpoint's ``model.generation_config`` sets is overridden for this call, with a warning
    (transformers would otherwise refuse it next to LeanK's cache, naming a cache the user never passed)."""
    asked = kwargs.get("cache_implementation")
    where = "cache_implementation"
    if asked is None and kwargs.get("generation_config") is not None:
        asked = getattr(kwargs["generation_config"], "cache_implementation", None)
        where = "generation_config.cache_implementation"
    if asked is not None:
        if kwargs.get(name) is None:
            raise ValueError(
                f"{where}: a LeanK-patched model decodes with its own LeanKCache, got {asked!r}; drop it (LeanK's "
                "decode is already static and CUDA-graph captured) or call leank.unpatch(model) first")
        return
    default = getattr(model.generation_config, "cache_implementation", None)
    if default is not None and "cache_implementation" not in kwargs and kwargs.get("generation_config") is None:
        warn_once(__name__, f"leank: the model's generation_config sets cache_implementation={default!r}; a LeanK-"
                            "patched model decodes with its own LeanKCache, so generate() runs without it")
        kwargs["cache_implementation"] = None


def _new_tokens(model, args, kwargs) -> Optional[int]:
    """The tokens this ``generate`` call may add per sequence: ``max_new_tokens``, else ``max_length``
    minus the prompt's length (arguments first, then the generation config); None if neither is known."""
    gen_cfg = kwargs.get("generation_config") or model.generation_config
    new_tokens = kwargs.get("max_new_tokens", getattr(gen_cfg, "max_new_tokens", None))
    if isinstance(new_tokens, int):
        return new_tokens
    max_length = kwargs.get("max_length", getattr(gen_cfg, "max_length", None))
    prompt = kwargs.get("input_ids", args[0] if args else None)
    if prompt is None:
        prompt = kwargs.get("inputs_embeds")
    if isinstance(max_length, int) and isinstance(prompt, torch.Tensor) and prompt.dim() >= 2:
        return max_length - prompt.shape[1]
    return None


def _warn_speculative(model, state, kwargs) -> None:
    """Speculative decoding works, but its multi-token verification steps are not captured: say so."""
    gen_cfg = kwargs.get("generation_config") or model.generation_config
    asked = [k for k in ("assistant_model", "prompt_lookup_num_tokens")
             if kwargs.get(k, getattr(gen_cfg, k, None)) is not None]
    if asked and (model.device.type == "cuda" or state.emulate_capture):
        warn_once(__name__, f"leank: {asked[0]}: speculative decoding is exact on a LeanK cache, but its verification "
                  "steps (several tokens each) run eagerly, not as a captured CUDA graph; unless most drafted tokens "
                  "are accepted it decodes slower than LeanK without speculation (eval/e2e_decode.py --speculative)",
                  RuntimeWarning)


# generate() features LeanK refuses, with what to do instead
_REFUSED = {
    "output_attentions": "LeanK's decode kernels return no attention weights (the archive holds compacted K, so "
                         "dense-layout weights would describe a different function)",
}


def _refuse_unsupported(model, kwargs) -> None:
    """``ValueError`` naming LeanK and the feature for ``generate`` features it cannot serve."""
    gen_cfg = kwargs.get("generation_config") or model.generation_config
    for key, why in _REFUSED.items():
        value = kwargs.get(key, getattr(gen_cfg, key, None))
        if value:
            raise ValueError(f"{key}: not supported on a LeanK-patched model ({why}); call leank.unpatch(model) "
                             f"to use it, got {key}={value!r}")


