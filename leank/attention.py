"""Attention for patched models: exact prefill, LeanK decode, and the one backend dispatch point.

``leank_attention_forward`` is registered with transformers' ``AttentionInterface`` under
the name ``"leank"`` by ``leank.patch``. For each layer it receives the new post-RoPE
keys/values from ``LeanKCache.update`` and

* chunk steps (``q_len > 1``: prefill, or a second ``generate`` call continuing a
  conversation) attend exactly to the new tokens (causal, left padding masked) and, by
  log-sum-exp, to what the cache already holds; then the chunk is stored;
* decode steps (``q_len == 1``) append the token to the window and run the decode
  backend over window + compacted archive; then the window is flushed if due.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from leank.tilelang_kernels.lse import merge_states, softmax_av
from leank.tilelang_kernels.reference import decode_attention_reference

from .cache import LeanKLayer, take_pending
from .capture import active_cache, decode_step_attention
from .diagnostics import log_once, warn_once

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

ATTENTION_NAME = "leank"
QUERY_BLOCK = 512  # query rows per block when a chunk attends with explicit logits
CHUNK_SCORE_ELEMENTS = 1 << 26  # logits per block when a chunk attends to the cache


# ---------------------------------------------------------------------- backend dispatch
@functools.lru_cache(maxsize=None)
def _tilelang_available() -> bool:
    return importlib.util.find_spec("tilelang") is not None


def resolve_backend(backend: str, device: torch.device, call: Optional[dict] = None) -> str:
    """Map ``"auto"`` to a concrete backend; refuse ``"tilelang"`` where it cannot run.

    ``call`` describes the layer (``dtype, head_dim, num_heads, num_kv_heads,
    kept_counts``, as ``tilelang_kernels.supports`` takes them); with it, ``"auto"``
    chooses TileLang only for calls the kernel supports and logs once why it did not.
    """
    from leank.tilelang_kernels import supports

    if call is not None:
        why = supports(device=device, **call)
    elif device.type != "cuda" or not _tilelang_available():
        why = f"needs a CUDA device and the tilelang package, got device={device.type}, " \
              f"tilelang importable={_tilelang_available()}"
    else:
        why = None
    if backend == "auto":
        chosen = "tilelang" if why is None else "reference"
        log_once(__name__, f"leank: backend 'auto' resolved to '{chosen}' on {device.type}"
                  + (f" (TileLang kernel: {why})" if why else ""))
        return chosen
    if backend == "tilelang" and why is not None:
        raise ValueError(f"backend: 'tilelang' cannot run this model: {why}; use backend='auto' or 'reference'")
    return backend


def layer_backend(layer: LeanKLayer, q: Tensor) -> str:
    """The concrete backend of ``layer`` for queries like ``q [batch, num_heads, head_dim]`` (decided once)."""
    return resolve_layer_backend(layer, q.shape[1], q.dtype, q.device)


def resolve_layer_backend(layer: LeanKLayer, num_heads: int, dtype: torch.dtype, device: torch.device) -> str:
    """The concrete backend of ``layer`` for ``num_heads`` query heads of ``dtype`` on ``device``, decided
    once and kept on the layer (``resolved_backend``); ``leank.capture`` decides it before a cache's first
    decode step, so that step can already run compiled."""
    if layer.resolved_backend is None:
        call = dict(dtype=dtype, head_dim=layer.head_dim, num_heads=num_heads, num_kv_heads=layer.num_kv_heads,
                    kept_counts=[int(c) for c in layer.keep.sum(-1).tolist()])
        layer.resolved_backend = resolve_backend(layer.config.backend, device, call)
    return layer.resolved_backend


def decode_attention(q: Tensor, layer: LeanKLayer, scale: float) -> Tensor:
    """One decode step over a layer's window + archive. ``q [batch, num_heads, head_dim]``."""
    if layer_backend(layer, q) == "tilelang":
        from leank.tilelang_kernels.decode import decode_attention as tilelang_decode

        return tilelang_decode(q, **layer.kernel_args(host_heads=True), scale=scale)
    return decode_attention_reference(q, **layer.kernel_args(), scale=scale, compute_dtype=_reference_dtype(q))


