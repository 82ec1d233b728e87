"""The decode step's window append as one kernel.

Each decode step writes one K row and one V row per sequence into the full-width window
at that sequence's device-side length, then increments the length. In PyTorch that is a
length cast, two ``index_put`` and an add: four launches, about 10 µs per layer on an H200
for 4 KB of data. ``append_rows_`` does it in one Triton launch on CUDA (``torch`` fallback
elsewhere, and when Triton is missing), reading no host value, so it can be recorded in a
CUDA graph.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .diagnostics import log_once

Tensor = torch.Tensor


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
                 H=h, D=d, BLOCK_H=max(1, 1 << (h - 1).bit_length()), BLOCK_D=max(16, 1 << (d - 1).bit_length()),
                 num_warps=1 if h * d <= 1024 else 4)
