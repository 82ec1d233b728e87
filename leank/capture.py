"""Decode steps of ``generate()`` compiled and replayed as one CUDA graph per step.

A decode step of an 8B model costs ~4 ms of memory traffic on an H200; run eagerly,
Python and ~1,600 kernel launches cost several times that. ``DecodeGraphRunner`` takes
the place of ``model.__call__`` inside a patched ``generate`` (the decoding loop looks it
up once, as it does for transformers' compiled forward). The step it runs is a forward
without a cache argument in which each layer's LeanK work (window append at the
device-side length, TileLang decode over window + archive) is one opaque custom op,
``torch.ops.leank.decode_step``, reading the cache the runner makes active: for Llama /
Qwen2 ``leank.fused_decode.decode_logits`` (q/k/v and gate/up as one product each), else
the model's own forward. Per cache it

1. decides every layer's backend before the first decode step (only 'tilelang' is captured),
2. runs that step through the step function, compiled by ``torch.compile`` when
   ``LeanKConfig.compile_decode`` (Inductor fuses norms, RoPE, activations and residual
   adds; the compile happens here, outside any recording; kernels load and plans are built),
3. records the step after that in a CUDA graph: inputs from static buffers, the cache
   from preallocated tensors with device-side lengths, so no host value is baked in,
4. replays that graph for every following step, then does the host part of the step
   (lengths known on the host) and, every ``flush_every`` tokens, the flush of all layers:
   a second graph per set of due sequences (recorded at its first flush: batched gathers and
   scatters driven by device lengths) between host bookkeeping before and after.

Everything that is not a plain decode step (prefill, chunks, ``inputs_embeds``,
attention or hidden-state outputs, CPU) runs the ordinary forward; a decode step that
cannot be captured says why once (INFO, and a ``warnings.warn`` for a CUDA model that
asked for capture). The graph is rebuilt when the cache replaces a storage tensor
(``LeanKCache.storage_version``), the batch changes, or another cache comes in.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Optional

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import fused_decode, gemv
from .cache import LeanKCache
from .diagnostics import log_once, warn_once

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.2x calls it `cache`, older `past_key_values`
_IGNORED = {"return_dict", "use_cache", "attention_mask", "cache_position", "logits_to_keep", "num_logits_to_keep"}


_ACTIVE: list = []  # [cache] while a decode step runs through ``decode_step_attention`` (warm-up, recording)
_OP = None  # torch.ops.leank.decode_step and decode_step_rope, registered on first use (nothing is registered at import)


def active_cache() -> Optional[LeanKCache]:
    """The cache the runner's decode step is writing, or None outside such a step."""
    return _ACTIVE[0] if _ACTIVE else None


def _decode_op():
    """``torch.ops.leank.decode_step``: one layer's LeanK decode step as an opaque custom op.

    ``(query [batch, heads, 1, head_dim], key, value [batch, kv_heads, 1, head_dim],
    layer_idx, scale) -> out [batch, heads, head_dim]`` (contiguous): appends key/value
    at each sequence's device-side window length and attends over window + archive of
    ``active_cache().layers[layer_idx]``. torch.compile traces around it (its fake
    returns the shape); the cache is not an argument, so the compiled step never guards
    on its Python state and one compilation serves every cache and step.

    It declares no mutated argument because the tensors it writes (window rows, lengths)
    are not arguments: no other node of the compiled graph reads them, and each layer's
    op consumes the previous layer's output, so data flow alone keeps the order.

    Registers ``torch.ops.leank.decode_step_rope`` with it: the same step with ``cos, sin
    [batch, 1, head_dim]`` after ``value``, applying standard RoPE to the (unrotated) query
    and key in the append's launch (``leank.append_kernel.rope_append_rows_``).
    """
    global _OP
    if _OP is None:
        from .attention import decode_attention

        @torch.library.custom_op("leank::decode_step", mutates_args=(),
                                 schema="(Tensor query, Tensor key, Tensor value, int layer_idx, float scale) -> Tensor")
        def decode_step(query, key, value, layer_idx, scale):
            layer = active_cache().layers[layer_idx]
            layer.append_decode(key, value)
            return decode_attention(query[:, :, 0], layer, scale).contiguous()

        @torch.library.custom_op("leank::decode_step_rope", mutates_args=(),
                                 schema="(Tensor query, Tensor key, Tensor value, Tensor cos, Tensor sin, "
                                        "int layer_idx, float scale) -> Tensor")
        def decode_step_rope(query, key, value, cos, sin, layer_idx, scale):
            layer = active_cache().layers[layer_idx]
            return decode_attention(layer.append_decode_rope(query, key, value, cos, sin), layer, scale).contiguous()

        @decode_step.register_fake
        def _(query, key, value, layer_idx, scale):
            return query.new_empty((query.shape[0], query.shape[1], query.shape[3]))

        @decode_step_rope.register_fake
        def _(query, key, value, cos, sin, layer_idx, scale):
            return query.new_empty((query.shape[0], query.shape[1], query.shape[3]))

        _OP = (decode_step, decode_step_rope)
    return _OP