def _reference_dtype(q: Tensor) -> torch.dtype:
    """float32 accumulation for half inputs; float64 for float32 models (CPU tests, exactness)."""
    return torch.float64 if q.dtype in (torch.float32, torch.float64) else torch.float32


# ---------------------------------------------------------------------- exact parts
def _flash_attn_func():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_func

    return flash_attn_func


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, valid: Optional[Tensor], scale: float) -> Tensor:
    """Causal attention of a chunk on itself (empty cache).

    Args:
        q: ``[batch, num_heads, L, head_dim]``; k, v: ``[batch, num_kv_heads, L, head_dim]``.
        valid: bool ``[batch, L]`` (False = left padding) or None.

    Returns ``[batch, num_heads, L, head_dim]``. Padding query rows attend to themselves
    only (their output is never used).
    """
    flash = _flash_attn_func()
    if flash is not None and valid is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True)
        return out.transpose(1, 2)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if valid is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    L = q.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None] & valid[:, None, :]
    allowed |= torch.eye(L, dtype=torch.bool, device=q.device)[None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)


def chunk_self_attention_lse(q: Tensor, k: Tensor, v: Tensor, valid: Optional[Tensor], scale: float):
    """Causal attention of a chunk on itself with its float32 LSE, in query blocks.

    Shapes as ``prefill_attention``; returns ``(out float32 [b, h, L, d], lse float32 [b, h, L])``.
    Query heads are grouped under their KV head (no repeated K/V copies), and each block's
    logits stay within ``CHUNK_SCORE_ELEMENTS`` (at most ``QUERY_BLOCK`` query rows), so
    the memory used does not grow with batch x heads x chunk length squared.
    """
    b, h, L, d = q.shape
    kvh = k.shape[1]
    rep = h // kvh
    kf, vf = k.float(), v.float()  # [b, kvh, L, d]
    qg = q.view(b, kvh, rep, L, d)
    block = max(1, min(QUERY_BLOCK, CHUNK_SCORE_ELEMENTS // max(1, b * h * L)))
    outs, lses = [], []
    cols = torch.arange(L, device=q.device)
    for s in range(0, L, block):
        qb = qg[:, :, :, s : s + block].float()  # [b, kvh, rep, n, d]
        logits = torch.einsum("bgrnd,bgkd->bgrnk", qb, kf) * scale
        rows = torch.arange(s, s + qb.shape[3], device=q.device)
        allowed = cols[None, :] <= rows[:, None]  # [n, L]
        if valid is not None:
            allowed = allowed[None] & valid[:, None, :]  # [b, n, L]
            allowed = allowed[:, None, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
        o, lse = softmax_av(logits, vf, "bgrnk,bgkd->bgrnd")
        outs.append(o.reshape(b, h, -1, d))
        lses.append(lse.reshape(b, h, -1))
    return torch.cat(outs, 2), torch.cat(lses, 2)


def cached_attention_lse(q: Tensor, layer: LeanKLayer, scale: float):
    """Attention of ``L`` queries ``[b, h, L, d]`` to what ``layer`` holds, with float32 LSE.

    The L queries are folded into the head axis (kv-head-major) so the decode reference
    serves them in one call. Returns ``(out float32 [b, h, L, d], lse float32 [b, h, L])``.
    """
    b, h, L, d = q.shape
    held = max(w + a for w, a in zip(layer.win_len_host, layer.arch_len_host))
    block = max(1, min(L, CHUNK_SCORE_ELEMENTS // max(1, b * h * held)))  # bounds the score tensor
    outs, lses = [], []
    for s in range(0, L, block):
        qb = q[:, :, s : s + block].float()
        n = qb.shape[2]
        out, lse = decode_attention_reference(
            qb.reshape(b, h * n, d), **layer.kernel_args(), scale=scale, return_lse=True,
            compute_dtype=_reference_dtype(q),
        )
        outs.append(out.float().view(b, h, n, d))
        lses.append(lse.view(b, h, n))
    return torch.cat(outs, 2), torch.cat(lses, 2)


# ---------------------------------------------------------------- fast chunk path (FlashAttention with LSE)
def _flash_lse(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False):
    """FlashAttention with its LSE: ``q [H, M, D]``, ``k, v [H, N, D]`` (same dtype, same D).

    Returns ``(out float32 [H, M, D], lse float32 [H, M])`` (natural log). ``N == 0`` gives
    zeros and ``-inf``. torch's own flash kernels (CUDA: fp16/bf16; CPU: any float).
    """
    H, M, D = q.shape
    if k.shape[1] == 0:
        return q.new_zeros(H, M, D, dtype=torch.float32), q.new_full((H, M), float("-inf"), dtype=torch.float32)
    q4, k4, v4 = q[None].contiguous(), k[None].contiguous(), v[None].contiguous()
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_flash_attention(q4, k4, v4, 0.0, causal, False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q4, k4, v4, 0.0, causal, scale=scale)
    return res[0][0].float(), res[1][0, :, :M].float()  # some kernels pad the LSE's query axis


def fast_path_reason(q: Tensor, layer: LeanKLayer) -> Optional[str]:
    """None when a chunk on this cache can take the FlashAttention path, else why not."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (the exact reference path serves float32/float64)"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]}"
    if any(g.bias is not None for g in layer.groups):
        return "attention-matching bias on the archive"
    return None


def cached_attention_lse_flash(q: Tensor, layer: LeanKLayer, scale: float):
    """``cached_attention_lse`` through FlashAttention, one call per sequence and segment.

    The ``rep`` query heads of a KV head are folded into the query axis (no repeated K/V);
    the window is attended at full width; an archive group's compacted K is scattered back
    to ``head_dim`` channels (zeros at the pruned ones, so ``q · K`` is ``q[keep] · K_arch``)
    in a transient of that sequence's archive rows; heads with no kept channel see no
    archive. Ragged lengths come from the host lengths (exact slices, no masks).
    Returns ``(out float32 [b, h, L, d], lse float32 [b, h, L])``.
    """
    b, h, L, d = q.shape
    kvh = layer.num_kv_heads
    rep = h // kvh
    qf = q.reshape(b, kvh, rep * L, d)
    out = q.new_zeros(b, kvh, rep * L, d, dtype=torch.float32)
    lse = q.new_full((b, kvh, rep * L), float("-inf"), dtype=torch.float32)
    for s in range(b):
        w, a = layer.win_len_host[s], layer.arch_len_host[s]
        if w:
            out[s], lse[s] = _flash_lse(qf[s], layer.win_k[s, :, :w], layer.win_v[s, :, :w], scale)
        if not a:
            continue
        for g in layer.groups:
            hg = len(g.heads_host)
            kg = q.new_zeros(hg, a, d)
            kg.scatter_(2, g.chan[:, None, :].expand(hg, a, g.d), g.keys[s, :, :a])
            o_a, l_a = _flash_lse(qf[s, g.heads], kg, g.values[s, :, :a], scale)
            o_m, l_m = merge_states(out[s, g.heads], lse[s, g.heads], o_a, l_a)
            out[s, g.heads], lse[s, g.heads] = o_m, l_m
    return out.view(b, kvh, rep, L, d).reshape(b, h, L, d), lse.view(b, kvh, rep, L).reshape(b, h, L)


def chunk_self_attention_lse_flash(q: Tensor, k: Tensor, v: Tensor, valid: Optional[Tensor], scale: float):
    """``chunk_self_attention_lse`` through causal FlashAttention, per sequence over its valid suffix.

    Left padding makes the valid tokens of row ``s`` a suffix of the chunk; padding query
    rows get zeros and ``lse = -inf`` (their output is never used).
    """
    b, h, L, d = q.shape
    rep = h // k.shape[1]
    out = q.new_zeros(b, h, L, d, dtype=torch.float32)
    lse = q.new_full((b, h, L), float("-inf"), dtype=torch.float32)
    counts = [L] * b if valid is None else valid.sum(-1).tolist()
    for s in range(b):
        n = int(counts[s])
        if n == 0:
            continue
        ks, vs = k[s, :, L - n:], v[s, :, L - n:]
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        out[s, :, L - n:], lse[s, :, L - n:] = _flash_lse(q[s, :, L - n:], ks, vs, scale, causal=True)
    return out, lse


def _suffix_padding(valid: Optional[Tensor]) -> bool:
    """Whether every row's valid tokens are a suffix (left padding), as the fast path assumes."""
    if valid is None:
        return True
    v = valid.int()
    return bool((v[:, 1:] >= v[:, :-1]).all())


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, valid: Optional[Tensor], layer: LeanKLayer, scale: float) -> Tensor:
    """A chunk of new tokens attending to the cache (LeanK function) and causally to itself.

    Half-precision chunks take FlashAttention (``cached_attention_lse_flash`` and
    ``chunk_self_attention_lse_flash``); float32/float64 chunks, attention-matching bias and
    non-left padding take the exact reference in bounded blocks.
    """
    if sum(layer.win_len_host) + sum(layer.arch_len_host) == 0:
        return prefill_attention(q, k, v, valid, scale)
    why = fast_path_reason(q, layer)
    if why is None and not _suffix_padding(valid):
        why = "padding that is not left padding"
    if why is None:
        out_c, lse_c = cached_attention_lse_flash(q, layer, scale)
        out_n, lse_n = chunk_self_attention_lse_flash(q, k, v, valid, scale)
    else:
        log_once(__name__, f"leank: multi-token step on the cache through the reference path: {why}")
        out_c, lse_c = cached_attention_lse(q, layer, scale)
        out_n, lse_n = chunk_self_attention_lse(q, k, v, valid, scale)
    out, _ = merge_states(out_c, lse_c, out_n, lse_n)
    return out.to(q.dtype)


def plain_attention(q: Tensor, k: Tensor, v: Tensor, mask2d: Optional[Tensor], scale: float) -> Tensor:
    """Exact causal attention for calls without a LeanK cache (e.g. ``use_cache=False``).

    ``k, v [b, kvh, T, d]`` may include past tokens; query ``i`` sits at column ``T - L + i``.
    """
    b, h, L, d = q.shape
    T = k.shape[2]
    rep = h // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if mask2d is None and L == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    rows = torch.arange(T - L, T, device=q.device)
    allowed = (torch.arange(T, device=q.device)[None, :] <= rows[:, None])[None]
    if mask2d is not None:
        allowed = allowed & mask2d[:, None, -T:].bool()
    allowed = allowed | (torch.arange(T, device=q.device)[None, :] == rows[:, None])[None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)


# ---------------------------------------------------------------------- transformers hooks
def leank_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
):
    """transformers attention function (``AttentionInterface`` signature).

    Args:
        query: ``[batch, num_heads, q_len, head_dim]``; key, value: ``[batch,
            num_kv_heads, q_len, head_dim]`` (the new tokens, from ``LeanKCache.update``).
        attention_mask: 2-D bool ``[batch, kv_len]`` padding mask from ``leank_mask`` or None.

    Returns ``(attn_output [batch, q_len, num_heads, head_dim], None)``.
    """
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if torch.compiler.is_compiling() or active_cache() is not None:  # a decode step of leank.capture's runner
        return decode_step_attention(module, query, key, value, scale), None
    mask2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    if attention_mask is not None and mask2d is None:
        raise ValueError(f"attention_mask: expected a 2-D padding mask for 'leank', got {tuple(attention_mask.shape)}")
    step = take_pending(module.layer_idx, key)
    if step is None:
        warn_once(__name__, "leank: this forward has no LeanKCache (use_cache=False, or another cache type): exact dense "
                   "attention, no LeanK saving; pass leank.new_cache(model) as the cache")
        return plain_attention(query, key, value, mask2d, scale).transpose(1, 2), None
    layer = step.layer
    L = query.shape[2]
    if L == 1 and layer.seen_tokens > 0:
        layer.append_decode(key, value)
        out = decode_attention(query[:, :, 0], layer, scale)[:, :, None]
        layer.flush_if_due()
    else:
        valid = None if mask2d is None else mask2d[:, -L:].bool()
        out = chunk_attention(query, key, value, valid, layer, scale)
        layer.store_chunk(key, value, valid)
    layer.seen_tokens += L
    return out.transpose(1, 2), None


def leank_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs):
    """transformers mask function: the 2-D padding mask ``[batch, kv_length]`` (bool), or None.

    Decode steps get the mask as is (they never read it), so no step waits on the device;
    chunk steps get None when nothing is padded, which lets prefill use ``is_causal``.
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    if q_length == 1:
        return attention_mask
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask
