"""Decode steps of ``generate()`` replayed as one CUDA graph per step.

A decode step of an 8B model costs ~4 ms of memory traffic on an H200; run eagerly,
Python and ~1,300 kernel launches cost several times that. ``DecodeGraphRunner`` takes
the place of ``model.__call__`` inside a patched ``generate`` (the decoding loop looks it
up once, as it does for transformers' compiled forward) and

1. runs the first decode step of a cache eagerly (it also warms up kernels and plans),
2. records the next one in a CUDA graph: the whole forward (embedding, every layer's
   projections, RoPE, LeanK window append and decode attention, MLP, head) reads its
   inputs from static buffers and the cache from preallocated tensors with device-side
   lengths, so no host value is baked in,
3. replays that graph for every following step, then does the host part of the step
   (lengths known on the host, the flush every ``flush_every`` tokens, which runs as a
   few batched scatters outside the graph).

Everything that is not a plain decode step (prefill, chunks, ``inputs_embeds``,
attention or hidden-state outputs, CPU) runs the ordinary forward; a decode step that
cannot be captured says why once (INFO, and a ``warnings.warn`` for a CUDA model that
asked for capture). The graph is rebuilt when the cache replaces a storage tensor
(``LeanKCache.storage_version``), the batch changes, or another cache comes in.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from .cache import LeanKCache
from .diagnostics import log_once, warn_once

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.2x calls it `cache`, older `past_key_values`
_IGNORED = {"return_dict", "use_cache", "attention_mask", "cache_position", "logits_to_keep", "num_logits_to_keep"}


class _Graph:
    """One recorded decode forward and its static input/output buffers."""

    def __init__(self, key: tuple, ids: Tensor, pos: Tensor, cpos: Optional[Tensor]):
        self.key = key
        self.ids, self.pos, self.cpos = ids, pos, cpos
        self.graph = None
        self.out = None  # the recorded forward's output (its logits are the graph's static buffer)


class DecodeGraphRunner:
    """Callable standing in for ``model.__call__`` during a patched ``generate``.

    Args:
        model: the patched ``*ForCausalLM``.
        emulate: record nothing and re-run the device part of the step eagerly at each
            "replay" (tests of the host/device split on CPU); False on CUDA.

    Decode inputs it accepts: ``input_ids`` int64 ``[batch, 1]``, ``position_ids`` int64
    ``[batch, 1]``, a ``LeanKCache`` that has seen the prompt (passed as ``cache`` or
    ``past_key_values``). ``attention_mask`` is not read at decode: LeanK never stores
    padding, so a step needs no mask.
    """

    def __init__(self, model, emulate: bool = False):
        self.model = model
        self.emulate = emulate
        self._graph: Optional[_Graph] = None
        self._warm_key = None  # layout of the last eager decode step (a capture needs one first)
        self._disabled = False  # a capture failed: every later step runs eagerly
        self.replays = 0  # decode steps served by the graph (for tests and benchmarks)
        self.captures = 0
        self.capture_s = 0.0  # host seconds spent recording graphs (reported apart from prefill and decode)

    # ------------------------------------------------------------------ dispatch
    def __call__(self, *args, **kwargs):
        why, cache = self._why_not(args, kwargs)
        if why is None and not cache.layers[0].seen_tokens:
            why = "empty cache"
        if why is not None:
            self._eager_reason(why)
            return self._eager(*args, **kwargs)
        if any(not layer.decode_ready() for layer in cache.layers):
            return self._eager(*args, **kwargs)  # the window grows first (eager), then it is recaptured
        key = self._key(kwargs, cache)
        g = self._graph
        if g is None or g.key != key:
            if self._warm_key != key:  # first step of this layout: eager (builds plans, loads kernels)
                self._graph = None
                out = self._eager(*args, **kwargs)
                self._warm_key = self._key(kwargs, cache)
                return out
            try:
                g = self._capture(key, kwargs, cache)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back, and says so
                for layer in cache.layers:
                    layer.capturing = False
                self._graph = None
                self._disabled = True
                self._eager_reason(f"capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                return self._eager(*args, **kwargs)
        return self._replay(g, kwargs, cache)

    def _eager(self, *args, **kwargs):
        return type(self.model).__call__(self.model, *args, **kwargs)

    def _eager_reason(self, why: str) -> None:
        if why in ("prefill", "empty cache"):
            return  # the expected eager steps: nothing to report
        msg = f"leank: decode step not captured in a CUDA graph, running eagerly: {why}"
        if getattr(self.model, "device", torch.device("cpu")).type == "cuda":
            warn_once(__name__, msg, RuntimeWarning)  # the user asked for capture and does not get it
        else:
            log_once(__name__, msg)

    def _why_not(self, args, kwargs) -> tuple:
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        if args:
            return "positional arguments", cache
        if not isinstance(cache, LeanKCache):
            return "no LeanKCache", cache
        ids = kwargs.get("input_ids")
        if ids is None or kwargs.get("inputs_embeds") is not None:
            return "inputs_embeds instead of input_ids", cache
        if ids.dim() != 2 or ids.shape[1] != 1:
            return "prefill", cache
        if self._disabled:
            return "capture disabled after a failed capture", cache
        if not self.emulate and ids.device.type != "cuda":
            return f"device {ids.device.type} (CUDA graphs need CUDA)", cache
        if kwargs.get("position_ids") is None:
            return "no position_ids", cache
        for k in ("output_attentions", "output_hidden_states"):
            if kwargs.get(k):
                return f"{k}=True", cache
        extra = sorted(k for k, v in kwargs.items()
                       if v is not None and k not in _IGNORED and k not in CACHE_KWARGS
                       and k not in ("input_ids", "position_ids", "inputs_embeds", "output_attentions",
                                     "output_hidden_states"))
        if extra:
            return f"unsupported forward arguments {extra}", cache
        layer = cache.layers[0]
        if not layer.is_initialized:
            return "prefill", cache
        if ids.shape[0] != layer.batch_size:
            return f"batch {ids.shape[0]} != cache batch {layer.batch_size}", cache
        backend = _backend(layer)
        if not self.emulate and backend != "tilelang":
            return f"backend {backend!r} reads device values on the host (only 'tilelang' is captured)", cache
        return None, cache

    def _key(self, kwargs, cache: LeanKCache) -> tuple:
        cname = next(k for k in CACHE_KWARGS if kwargs.get(k) is not None)
        cpos = kwargs.get("cache_position")
        return (id(cache), cname, tuple(kwargs["input_ids"].shape), cpos is not None,
                kwargs.get("logits_to_keep"), cache.storage_version)

    # ------------------------------------------------------------------ capture / replay
    def _forward_kwargs(self, g: _Graph, kwargs, cache) -> dict:
        cname = next(k for k in CACHE_KWARGS if kwargs.get(k) is not None)
        fk = {"input_ids": g.ids, "position_ids": g.pos, cname: cache, "use_cache": True, "return_dict": True}
        if g.cpos is not None:
            fk["cache_position"] = g.cpos
        if kwargs.get("logits_to_keep") is not None:
            fk["logits_to_keep"] = kwargs["logits_to_keep"]
        return fk

    def _capture(self, key, kwargs, cache: LeanKCache) -> _Graph:
        t0 = time.perf_counter()
        ids, pos = kwargs["input_ids"], kwargs["position_ids"]
        cpos = kwargs.get("cache_position")
        g = _Graph(key, ids.clone(), pos.clone(), None if cpos is None else cpos.clone())
        self._graph = None  # release the previous graph's pool before recording a new one
        for layer in cache.layers:
            layer.capturing = True
        try:
            if self.emulate:
                g.graph = "emulated"
            else:
                g.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g.graph):
                    g.out = self._eager(**self._forward_kwargs(g, kwargs, cache))
        finally:
            for layer in cache.layers:
                layer.capturing = False
        self._graph = g
        self.captures += 1
        self.capture_s += time.perf_counter() - t0
        logger.info("leank: captured the decode step of batch %d in a CUDA graph", ids.shape[0])
        return g

    def _replay(self, g: _Graph, kwargs, cache: LeanKCache):
        g.ids.copy_(kwargs["input_ids"])
        g.pos.copy_(kwargs["position_ids"])
        if g.cpos is not None:
            g.cpos.copy_(kwargs["cache_position"])
        if self.emulate:
            for layer in cache.layers:
                layer.capturing = True
            try:
                out = self._eager(**self._forward_kwargs(g, kwargs, cache))
            finally:
                for layer in cache.layers:
                    layer.capturing = False
        else:
            g.graph.replay()
            out = g.out
        for layer in cache.layers:  # the host part of the step: lengths, then the flush if due
            layer.advance_host()
            layer.seen_tokens += 1
            layer.flush_if_due()
        self.replays += 1
        return out


def _backend(layer) -> str:
    return layer.resolved_backend or layer.config.backend
