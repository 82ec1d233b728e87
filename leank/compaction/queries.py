"""Reference queries for attention matching: post-RoPE queries captured from model passes.

A pass runs the base model (no LM head, no cache) over some tokens with a custom
attention function registered through transformers' ``AttentionInterface`` inside a
context manager (undone in ``finally``). The function records a sample of post-RoPE
queries per layer and attends to ``[prefix ; new tokens]`` (lower-right causal), where the
prefix is what the cache already holds for that layer (with its ``beta``), read lazily per
layer so only one layer's prefix is alive at a time.

* ``"repeat"`` pass: ``[repeat prompt ; context]`` on top of the cache, positions
  continuing after the context: queries of the model re-reading its context;
* ``"self"`` pass: the context alone from position 0, no prefix: the context
  prefill's own queries.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

CAPTURE_NAME = "leank_compaction_capture"
REPEAT_PROMPT = "\n\nRepeat the previous context exactly, word for word.\n\n"

# prefix(layer_idx) -> (keys [KVH, P, D], values [KVH, P, D], bias float32 [KVH, P] or None)
PrefixFn = Callable[[int], tuple[Tensor, Tensor, Optional[Tensor]]]


@dataclass
class _PassState:
    prefix: Optional[PrefixFn]
    positions: Tensor  # int64 [m], indices into the new tokens to record
    recorded: dict = field(default_factory=dict)  # layer_idx -> [num_heads, m, D]


_STATE: contextvars.ContextVar = contextvars.ContextVar("leank_compaction_pass", default=None)


def _flash_ok(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] + 8 <= 256


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """aten's FlashAttention with the LSE: ``q [1, H, n, D]``, ``k, v [1, H, m, D]`` -> out, lse ``[1, H, n]``."""
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float, n_prefix: int) -> Tensor:
    """Attention of ``q [1, H, n, D]`` over ``k, v [1, H, P+n, D]``: all of the prefix, causal within the new tokens.

    ``bias`` (float32 ``[H, P+n]`` or None) is added to the logits. On CUDA half
    precision: two FlashAttention calls (prefix, non-causal; new tokens, causal) merged by
    LSE, the bias carried in extra head-dim columns. Elsewhere: SDPA with a lower-right
    causal mask.
    """
    from torch.nn.attention.bias import causal_lower_right

    from leank.tilelang_kernels.lse import merge_states

    from .core import _augment

    n, kv = q.shape[2], k.shape[2]
    D, H = q.shape[-1], q.shape[1]
    if _flash_ok(q):
        out, lse = _flash(q, k[:, :, n_prefix:], v[:, :, n_prefix:], True, scale)
        if n_prefix:
            pk, pv = k[:, :, :n_prefix], v[:, :, :n_prefix]
            pq = q
            if bias is not None:
                qa, ka = _augment(q[0], pk[0], bias[:, :n_prefix].expand(H, n_prefix), scale)
                pq, pk = qa[None], ka[None]
                pv = torch.cat([pv, pv.new_zeros(*pv.shape[:3], pq.shape[-1] - D)], -1)
            out_p, lse_p = _flash(pq, pk, pv, False, scale)
            out, _ = merge_states(out.float(), lse, out_p[..., :D].float(), lse_p)
        return out.to(q.dtype)
    if bias is not None:
        qa, ka = _augment(q[0], k[0], bias.expand(H, kv), scale)
        q, k = qa[None], ka[None]
        v = torch.cat([v, v.new_zeros(*v.shape[:3], q.shape[-1] - D)], -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, kv), scale=scale)
    return out[..., :D]


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: record sampled queries, attend to prefix + new tokens."""
    state: Optional[_PassState] = _STATE.get()
    if state is None:
        raise RuntimeError(f"{CAPTURE_NAME}: called outside a leank.compaction query pass")
    if query.shape[0] != 1:
        raise RuntimeError(f"{CAPTURE_NAME}: one sequence per pass, got batch {query.shape[0]}")
    layer = module.layer_idx
    pos = state.positions.to(query.device)
    state.recorded[layer] = query[0].index_select(1, pos).detach().clone()
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    bias = None
    n_prefix = 0
    if state.prefix is not None:
        pk, pv, pb = state.prefix(layer)
        n_prefix = pk.shape[1]
        key = torch.cat([pk[None].to(key.dtype), key], 2)
        value = torch.cat([pv[None].to(value.dtype), value], 2)
        if pb is not None:
            new = torch.zeros(pb.shape[0], query.shape[2], dtype=torch.float32, device=pb.device)
            bias = torch.cat([pb.float(), new], 1)  # [KVH, P+n]
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key = key.repeat_interleave(rep, 1)
        value = value.repeat_interleave(rep, 1)
        if bias is not None:
            bias = bias.repeat_interleave(rep, 0)
    out = _attend(query, key, value, bias, scale, n_prefix)
    return out.transpose(1, 2).contiguous(), None


def _capture_mode(model):
    """Route every attention layer of ``model`` through ``_capture_attention``; undone in finally."""
    from ..attention_switch import use_attention

    return use_attention(model, CAPTURE_NAME, _capture_attention)


def base_model(model):
    """The decoder stack without the LM head (``model.model`` for ``*ForCausalLM``), as the
    model's family (``patches``) knows it."""
    from leank.patches import decoder_of

    return decoder_of(model)