def decode_step_attention(module, query: Tensor, key: Tensor, value: Tensor, scale: float,
                          cos: Optional[Tensor] = None, sin: Optional[Tensor] = None) -> Tensor:
    """The attention of a runner decode step (``leank_attention_forward`` routes here).

    ``cos, sin [batch, 1, head_dim]``: query and key are not rotated yet; the step applies standard
    RoPE to them in its append kernel (``leank.fused_decode`` passes them for models whose RoPE is the
    standard one). Returns ``[batch, 1, heads, head_dim]`` as transformers' attention functions do.
    """
    if query.shape[2] != 1:
        raise ValueError(f"query: a captured decode step has one token per sequence, got {query.shape[2]} (do not "
                         "wrap a patched model in torch.compile: LeanK compiles its own decode step, "
                         "LeanKConfig.compile_decode)")
    plain, rope = _decode_op()
    if cos is None:
        return plain(query, key, value, module.layer_idx, scale)[:, None]
    return rope(query, key, value, cos, sin, module.layer_idx, scale)[:, None]


TP_TEARDOWN_WARNING = (
    "leank: the decode step is recorded in a CUDA graph that holds NCCL collectives (tensor parallel): call "
    "leank.unpatch(model) before torch.distributed.destroy_process_group(), which otherwise waits forever on "
    "them (pytorch/pytorch#115388)")


def warn_if_collectives(model) -> None:
    """Warn once when ``model`` is a tensor-parallel rank: its recorded graphs must be released (``leank.unpatch``)
    before the process group is destroyed."""
    from .tp import shard_of

    state = getattr(model, "_leank", None)
    shard = shard_of(state.mask) if state is not None else None
    if shard is not None and shard.size > 1:
        warn_once(__name__, TP_TEARDOWN_WARNING, RuntimeWarning)


class _Graph:
    """One recorded decode step and its static input/output buffers."""

    def __init__(self, key: tuple, ids: Tensor, pos: Tensor):
        self.key = key
        self.ids, self.pos = ids, pos
        self.graph = None
        self.logits = None  # the recorded step's logits (the graph's static output buffer)


class _FlushGraph:
    """One recorded flush of every layer: the graph and its rollback rows per layer (the index tensors it
    reads stay alive in the cache's ``flush_index`` store)."""

    def __init__(self, graph, outs: list):
        self.graph, self.outs = graph, outs


