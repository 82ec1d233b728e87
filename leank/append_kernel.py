"""The decode step's window append as one kernel.

Each decode step writes one K row and one V row per sequence into the full-width window
at that sequence's device-side length, then increments the length. In PyTorch that is a
length cast, two ``index_put`` and an add: four launches, about 10 µs per layer on an H200
for 4 KB of data. ``append_rows_`` does it in one Triton launch on CUDA (``torch`` fallback
elsewhere, and when Triton is missing), reading no host value, so it can be recorded in a
CUDA graph.

``rope_append_rows_`` does the same for the fused decode step with the rotary embedding of the
step's query and key folded in (``FUSE_ROPE``): the model's two RoPE kernels (query, key) and the
append become one launch per layer. It applies the standard rotate-half RoPE
(``x * cos + rotate_half(x) * sin``, computed in float32 and rounded once, where the model's eager
RoPE rounds each product and the sum to the half dtype); ``leank.fused_decode`` uses it only for models whose ``apply_rotary_pos_emb``
computes exactly that (``is_standard_rope``).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .diagnostics import log_once
from .flush_kernel import _pow2  # the next power of two, at least ``least`` (Triton block sizes)

Tensor = torch.Tensor

# the fused decode step applies standard RoPE inside its append kernel (False: the model's own
# apply_rotary_pos_emb, compiled by Inductor, before the append; eval/e2e_decode.py --no-rope-append)
FUSE_ROPE: bool = True
_Q_HEADS = 8  # query heads per program of the RoPE + append kernel (one program more does the key/value rows)


def append_rows_reference(win_k: Tensor, win_v: Tensor, win_len: Tensor, key: Tensor, value: Tensor) -> None:
    """``win_k[b, :, win_len[b]] = key[b, :, 0]`` (same for V), then ``win_len += 1``.

    Args:
        win_k, win_v: ``[batch, kv_heads, window_rows, head_dim]``, written in place.
        win_len: int32 ``[batch]``, the next free row of each sequence, incremented in place.
        key, value: ``[batch, kv_heads, 1, head_dim]``, the step's new rows.
    """
    rows = torch.arange(win_k.shape[0], device=win_k.device)
    pos = win_len.long()
    win_k[rows, :, pos] = key[:, :, 0]
    win_v[rows, :, pos] = value[:, :, 0]
    win_len += 1


@functools.lru_cache(maxsize=None)
def _triton_kernel():
    """The Triton kernel, compiled on first use (None when Triton is not importable)."""
    if importlib.util.find_spec("triton") is None:
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def append_kernel(k_ptr, v_ptr, wk_ptr, wv_ptr, len_ptr,
                      sk_b, sk_h, sv_b, sv_h, sw_b, sw_h, sw_t,
                      H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        pos = tl.load(len_ptr + b)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        m = (h < H) & (d < D)
        k = tl.load(k_ptr + b * sk_b + h * sk_h + d, mask=m)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + d, mask=m)
        dst = b * sw_b + h * sw_h + pos.to(tl.int64) * sw_t + d
        tl.store(wk_ptr + dst, k, mask=m)
        tl.store(wv_ptr + dst, v, mask=m)
        tl.store(len_ptr + b, pos + 1)

    return append_kernel


def _triton_ok(win_k: Tensor, win_v: Tensor, win_len: Tensor, key: Tensor, value: Tensor) -> bool:
    return (win_k.is_cuda and win_len.dtype == torch.int32 and win_k.stride() == win_v.stride()
            and win_k.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
            and key.dtype == win_k.dtype and value.dtype == win_v.dtype)


def append_rows_(win_k: Tensor, win_v: Tensor, win_len: Tensor, key: Tensor, value: Tensor) -> None:
    """``append_rows_reference`` in one launch on CUDA (shapes as there)."""
    kernel = _triton_kernel() if _triton_ok(win_k, win_v, win_len, key, value) else None
    if kernel is None:
        if win_k.is_cuda:
            log_once(__name__, "leank: window append through PyTorch indexing (Triton not importable, "
                               "or an unusual layout)")
        append_rows_reference(win_k, win_v, win_len, key, value)
        return
    b, h, _, d = key.shape
    kernel[(b,)](key, value, win_k, win_v, win_len,
                 key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                 win_k.stride(0), win_k.stride(1), win_k.stride(2),
                 H=h, D=d, BLOCK_H=_pow2(h), BLOCK_D=_pow2(d, 16),
                 num_warps=1 if h * d <= 1024 else 4)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Standard rotate-half RoPE in float32 (float64 for float64 input), rounded once to ``x.dtype``.

    Args:
        x: ``[batch, heads, head_dim]``; cos, sin: ``[batch, head_dim]``.
    Returns:
        ``x * cos + rotate_half(x) * sin``, ``[batch, heads, head_dim]``, ``x.dtype``.
    """
    half = x.shape[-1] // 2
    acc = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(acc)
    rot = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos.to(acc)[:, None] + rot * sin.to(acc)[:, None]).to(x.dtype)