@torch.no_grad()
def run_pass(
    model,
    tokens: Tensor,
    start_position: int,
    record: Tensor,
    prefix: Optional[PrefixFn] = None,
) -> dict:
    """One capture pass over ``tokens`` (int64 ``[n]``) of one sequence.

    Args:
        model: Llama/Qwen2 ``*ForCausalLM`` or base model.
        tokens: token ids, on the model's device.
        start_position: RoPE position of ``tokens[0]``.
        record: int64 ``[m]`` indices into ``tokens`` whose queries to keep.
        prefix: per-layer cache contents the tokens attend to first (None: no prefix).

    Returns:
        ``{layer_idx: [num_heads, m, head_dim]}`` post-RoPE queries (model dtype).
    """
    dev = tokens.device
    positions = torch.arange(start_position, start_position + tokens.numel(), device=dev)[None]
    state = _PassState(prefix, record)
    token = _STATE.set(state)
    try:
        with _capture_mode(model):
            base_model(model)(input_ids=tokens[None], position_ids=positions, use_cache=False)
    finally:
        _STATE.reset(token)
    return state.recorded


def sample_positions(lo: int, hi: int, m: int, generator: torch.Generator) -> Tensor:
    """``min(m, hi - lo)`` distinct sorted positions in ``[lo, hi)``."""
    n = max(0, hi - lo)
    if m >= n:
        return torch.arange(lo, hi)
    return torch.randperm(n, generator=generator)[:m].sort().values + lo


def pool_gqa(q: Tensor, num_kv_heads: int) -> Tensor:
    """``[num_heads, m, D]`` -> ``[num_kv_heads, rep * m, D]`` (query heads of a group pooled)."""
    h, m, d = q.shape
    rep = h // num_kv_heads
    return q.reshape(num_kv_heads, rep * m, d)


def gaussian_like(ref: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` Gaussian vectors per head with the per-channel mean/std of ``ref [H, m, D]``: ``[H, n, D]``."""
    r = ref.float()
    mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True).nan_to_num(0.0)
    z = torch.randn(r.shape[0], n, r.shape[2], generator=generator).to(r.device)
    return (mean + std * z).to(ref.dtype)


RECORD_NAME = "leank_compaction_record"


class QueryRecorder:
    """Post-RoPE queries recorded while a model prefills (see ``record_queries``).

    Attributes:
        every: every ``every``-th query position of each prefill chunk is kept.
        store: ``{layer_idx: [tensors [batch, num_heads, m_i, head_dim]]}``, one per chunk.
    """

    def __init__(self, every: int, num_kv_heads: int):
        self.every, self.num_kv_heads = every, num_kv_heads
        self.store: dict = {}

    def add(self, layer_idx: int, query: Tensor) -> None:
        if query.shape[2] > 1:  # prefill chunks only, not decode steps
            self.store.setdefault(layer_idx, []).append(query[:, :, :: self.every].detach().clone())

    def queries(self) -> list[Tensor]:
        """Per layer ``[batch, num_kv_heads, n, head_dim]`` (query heads of a GQA group pooled)."""
        if not self.store:
            raise ValueError("record_queries: nothing was recorded (run a prefill inside the context manager)")
        out = []
        for i in sorted(self.store):
            q = torch.cat(self.store[i], 2)  # [B, H, m, D]
            b, h, m, d = q.shape
            out.append(q.reshape(b, self.num_kv_heads, (h // self.num_kv_heads) * m, d))
        return out


@contextlib.contextmanager
def record_queries(model, every: int = 8):
    """Record the context prefill's own post-RoPE queries at no extra model cost.

    Wraps the model's current attention function (plain or ``leank``-patched) so that
    every ``every``-th query position of each prefill chunk is kept; attention itself is
    unchanged. Undone in ``finally``.

        with leank.compaction.record_queries(model) as rec:
            model(ids, cache=cache, use_cache=True)  # past_key_values= before transformers 5.2x
        leank.compact(model, cache, input_ids=ids, context_queries=rec.queries())
    """
    import sys

    from transformers import AttentionInterface

    from ..attention_switch import mask_function_of, use_attention

    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected an int >= 1, got {every!r}")
    cfg = model.config
    impl = cfg._attn_implementation or "eager"
    attn_cls = next((m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")), None)
    eager = getattr(sys.modules[type(attn_cls).__module__], "eager_attention_forward", None) if attn_cls is not None else None
    original = AttentionInterface().get_interface(impl, eager) if impl != "eager" else eager
    if original is None:
        raise ValueError(f"model: cannot find the attention function for implementation {impl!r}")
    rec = QueryRecorder(every, cfg.num_key_value_heads)

    def recording(module, query, *args, **kwargs):
        rec.add(module.layer_idx, query)
        return original(module, query, *args, **kwargs)

    with use_attention(model, RECORD_NAME, recording, mask_function_of(impl)):
        yield rec
