"""A decode flush of one layer in a few Triton launches instead of 31-41 PyTorch operations.

A flush moves the ``move`` oldest non-sink window rows of each due sequence into the archive
(K compacted to each head's kept channels, V at full width, β reset to 0 where compaction left
one), shifts the ``recent`` rows that stay down by ``move`` and updates both lengths. In PyTorch
indexing (``flush_rows_reference``) that is 31 (two archive groups) to 41 (four) ATen operations
per layer that are not views (counted on the CPU with a ``TorchDispatchMode``), each a kernel
launch on CUDA, and a recorded flush replays them all. On the H200 the first flush of a
``generate()`` call, run eagerly, took 19 ms more than a plain step (28-32 layers).

``flush_rows_`` does the same in Triton on CUDA: one launch per archive group (the moved rows),
one that copies the rows that stay and the rollback rows to temporaries, one that writes the
rows that stay back and updates the lengths (two launches for the shift: its source and
destination overlap). Nothing is read on the host, so it can be recorded in a CUDA graph.

On by default on CUDA (``ENABLED``; set ``leank.flush_kernel.ENABLED = False`` for PyTorch indexing,
``eval/e2e_decode.py --no-flush-kernel``); CPU tensors always take ``flush_rows_reference``. On the H200,
Llama-3.1-8B shape at 32K, 64 decode steps of ``generate()`` (two flushes: the first runs eagerly, the
second is recorded), it made the flush steps 6.6 and 12.5 ms instead of 16.7 and 28.4 ms at batch 1, and
tokens/s 169.3 instead of 156.9-160.5 in the same run; at batch 8 770.5 instead of 736.6 tokens/s
(``eval/results/e2e_decode_h200_capture_ab.json``). The kernels are compiled once per process: the
strides that vary with the archive capacity are not specialised on, and ``LeanKLayer.flush_index`` starts
its index tensors 16-byte aligned. The CPU tests run the kernels in Triton's interpreter
(``TRITON_INTERPRET=1``) against the reference, the GPU tests compiled (bf16, fp16), bit for bit.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Sequence

import torch

from .diagnostics import warn_once

Tensor = torch.Tensor

# the Triton flush on CUDA (False: PyTorch indexing everywhere; eval/e2e_decode.py --no-flush-kernel)
ENABLED: bool = True
_ROWS = 16  # window rows per program


def flush_rows_reference(win_k: Tensor, win_v: Tensor, win_len: Tensor, arch_len: Tensor, groups: Sequence,
                         seq: Tensor, sink: Tensor, move: int, recent: int, keep: int) -> tuple:
    """Flush ``move`` rows of the sequences ``seq`` in PyTorch indexing.

    Args:
        win_k, win_v: ``[batch, kv_heads, window_rows, head_dim]``, shifted in place.
        win_len, arch_len: int32 ``[batch]``, updated in place (``-= move``, ``+= move`` at ``seq``).
        groups: the layer's ``ArchiveGroup``s (``heads``, ``chan [heads_d, d]``, ``keys [batch,
            heads_d, capacity, d]``, ``values [batch, heads_d, capacity, head_dim]``, ``bias``
            float32 ``[batch, heads_d, capacity]`` or None); their rows ``arch_len[b] + j`` are written.
        seq, sink: int64 ``[n]``: the flushing sequences and their sink row counts.
        move: rows that leave each window; recent: rows that stay (``sink + move + recent`` =
            the window length); keep: rollback rows returned (``<= move``).

    Returns:
        ``(k, v)`` ``[n, keep, kv_heads, head_dim]``: the last ``keep`` rows that left the window,
        at full width (for ``crop``).
    """
    rows = seq[:, None]  # [n, 1]
    j = torch.arange(move, device=win_k.device)
    src = sink[:, None] + j  # window rows that leave, [n, move]
    dst = arch_len[seq].long()[:, None] + j  # their archive rows
    wk = win_k[rows, :, src]  # [n, move, kvh, head_dim]
    wv = win_v[rows, :, src]
    n = seq.shape[0]
    for g in groups:
        kk = wk[:, :, g.heads]
        kk = torch.gather(kk, 3, g.chan[None, None].expand(n, move, -1, -1))
        g.keys[rows, :, dst] = kk
        g.values[rows, :, dst] = wv[:, :, g.heads]
        if g.bias is not None:
            g.bias[rows, :, dst] = 0.0
    r = sink[:, None] + torch.arange(recent, device=win_k.device)  # the `recent` rows that stay
    win_k[rows, :, r] = win_k[rows, :, r + move]
    win_v[rows, :, r] = win_v[rows, :, r + move]
    win_len[seq] -= move
    arch_len[seq] += move
    return wk[:, move - keep:], wv[:, move - keep:]


@functools.lru_cache(maxsize=None)
def _kernels():
    """``(archive, stash, unstash)`` Triton kernels, built on first use (None without Triton)."""
    if importlib.util.find_spec("triton") is None:
        return None
    import triton
    import triton.language as tl

    # the bias strides follow the archive capacity, which varies from call to call: not specialised on
    # (Triton would compile a variant per divisibility by 16); the other strides are multiples of 16
    # channels whatever the capacity, and seq/sink start 16-byte aligned (LeanKLayer.flush_index)
    @triton.jit(do_not_specialize=["s_bb", "s_bh"])
    def archive(wk, wv, seq_ptr, sink_ptr, alen_ptr, heads_ptr, chan_ptr, keys, vals, bias,
                s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ab, s_ah, s_at, s_ob, s_oh, s_ot, s_bb, s_bh,
                move, kept, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
                ROWS: tl.constexpr, HAS_BIAS: tl.constexpr):
        # program (flushing sequence i, head g of the group, block of moved rows); D = head_dim, kept = the
        # group's kept K channels
        i = tl.program_id(0)
        g = tl.program_id(1)
        b = tl.load(seq_ptr + i).to(tl.int64)
        s = tl.load(sink_ptr + i).to(tl.int64)
        a = tl.load(alen_ptr + b).to(tl.int64)
        h = tl.load(heads_ptr + g).to(tl.int64)
        j = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
        jm = j < move
        src = (s + j).to(tl.int64)
        dst = (a + j).to(tl.int64)
        c = tl.arange(0, BLOCK_DK)
        cm = c < kept
        ch = tl.load(chan_ptr + g * kept + c, mask=cm, other=0).to(tl.int64)
        mk = jm[:, None] & cm[None, :]
        kk = tl.load(wk + b * s_kb + h * s_kh + src[:, None] * s_kt + ch[None, :], mask=mk)
        tl.store(keys + b * s_ab + g * s_ah + dst[:, None] * s_at + c[None, :], kk, mask=mk)
        e = tl.arange(0, BLOCK_D)
        mv = jm[:, None] & (e < D)[None, :]
        vv = tl.load(wv + b * s_vb + h * s_vh + src[:, None] * s_vt + e[None, :], mask=mv)
        tl.store(vals + b * s_ob + g * s_oh + dst[:, None] * s_ot + e[None, :], vv, mask=mv)
        if HAS_BIAS:
            tl.store(bias + b * s_bb + g * s_bh + dst, tl.zeros([ROWS], dtype=tl.float32), mask=jm)

    @triton.jit
    def stash(wk, wv, seq_ptr, sink_ptr, tk, tv, rk, rv,
              s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_tn, s_th, s_tt, s_rn, s_rr, s_rh,
              move, recent, keep, recent_blocks, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        # program (flushing sequence i, KV head h, block): the first `recent_blocks` blocks copy the rows
        # that stay to the temporaries, the rest copy the last `keep` moved rows to the rollback rows
        i = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        blk = tl.program_id(2)
        b = tl.load(seq_ptr + i).to(tl.int64)
        s = tl.load(sink_ptr + i).to(tl.int64)
        e = tl.arange(0, BLOCK_D)
        em = (e < D)[None, :]
        if blk < recent_blocks:
            r = blk * ROWS + tl.arange(0, ROWS)
            m = (r < recent)[:, None] & em
            src = (s + move + r).to(tl.int64)
            k = tl.load(wk + b * s_kb + h * s_kh + src[:, None] * s_kt + e[None, :], mask=m)
            v = tl.load(wv + b * s_vb + h * s_vh + src[:, None] * s_vt + e[None, :], mask=m)
            t = i * s_tn + h * s_th + r[:, None].to(tl.int64) * s_tt + e[None, :]
            tl.store(tk + t, k, mask=m)
            tl.store(tv + t, v, mask=m)
        else:
            q = (blk - recent_blocks) * ROWS + tl.arange(0, ROWS)
            m = (q < keep)[:, None] & em
            src = (s + move - keep + q).to(tl.int64)
            k = tl.load(wk + b * s_kb + h * s_kh + src[:, None] * s_kt + e[None, :], mask=m)
            v = tl.load(wv + b * s_vb + h * s_vh + src[:, None] * s_vt + e[None, :], mask=m)
            o = i * s_rn + q[:, None].to(tl.int64) * s_rr + h * s_rh + e[None, :]
            tl.store(rk + o, k, mask=m)
            tl.store(rv + o, v, mask=m)

    @triton.jit
    def unstash(wk, wv, seq_ptr, sink_ptr, tk, tv, wlen_ptr, alen_ptr,
                s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_tn, s_th, s_tt,
                move, recent, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        # program (flushing sequence i, KV head h, block of the rows that stay); program (i, 0, 0) also
        # moves the lengths (after `archive` read arch_len: the launches run in stream order)
        i = tl.program_id(0)
        h = tl.program_id(1)
        blk = tl.program_id(2)
        b = tl.load(seq_ptr + i).to(tl.int64)
        s = tl.load(sink_ptr + i).to(tl.int64)
        e = tl.arange(0, BLOCK_D)
        r = blk * ROWS + tl.arange(0, ROWS)
        m = (r < recent)[:, None] & (e < D)[None, :]
        t = i * s_tn + h.to(tl.int64) * s_th + r[:, None].to(tl.int64) * s_tt + e[None, :]
        dst = (s + r).to(tl.int64)
        tl.store(wk + b * s_kb + h * s_kh + dst[:, None] * s_kt + e[None, :], tl.load(tk + t, mask=m), mask=m)
        tl.store(wv + b * s_vb + h * s_vh + dst[:, None] * s_vt + e[None, :], tl.load(tv + t, mask=m), mask=m)
        if h == 0:
            if blk == 0:
                tl.store(wlen_ptr + b, tl.load(wlen_ptr + b) - move)
                tl.store(alen_ptr + b, tl.load(alen_ptr + b) + move)

    return archive, stash, unstash


def _pow2(x: int, least: int = 1) -> int:
    return max(least, 1 << (max(1, x) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def flush_rows_triton(win_k: Tensor, win_v: Tensor, win_len: Tensor, arch_len: Tensor, groups: Sequence,
                      seq: Tensor, sink: Tensor, move: int, recent: int, keep: int) -> tuple:
    """``flush_rows_reference`` in Triton (arguments and result as there). Needs Triton; runs on CUDA
    tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests)."""
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("flush_rows_triton: Triton is not importable")
    archive, stash, unstash = kernels
    n, (_, kvh, _, head_dim) = seq.shape[0], win_k.shape
    block_d = _pow2(head_dim, 16)
    for g in groups:
        heads, chan = g.heads, g.chan.contiguous()
        bias = g.bias if g.bias is not None else g.keys  # a placeholder pointer, never written (HAS_BIAS)
        archive[(n, heads.shape[0], _cdiv(move, _ROWS))](
            win_k, win_v, seq, sink, arch_len, heads, chan, g.keys, g.values, bias,
            *win_k.stride()[:3], *win_v.stride()[:3], *g.keys.stride()[:3], *g.values.stride()[:3],
            *(g.bias.stride()[:2] if g.bias is not None else (0, 0)),
            move, chan.shape[1], D=head_dim, BLOCK_D=block_d, BLOCK_DK=_pow2(chan.shape[1], 16), ROWS=_ROWS,
            HAS_BIAS=g.bias is not None)
    tk = win_k.new_empty((n, kvh, recent, head_dim))  # the rows that stay (source and destination overlap)
    tv = win_v.new_empty((n, kvh, recent, head_dim))
    rk = win_k.new_empty((n, keep, kvh, head_dim))
    rv = win_v.new_empty((n, keep, kvh, head_dim))
    recent_blocks = _cdiv(recent, _ROWS)
    stash[(n, kvh, recent_blocks + _cdiv(keep, _ROWS))](
        win_k, win_v, seq, sink, tk, tv, rk, rv,
        *win_k.stride()[:3], *win_v.stride()[:3], *tk.stride()[:3], *rk.stride()[:3],
        move, recent, keep, recent_blocks, D=head_dim, BLOCK_D=block_d, ROWS=_ROWS)
    unstash[(n, kvh, max(1, recent_blocks))](
        win_k, win_v, seq, sink, tk, tv, win_len, arch_len,
        *win_k.stride()[:3], *win_v.stride()[:3], *tk.stride()[:3],
        move, recent, D=head_dim, BLOCK_D=block_d, ROWS=_ROWS)
    return rk, rv


def _triton_ok(win_k: Tensor, win_v: Tensor, win_len: Tensor, arch_len: Tensor, groups: Sequence) -> bool:
    tensors = [win_k, win_v] + [t for g in groups for t in (g.keys, g.values)]
    return (win_k.is_cuda and win_len.dtype == torch.int32 and arch_len.dtype == torch.int32
            and all(t.stride(-1) == 1 for t in tensors) and all(g.values is not None for g in groups)
            and all(g.bias is None or g.bias.stride(-1) == 1 for g in groups))


def flush_rows_(win_k: Tensor, win_v: Tensor, win_len: Tensor, arch_len: Tensor, groups: Sequence,
                seq: Tensor, sink: Tensor, move: int, recent: int, keep: int) -> tuple:
    """The flush of one layer (arguments and result as ``flush_rows_reference``): the Triton kernels
    when ``ENABLED``, on CUDA, with Triton importable; else PyTorch indexing."""
    if ENABLED and _triton_ok(win_k, win_v, win_len, arch_len, groups):
        if _kernels() is not None:
            return flush_rows_triton(win_k, win_v, win_len, arch_len, groups, seq, sink, move, recent, keep)
        warn_once(__name__, "leank: the decode flush runs through PyTorch indexing on CUDA: Triton is not importable "
                  "(install triton for the one-launch-per-group flush; results are the same)")
    return flush_rows_reference(win_k, win_v, win_len, arch_len, groups, seq, sink, move, recent, keep)