def rope_append_rows_reference(win_k: Tensor, win_v: Tensor, win_len: Tensor, query: Tensor, key: Tensor,
                               value: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the step's query and key, then ``append_rows_reference`` of the rotated key and the value.

    Args:
        win_k, win_v, win_len: as ``append_rows_reference`` (written in place).
        query: ``[batch, heads, 1, head_dim]``; key, value: ``[batch, kv_heads, 1, head_dim]`` (any strides).
        cos, sin: ``[batch, 1, head_dim]``, the model's rotary embedding of the step's positions.
    Returns:
        the rotated query, ``[batch, heads, head_dim]``, contiguous.
    """
    q = rope_reference(query[:, :, 0], cos[:, 0], sin[:, 0])
    k = rope_reference(key[:, :, 0], cos[:, 0], sin[:, 0])
    append_rows_reference(win_k, win_v, win_len, k[:, :, None], value)
    return q.contiguous()


@functools.lru_cache(maxsize=None)
def _rope_kernel():
    """The Triton RoPE + append kernel, compiled on first use (None when Triton is not importable)."""
    if importlib.util.find_spec("triton") is None:
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def rope_append_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, out_ptr, wk_ptr, wv_ptr, len_ptr,
                           sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, ss_b, so_b, so_h, sw_b, sw_h, sw_t,
                           H: tl.constexpr, KVH: tl.constexpr, HALF: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr):
        b, j = tl.program_id(0), tl.program_id(1)  # j = 0: key/value rows and the length; j >= 1: query heads
        d = tl.arange(0, BLOCK_HALF)[None, :]
        dm = d < HALF
        c1 = tl.load(cos_ptr + b * sc_b + d, mask=dm).to(tl.float32)
        c2 = tl.load(cos_ptr + b * sc_b + HALF + d, mask=dm).to(tl.float32)
        s1 = tl.load(sin_ptr + b * ss_b + d, mask=dm).to(tl.float32)
        s2 = tl.load(sin_ptr + b * ss_b + HALF + d, mask=dm).to(tl.float32)
        if j == 0:  # key (rotated) and value -> the window row win_len[b]; only this program reads the length
            pos = tl.load(len_ptr + b)
            hk = tl.arange(0, BLOCK_KV)[:, None]
            mk = (hk < KVH) & dm
            row = b * sw_b + hk * sw_h + pos.to(tl.int64) * sw_t + d
            ksrc = k_ptr + b * sk_b + hk * sk_h + d
            k1 = tl.load(ksrc, mask=mk).to(tl.float32)
            k2 = tl.load(ksrc + HALF, mask=mk).to(tl.float32)
            tl.store(wk_ptr + row, (k1 * c1 - k2 * s1).to(wk_ptr.dtype.element_ty), mask=mk)
            tl.store(wk_ptr + row + HALF, (k2 * c2 + k1 * s2).to(wk_ptr.dtype.element_ty), mask=mk)
            vsrc = v_ptr + b * sv_b + hk * sv_h + d
            tl.store(wv_ptr + row, tl.load(vsrc, mask=mk), mask=mk)
            tl.store(wv_ptr + row + HALF, tl.load(vsrc + HALF, mask=mk), mask=mk)
            tl.store(len_ptr + b, pos + 1)
        else:  # query heads [(j - 1) BLOCK_H, j BLOCK_H) -> out (contiguous rows)
            hq = (j - 1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
            mq = (hq < H) & dm
            qsrc = q_ptr + b * sq_b + hq * sq_h + d
            q1 = tl.load(qsrc, mask=mq).to(tl.float32)
            q2 = tl.load(qsrc + HALF, mask=mq).to(tl.float32)
            dst = out_ptr + b * so_b + hq * so_h + d
            tl.store(dst, (q1 * c1 - q2 * s1).to(out_ptr.dtype.element_ty), mask=mq)
            tl.store(dst + HALF, (q2 * c2 + q1 * s2).to(out_ptr.dtype.element_ty), mask=mq)

    return rope_append_kernel


def _rope_ok(win_k: Tensor, win_v: Tensor, win_len: Tensor, query: Tensor, key: Tensor, value: Tensor,
             cos: Tensor, sin: Tensor) -> bool:
    return (win_k.is_cuda and win_len.dtype == torch.int32 and win_k.stride() == win_v.stride()
            and win_k.shape[-1] % 2 == 0 and all(t.stride(-1) == 1 for t in (win_k, query, key, value, cos, sin))
            and query.dtype == key.dtype == win_k.dtype and value.dtype == win_v.dtype)


def rope_append_rows_triton(win_k: Tensor, win_v: Tensor, win_len: Tensor, query: Tensor, key: Tensor,
                            value: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``rope_append_rows_reference`` in one Triton launch (arguments and result as there). Needs Triton;
    runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests)."""
    kernel = _rope_kernel()
    if kernel is None:
        raise RuntimeError("rope_append_rows_triton: Triton is not importable")
    b, h, _, d = query.shape
    kvh = key.shape[1]
    out = query.new_empty((b, h, d))
    block_h = min(_pow2(h), _Q_HEADS)
    kernel[(b, 1 + -(-h // block_h))](query, key, value, cos, sin, out, win_k, win_v, win_len,
                 query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                 cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
                 win_k.stride(0), win_k.stride(1), win_k.stride(2),
                 H=h, KVH=kvh, HALF=d // 2, BLOCK_H=block_h, BLOCK_KV=_pow2(kvh), BLOCK_HALF=_pow2(d // 2, 16),
                 num_warps=4 if max(block_h, kvh) * d > 1024 else 2)
    return out


def rope_append_rows_(win_k: Tensor, win_v: Tensor, win_len: Tensor, query: Tensor, key: Tensor, value: Tensor,
                      cos: Tensor, sin: Tensor) -> Tensor:
    """``rope_append_rows_reference`` in one launch on CUDA (arguments and result as there)."""
    if _rope_ok(win_k, win_v, win_len, query, key, value, cos, sin) and _rope_kernel() is not None:
        return rope_append_rows_triton(win_k, win_v, win_len, query, key, value, cos, sin)
    if win_k.is_cuda:
        log_once(__name__, "leank: RoPE and the window append through PyTorch operations (Triton not "
                           "importable, or an unusual layout)")
    return rope_append_rows_reference(win_k, win_v, win_len, query, key, value, cos, sin)


@functools.lru_cache(maxsize=None)
def is_standard_rope(fn) -> bool:
    """Whether ``fn(q, k, cos, sin)`` (a model's ``apply_rotary_pos_emb``) computes the standard rotate-half
    RoPE that ``rope_append_rows_`` applies: checked once per function on small float64 CPU tensors (a
    model whose RoPE differs, e.g. partial or interleaved, keeps its own)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 1, 8, generator=g, dtype=torch.float64), torch.randn(2, 1, 1, 8, generator=g,
                                                                                   dtype=torch.float64)
    cos, sin = torch.randn(2, 1, 8, generator=g, dtype=torch.float64), torch.randn(2, 1, 8, generator=g,
                                                                                   dtype=torch.float64)
    try:
        with torch.no_grad():
            q_out, k_out = fn(q, k, cos, sin)
    except Exception:  # any other signature or behaviour: not the standard RoPE
        return False
    q_ref = rope_reference(q[:, :, 0], cos[:, 0], sin[:, 0])[:, :, None]
    k_ref = rope_reference(k[:, :, 0], cos[:, 0], sin[:, 0])[:, :, None]
    return (isinstance(q_out, Tensor) and isinstance(k_out, Tensor) and q_out.shape == q.shape
            and k_out.shape == k.shape and torch.allclose(q_out.double(), q_ref.double(), rtol=1e-12, atol=1e-12)
            and torch.allclose(k_out.double(), k_ref.double(), rtol=1e-12, atol=1e-12))