class DecodeGraphRunner:
    """Callable standing in for ``model.__call__`` during a patched ``generate``.

    Args:
        model: the patched ``*ForCausalLM``.
        emulate: record nothing and re-run the device part of the step at each "replay"
            (tests of the host/device split on CPU); False on CUDA.

    Decode inputs it accepts: ``input_ids`` int64 ``[batch, 1]``, ``position_ids`` int64
    ``[batch, 1]``, a ``LeanKCache`` that has seen the prompt (passed as ``cache`` or
    ``past_key_values``). ``attention_mask`` is not read at decode: LeanK never stores
    padding, so a step needs no mask.

    The step it records is ``leank.fused_decode.decode_logits`` (``LeanKConfig.fuse_projections``,
    Llama / Qwen2 with plain modules) or ``model(input_ids, position_ids, use_cache=False).logits``,
    each layer's attention being ``torch.ops.leank.decode_step`` on the cache; with
    ``LeanKConfig.compile_decode`` that function is compiled by ``torch.compile`` first
    (norms, RoPE, activations and residuals fused by Inductor; the LeanK op stays opaque).
    """

    def __init__(self, model, emulate: bool = False):
        self.model = model
        self.emulate = emulate
        self._graph: Optional[_Graph] = None
        self._warm_key = None  # layout of the last uncaptured decode step (a capture needs one first)
        self._disabled = False  # a capture failed: every later step runs eagerly
        self._compiled = None  # torch.compile of _forward_logits (built on first use)
        self._compile_failed = False
        self.fused = False  # the step is leank.fused_decode.decode_logits (decided per traced / recorded step)
        self.row_reduce = None  # leank.tp.OneShotAllReduce when LeanKConfig.tp_allreduce="one_shot" can run
        self._row_reduce_decided = False
        self._flush_graphs: dict = {}  # ((cache id, uid), due set, storage version) -> _FlushGraph
        self._flush_disabled = False  # a flush capture failed: flushes run eagerly
        self._flush_warm: set = set()  # flush keys run once eagerly (recorded at their next flush)
        self.flushes = 0  # flushes of all layers run by the runner (replayed, or emulated)
        self.replays = 0  # decode steps served by the graph (for tests and benchmarks)
        self.eager_steps = 0  # decode steps that ran the model's own forward instead
        self._backend_of: tuple = (None, None)  # ((cache id, uid), its layers' backend)
        self.captures = 0
        self.compiled_steps = 0  # decode steps whose forward ran compiled (warm-up, recording, emulated replays)
        self.capture_s = 0.0  # host seconds spent compiling and recording (reported apart from prefill and decode)

    def __deepcopy__(self, memo):
        """A copied model (``copy.deepcopy`` of a patched model) gets a fresh runner: recorded graphs and
        the compiled step belong to the original model's tensors."""
        import copy

        return type(self)(copy.deepcopy(self.model, memo), emulate=self.emulate)

    # ------------------------------------------------------------------ dispatch
    def __call__(self, *args, **kwargs):
        why, cache = self._why_not(args, kwargs)
        if why is None and not cache.layers[0].seen_tokens:
            why = "empty cache"
        if why is not None:
            self._eager_reason(why)
            self.eager_steps += why not in ("prefill", "empty cache")
            return self._eager(*args, **kwargs)
        if cache.decode_room_pending:  # the call's first decode step: archive room for all its tokens
            cache.ensure_decode_room()
        if any(not layer.decode_ready() for layer in cache.layers):
            self.eager_steps += 1
            return self._eager(*args, **kwargs)  # the window grows first (eager), then it is recaptured
        key = self._key(kwargs, cache)
        g = self._graph
        if g is None or g.key != key:
            if self._warm_key != key:  # first step of this layout: not recorded (compiles, builds plans, loads kernels)
                self._graph = None
                logits = self._step(kwargs["input_ids"], kwargs["position_ids"], cache)
                self._warm_key = key
                return self._output(logits, kwargs, cache)
            try:
                g = self._capture(key, kwargs, cache)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back, and says so
                self._graph = None
                self._disabled = True
                self._eager_reason(f"capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                self.eager_steps += 1
                return self._eager(*args, **kwargs)
        return self._replay(g, kwargs, cache)

    def _eager(self, *args, **kwargs):
        return type(self.model).__call__(self.model, *args, **kwargs)

    def release(self) -> None:
        """Drop every recorded graph (decode step and flushes) and the compiled step; the next
        ``generate`` compiles and records again. ``leank.unpatch`` calls it.

        Under tensor parallelism the recorded graphs hold the NCCL collectives they captured, and
        ``torch.distributed.destroy_process_group()`` then waits forever (pytorch/pytorch#115388):
        release (or unpatch) first. Measured on 2 x H200, torch 2.11: both ranks finished and
        hung in ``destroy_process_group`` until a watchdog killed them.
        """
        if not self.emulate and torch.cuda.is_available():
            torch.cuda.synchronize()  # no replay may still be running on the graphs' memory
        self._graph = None
        self._warm_key = None
        self._flush_graphs.clear()
        self._flush_warm.clear()
        self._compiled = None
        self._release_fused()
        if self.row_reduce is not None:  # after the graphs that read its buffers
            self.row_reduce.release()

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
        if any(other.device != layer.device for other in cache.layers):
            return "cache layers on several devices (a CUDA graph records one device)", cache
        backend = self._backend(cache, ids)
        if backend == "mixed":
            return "the layers resolved to different backends (only 'tilelang' is captured)", cache
        if not self.emulate and backend != "tilelang":
            return f"backend {backend!r} reads device values on the host (only 'tilelang' is captured)", cache
        return None, cache

    def _backend(self, cache: LeanKCache, ids: Tensor) -> str:
        """Every layer's concrete backend, decided before the cache's first decode step runs (from the
        model's head counts and the dtype of the keys the prefill stored, which the queries share), so
        that step already runs compiled instead of eagerly; "mixed" if the layers differ."""
        from .attention import resolve_layer_backend

        key = (id(cache), cache.uid)
        if self._backend_of[0] == key:  # decided once per cache, not on every step
            return self._backend_of[1]
        cfg = self.model.config
        group = cfg.num_attention_heads // cfg.num_key_value_heads  # query heads per KV head (also per TP rank)
        found = {resolve_layer_backend(layer, layer.num_kv_heads * group, layer.win_k.dtype, ids.device)
                 for layer in cache.layers}
        self._backend_of = (key, found.pop() if len(found) == 1 else "mixed")
        return self._backend_of[1]

    def _key(self, kwargs, cache: LeanKCache) -> tuple:
        # the output head's address stands for the weights: a model moved away and back gets new ones
        head = self.model.get_output_embeddings()
        weights = head.weight.data_ptr() if head is not None else None
        return ((id(cache), cache.uid), tuple(kwargs["input_ids"].shape), cache.storage_version, weights)

    # ------------------------------------------------------------------ the step
    def _forward_logits(self, ids: Tensor, pos: Tensor) -> Tensor:
        """One decode step's logits; each layer's attention goes to ``decode_step_attention``.

        ``leank.fused_decode.decode_logits`` (fused q/k/v and gate/up products) when
        ``self.fused``, else the model's forward without a cache argument.
        """
        if self.fused:
            return fused_decode.decode_logits(self.model, decode_step_attention, ids, pos, self.row_reduce)
        out = type(self.model).__call__(self.model, input_ids=ids, position_ids=pos, use_cache=False, return_dict=True)
        return out.logits

    def _prepare_fused(self) -> None:
        """Decide ``self.fused`` and keep the fused weight buffers current (before any trace or recording)."""
        state = getattr(self.model, "_leank", None)
        why = "LeanKConfig.fuse_projections=False" if state is None or not state.config.fuse_projections else \
            fused_decode.unsupported_reason(self.model)
        if why is not None:
            if state is not None and state.config.fuse_projections:
                log_once(__name__, f"leank: decode step runs transformers' forward, projections not fused: {why}")
            self.fused = False
            self._decide_row_reduce(state, f"the decode step is not fused ({why})")
            return
        if fused_decode.fuse_projections(self.model):
            logger.info("leank: fused q/k/v and gate/up projection weights (views of one buffer per layer)")
        self.fused = True
        self._decide_row_reduce(state)

    def _decide_row_reduce(self, state, why: Optional[str] = None) -> None:
        """Set ``self.row_reduce`` once per runner: a ``leank.tp.OneShotAllReduce`` when ``LeanKConfig.tp_allreduce``
        asks for it and it can run (else transformers' all-reduce stays, and a warning says why), else None."""
        if self._row_reduce_decided or state is None or state.config.tp_allreduce != "one_shot":
            return
        from .tp import OneShotAllReduce, one_shot_reason, shard_of

        self._row_reduce_decided = True
        shard = shard_of(state.mask)
        why = (why or one_shot_reason(shard, self.model.get_output_embeddings().weight.device)
               or fused_decode.row_parallel_reason(self.model))
        if why is not None:
            warn_once(__name__, "leank: LeanKConfig.tp_allreduce='one_shot' not used, the decode step keeps "
                      f"transformers' all-reduce: {why}", RuntimeWarning)
            return
        self.row_reduce = OneShotAllReduce(shard)
        logger.info("leank: the decode step sums o_proj and down_proj with the one-shot all-reduce (group %s)",
                    self.row_reduce.group_name)

    def _release_fused(self) -> None:
        if self.fused:
            fused_decode.release(self.model)

    def _step_fn(self):
        """``_forward_logits``, compiled when ``LeanKConfig.compile_decode`` asks and compiling works."""
        state = getattr(self.model, "_leank", None)
        if state is None or not state.config.compile_decode or self._compile_failed:
            return self._forward_logits
        if self._compiled is None:
            # dynamic=None: a second batch size recompiles once with a dynamic batch, later sizes reuse it
            self._compiled = torch.compile(self._forward_logits, fullgraph=True, mode=state.config.compile_mode)
        return self._compiled

    def _device_step(self, fn, ids: Tensor, pos: Tensor, cache: LeanKCache) -> Tensor:
        """The device part of a decode step (no host bookkeeping): what a graph records."""
        _decode_op()  # registered before any tracing (torch.compile cannot trace a registration)
        gemv.register()  # the fused forward's small-batch products (leank.gemv), likewise
        self._prepare_fused()  # the fused weight views, noted for this trace / recording only
        for layer in cache.layers:
            layer.capturing = True
        _ACTIVE.append(cache)
        try:
            return fn(ids, pos)
        finally:
            _ACTIVE.pop()
            for layer in cache.layers:
                layer.capturing = False
            self._release_fused()

    def _host_step(self, cache: LeanKCache) -> None:
        """The host part of a decode step: lengths, seen tokens, then the flush if due."""
        for layer in cache.layers:
            layer.advance_host()
            layer.seen_tokens += 1
        dues = [layer.flush_due() for layer in cache.layers]
        due = dues[0]
        if not due:
            return
        if self._flush_disabled or any(d != due for d in dues) or len({m for _, _, m in due}) != 1:
            for layer in cache.layers:  # different row counts (after a crop), or flush capture failed: eager
                layer.flush_if_due()
            return
        self._flush(cache, due)

    def _flush(self, cache: LeanKCache, due: list) -> None:
        """The flush of every layer at once: its device part recorded as one CUDA graph per due set
        (the first time) and replayed at the next flushes; host bookkeeping around it."""
        for layer in cache.layers:
            layer.prepare_flush(due)  # the archive holds the moved rows (a growth bumps the storage version)
        seq, sink = cache.layers[0].flush_index(due)
        move = due[0][2]
        key = ((id(cache), cache.uid), tuple(due), cache.storage_version)
        fg = self._flush_graphs.get(key)
        if fg is None:
            if self.emulate or key not in self._flush_warm:  # the first flush of a due set runs eagerly (warm-up)
                self._flush_warm = {k for k in self._flush_warm if k[0] == key[0] and k[2] == key[2]} | {key}
                outs = [layer.flush_device(seq, sink, move) for layer in cache.layers]
            else:
                try:
                    fg = self._capture_flush(key, cache, seq, sink, move)
                except Exception as e:  # noqa: BLE001 - a flush that cannot be recorded runs eagerly, and says so
                    self._flush_disabled = True
                    self._flush_graphs.clear()
                    self._eager_reason(f"flush not captured ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                    outs = [layer.flush_device(seq, sink, move) for layer in cache.layers]
        if fg is not None:
            fg.graph.replay()
            outs = fg.outs
        for layer, (rk, rv) in zip(cache.layers, outs):
            layer.finish_flush(due, rk, rv)
        self.flushes += 1

    def _capture_flush(self, key, cache: LeanKCache, seq: Tensor, sink: Tensor, move: int) -> "_FlushGraph":
        # graphs of an earlier cache or of replaced storage can never replay again: release their pools
        self._flush_graphs = {k: g for k, g in self._flush_graphs.items() if k[0] == key[0] and k[2] == key[2]}
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [layer.flush_device(seq, sink, move) for layer in cache.layers]
        fg = _FlushGraph(graph, outs)
        self._flush_graphs[key] = fg
        self.capture_s += time.perf_counter() - t0
        logger.info("leank: captured the flush of %d sequence(s) in a CUDA graph", seq.shape[0])
        return fg

    def _step(self, ids: Tensor, pos: Tensor, cache: LeanKCache) -> Tensor:
        """One decode step run now (not recorded): compiled when possible, else the plain forward."""
        fn = self._step_fn()
        if fn is self._compiled:  # (a bound method is a new object per access: compare with the compiled fn)
            t0 = time.perf_counter()
            if not self.compiled_steps:
                logger.info("leank: compiling the decode step with torch.compile (once per process and model; "
                            "tens of seconds for an 8B model, less when Inductor's on-disk cache has it)")
            try:
                with warnings.catch_warnings():
                    # Inductor's hint about float32 matmuls concerns RoPE's tiny frequency product: not actionable
                    warnings.filterwarnings("ignore", message=".*TensorFloat32 tensor cores.*")
                    logits = self._device_step(fn, ids, pos, cache)
                self.compiled_steps += 1
            except Exception as e:  # noqa: BLE001 - compiling is an optimisation: fall back, and say so
                self._compile_failed = True
                self._compiled = None
                for layer in cache.layers:  # undo a partial device step: host lengths were not advanced
                    layer.win_len.copy_(torch.tensor(layer.win_len_host, dtype=layer.win_len.dtype))
                msg = (f"leank: torch.compile of the decode step failed, capturing the uncompiled forward "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
                if "RecompileLimit" in type(e).__name__ or "recompile_limit" in str(e):
                    msg += ("; each patched model (shape, dtype) compiles the step once more in a process, and "
                            "torch._dynamo.config.recompile_limit caps that: raise it to compile more models")
                # once per runner (a runner compiles at most once): every model that runs uncompiled is told
                logger.warning(msg)
                logger.debug("leank: compile failure", exc_info=True)  # before the warning, which may be an error
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                logits = self._device_step(self._forward_logits, ids, pos, cache)
            self.capture_s += time.perf_counter() - t0
        else:
            logits = self._device_step(fn, ids, pos, cache)
        self._host_step(cache)
        return logits

    def _output(self, logits: Tensor, kwargs, cache: LeanKCache):
        """What the model's forward returns, with the cache under the name generate passed it."""
        cname = next(k for k in CACHE_KWARGS if kwargs.get(k) is not None)
        return CausalLMOutputWithPast(logits=logits, **{cname: cache})

    # ------------------------------------------------------------------ capture / replay
    def _capture(self, key, kwargs, cache: LeanKCache) -> _Graph:
        t0 = time.perf_counter()
        ids, pos = kwargs["input_ids"], kwargs["position_ids"]
        g = _Graph(key, ids.clone(), pos.clone())
        self._graph = None  # release the previous graph's pool before recording a new one
        fn = self._step_fn()
        self._prepare_fused()  # (re)fusing copies weights: never inside the recording
        # flush graphs of an earlier cache can never replay again: release their pools now
        self._flush_graphs = {k: v for k, v in self._flush_graphs.items() if k[0] == key[0]}
        if self.emulate:
            g.graph = "emulated"
        else:
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph):
                g.logits = self._device_step(fn, g.ids, g.pos, cache)
            warn_if_collectives(self.model)
        self._graph = g
        self.captures += 1
        self.capture_s += time.perf_counter() - t0
        logger.info("leank: captured the decode step of batch %d in a CUDA graph%s", ids.shape[0],
                    " (compiled)" if fn is self._compiled else "")
        return g

    def _replay(self, g: _Graph, kwargs, cache: LeanKCache):
        g.ids.copy_(kwargs["input_ids"])
        g.pos.copy_(kwargs["position_ids"])
        if self.emulate:
            fn = self._step_fn()
            logits = self._device_step(fn, g.ids, g.pos, cache)
            self.compiled_steps += fn is self._compiled
        else:
            g.graph.replay()
            logits = g.logits
        self._host_step(cache)
        self.replays += 1
        return self._output(logits, kwargs, cache)
