"""TileLang kernels for one LeanK decode step: a split pass over a work table + an LSE combine.

This module imports TileLang: import it only on the ``tilelang`` backend. The validated
public entry point is :func:`tilelang_kernels.decode.decode_attention`.

Two launches per layer and step:

1. ``split``: one block per (work item, sequence). A work item is one KV head, one
   *segment* (that head's full window, or its row in one archive slot) and one of
   ``nsplit`` equal, block-aligned token ranges of the segment's runtime length. The
   block gathers the kept channels of the query heads of its KV head, runs online
   softmax (base 2, float32) over its range and writes a normalised float32 partial
   output and its base-2 LSE to part ``part`` of its query heads.
2. ``combine``: one block per (32-channel chunk, query head, sequence) merges the parts by LSE
   (``combine_kernel_chunked``; ``combine_kernel``, one block per query head, is the variant).

Archive slots have compile-time kept counts ``slot_dims``; batch, capacities, heads per
slot, table size and part count are ``T.dynamic``: a model compiles this pair once per
(head shape, slot set, dtype, bias flag) and never again as the context grows.
"""

import tilelang.language as T

from .capability import BLOCK_H, HEAD_DIMS, MAX_SLOTS

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# the combine kernel: one thread per part (parts per KV head <= COMBINE_THREADS)
COMBINE_THREADS = 128

# Work-table columns (int32 [num_items, TABLE_COLS]).
COL_SLOT, COL_ROW, COL_KVH, COL_SPLIT, COL_NSPLIT, COL_PART = range(6)
TABLE_COLS = 6

PASS_CONFIGS = {}


# Tile config per head_dim on SM90: 64-token K/V tiles, two TMA stages, one warpgroup. head_dim
# 64 uses the same tiles (half the bytes per stage). ``block_H`` (query rows per block) is not
# here: ``default_config`` takes the smallest of BLOCK_H_CHOICES that holds the GQA group.
CONFIGS = {
    128: {"block_N": 64, "num_stages": 2, "threads": 128},
    64: {"block_N": 64, "num_stages": 2, "threads": 128},
}
# Query-row tiles: 16 and 32 rows run mma.sync tiles, 64 one wgmma per warpgroup. Measured on the
# H200 (eval/kernel_bench.py, bf16, built-in mixes): 16 rows instead of 64 for a 4- or 7-head
# group took Llama-3.1-8B 128K x 8 from 727 to 601 us and Qwen2.5-7B 32K x 1 from 40.1 to 27.4 us
# (a 4- or 7-head group fills 4 or 7 of a 64-row tile's rows; the rest is padding work).
BLOCK_H_CHOICES = (16, 32, 64)


def default_block_h(group: int) -> int:
    """Smallest query-row tile of ``BLOCK_H_CHOICES`` that holds ``group`` query heads per KV head."""
    for bh in BLOCK_H_CHOICES:
        if group <= bh:
            return bh
    raise ValueError(f"group: at most {BLOCK_H} query heads per KV head, got {group}")


def default_config(head_dim: int = 128, group: int = 1) -> dict:
    """Tile config of the split kernel for ``head_dim`` and a GQA ``group`` (query heads per KV
    head) on SM90: ``CONFIGS[head_dim]`` plus ``block_H = default_block_h(group)``."""
    if head_dim not in CONFIGS:
        raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {head_dim}")
    return {**CONFIGS[head_dim], "block_H": default_block_h(group)}


def split_kernel(num_heads, num_kv_heads, head_dim, slot_dims, dtype, has_bias,
                 block_N=64, block_H=None, num_stages=2, threads=128, pdl=False):
    """Build the split pass. Table slot ``len(slot_dims)`` means the window. ``block_H`` (query rows
    per block) defaults to ``default_block_h`` of the GQA group, as ``default_config`` does.

    ``pdl`` (experiment, ``eval/kernel_bench.py --pdl``): programmatic dependent launch. The kernel
    is launched as a dependent of the kernel before it (its launch and block set-up overlap that
    kernel's tail; ``griddepcontrol.wait`` before any read, since the window K/V were just appended)
    and lets the combine launch once every block has finished its tiles (``launch_dependents``
    before the partial outputs are written; the combine waits for the whole grid before reading).
    """
    if len(slot_dims) > MAX_SLOTS:
        raise ValueError(f"slot_dims: at most {MAX_SLOTS} archive slots, got {len(slot_dims)}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {head_dim}")
    bad = [d for d in slot_dims if d % 16 or not 0 < d <= head_dim]
    if bad:
        raise ValueError(f"slot_dims: expected multiples of 16 in 16..{head_dim}, got {tuple(slot_dims)}")
    rep = num_heads // num_kv_heads
    if block_H is None:  # as default_config: the smallest tile that holds the group
        block_H = default_block_h(rep) if rep <= BLOCK_H else BLOCK_H
    if block_H not in BLOCK_H_CHOICES:
        raise ValueError(f"block_H: expected 16, 32 or 64 query rows per block, got {block_H}")
    if rep > block_H:
        raise ValueError(f"num_heads: at most block_H={block_H} query heads per KV head, got {rep}")
    D = head_dim
    nslots = len(slot_dims)
    # a 64-row tile is one wgmma per warpgroup (warps along rows); fewer rows split the columns over the warps
    policy = T.GemmWarpPolicy.FullRow if block_H >= 64 else T.GemmWarpPolicy.FullCol
    accum = T.float32
    neg_inf = -T.infinity(accum)

    B = T.dynamic("batch")
    WCAP = T.dynamic("win_cap")
    NI = T.dynamic("num_items")
    NP = T.dynamic("num_parts")
    HG = [T.dynamic(f"heads_{s}") for s in range(MAX_SLOTS)]
    CAP = [T.dynamic(f"cap_{s}") for s in range(MAX_SLOTS)]

    def kshape(s):
        return [B, HG[s], CAP[s], slot_dims[s]] if s < nslots else [1]

    def vshape(s):
        return [B, HG[s], CAP[s], D] if s < nslots else [1]

    def cshape(s):
        return [HG[s], slot_dims[s]] if s < nslots else [1]

    def bshape(s):
        return [B, HG[s], CAP[s]] if (s < nslots and has_bias) else [1]

    @T.macro
    def online_tile(acc_s, acc_s_cast, acc_o, m_run, m_prev, l_run, tile_sum, alpha):
        # acc_s: base-2 logits of one tile, -inf where masked.
        T.copy(m_run, m_prev)
        T.reduce_max(acc_s, m_run, dim=1, clear=False)
        for i in T.Parallel(block_H):
            alpha[i] = T.exp2(m_prev[i] - T.if_then_else(m_run[i] == neg_inf, 0.0, m_run[i]))
        for i, j in T.Parallel(block_H, block_N):
            acc_s[i, j] = T.exp2(acc_s[i, j] - T.if_then_else(m_run[i] == neg_inf, 0.0, m_run[i]))
        T.reduce_sum(acc_s, tile_sum, dim=1)
        for i in T.Parallel(block_H):
            l_run[i] = l_run[i] * alpha[i] + tile_sum[i]
        T.copy(acc_s, acc_s_cast)
        for i, j in T.Parallel(block_H, D):
            acc_o[i, j] *= alpha[i]

    @T.macro
    def issue(Kt, Vt, b, row, n0, K_sh, V_sh, bars, st):
        # TMA loads of one K and one V tile into stage ``st``, completing on ``bars[st]``
        T.tma_copy(Kt[b, row, n0 : n0 + block_N, :], K_sh[st, :, :], barrier=bars[st])
        T.tma_copy(Vt[b, row, n0 : n0 + block_N, :], V_sh[st, :, :], barrier=bars[st])
        if T.shuffle_elect(threads):
            T.barrier_arrive(bars[st])

    @T.macro
    def segment(Q, Kt, Vt, Ct, Bt, d, b, kvh, row, sidx, ns, L, qs, bars,
                acc_s, acc_s_cast, acc_o, m_run, m_prev, l_run, tile_sum, alpha):
        # token range of this split: block-aligned chunks of the runtime length L
        chunk = T.alloc_var(T.int32, init=((L + ns * block_N - 1) // (ns * block_N)) * block_N)
        start = T.alloc_var(T.int32, init=T.min(sidx * chunk, L))
        end = T.alloc_var(T.int32, init=T.min(start + chunk, L))
        n = T.alloc_var(T.int32, init=(end - start + block_N - 1) // block_N)
        Q_sh = T.alloc_shared([block_H, d], dtype)
        K_sh = T.alloc_shared([num_stages, block_N, d], dtype)
        V_sh = T.alloc_shared([num_stages, block_N, D], dtype)
        # prologue: the first num_stages tiles in flight while q is gathered
        for st in T.unroll(num_stages):
            if st < n:
                issue(Kt, Vt, b, row, start + st * block_N, K_sh, V_sh, bars, st)
        # q rows of this KV head's group, then zeros for the tile's padding rows. No condition on the row
        # inside the gather: with one (``if_then_else(i < rep, Q[.., Ct[row, j]], 0)``), TileLang 0.1.15
        # simplified Ct's index under that condition but also evaluated it outside, reading up to 1,535
        # int64s past the row for group 1 and kept counts 48/80/96/112 (CUDA_ERROR_ILLEGAL_ADDRESS where
        # that crossed into unmapped memory; tests/test_kernels_compile.py checks every such read)
        if Ct is None:
            for i, j in T.Parallel(rep, d):
                Q_sh[i, j] = Q[b, kvh * rep + i, j]
        else:
            for i, j in T.Parallel(rep, d):
                Q_sh[i, j] = Q[b, kvh * rep + i, Ct[row, j]]
        if rep < block_H:
            for i, j in T.Parallel(block_H - rep, d):
                Q_sh[rep + i, j] = T.cast(0, dtype)
        for k in T.serial(n):
            st = k % num_stages
            n0 = start + k * block_N
            T.mbarrier_wait_parity(bars[st], (k // num_stages) % 2)
            T.clear(acc_s)
            T.gemm(Q_sh, K_sh[st, :, :], acc_s, transpose_B=True, policy=policy)
            if Bt is None:
                for i, j in T.Parallel(block_H, block_N):
                    acc_s[i, j] = T.if_then_else(n0 + j < end, acc_s[i, j] * qs, neg_inf)
            else:
                for i, j in T.Parallel(block_H, block_N):
                    acc_s[i, j] = T.if_then_else(
                        n0 + j < end, acc_s[i, j] * qs + Bt[b, row, n0 + j] * LOG2E, neg_inf)
            online_tile(acc_s, acc_s_cast, acc_o, m_run, m_prev, l_run, tile_sum, alpha)
            T.gemm(acc_s_cast, V_sh[st, :, :], acc_o, policy=policy)
            T.sync_threads()  # every warp is done with stage st before it is refilled
            if k + num_stages < n:
                issue(Kt, Vt, b, row, n0 + num_stages * block_N, K_sh, V_sh, bars, st)

    @T.prim_func
    def split(
        Q: T.Tensor([B, num_heads, D], dtype),
        WK: T.Tensor([B, num_kv_heads, WCAP, D], dtype),
        WV: T.Tensor([B, num_kv_heads, WCAP, D], dtype),
        WLEN: T.Tensor([B], T.int32),
        ALEN: T.Tensor([B], T.int32),
        K0: T.Tensor(kshape(0), dtype), V0: T.Tensor(vshape(0), dtype),
        C0: T.Tensor(cshape(0), T.int64), B0: T.Tensor(bshape(0), accum),
        K1: T.Tensor(kshape(1), dtype), V1: T.Tensor(vshape(1), dtype),
        C1: T.Tensor(cshape(1), T.int64), B1: T.Tensor(bshape(1), accum),
        K2: T.Tensor(kshape(2), dtype), V2: T.Tensor(vshape(2), dtype),
        C2: T.Tensor(cshape(2), T.int64), B2: T.Tensor(bshape(2), accum),
        K3: T.Tensor(kshape(3), dtype), V3: T.Tensor(vshape(3), dtype),
        C3: T.Tensor(cshape(3), T.int64), B3: T.Tensor(bshape(3), accum),
        K4: T.Tensor(kshape(4), dtype), V4: T.Tensor(vshape(4), dtype),
        C4: T.Tensor(cshape(4), T.int64), B4: T.Tensor(bshape(4), accum),
        K5: T.Tensor(kshape(5), dtype), V5: T.Tensor(vshape(5), dtype),
        C5: T.Tensor(cshape(5), T.int64), B5: T.Tensor(bshape(5), accum),
        K6: T.Tensor(kshape(6), dtype), V6: T.Tensor(vshape(6), dtype),
        C6: T.Tensor(cshape(6), T.int64), B6: T.Tensor(bshape(6), accum),
        K7: T.Tensor(kshape(7), dtype), V7: T.Tensor(vshape(7), dtype),
        C7: T.Tensor(cshape(7), T.int64), B7: T.Tensor(bshape(7), accum),
        TABLE: T.Tensor([NI, TABLE_COLS], T.int32),
        OPART: T.Tensor([B, num_heads, NP, D], accum),
        LPART: T.Tensor([B, num_heads, NP], accum),
        SCALE: T.float32,
    ):
        with T.Kernel(NI, B, threads=threads) as (bx, by):
            if pdl:
                T.pdl_sync()  # the previous kernel (the append of this step's K/V) has finished
            bars = T.alloc_barrier([1] * num_stages)
            acc_s = T.alloc_fragment([block_H, block_N], accum)
            if block_H >= 64:
                acc_s_cast = T.alloc_fragment([block_H, block_N], dtype)
            else:  # columns of P live in other warps than the rows P.V needs: exchange through shared memory
                acc_s_cast = T.alloc_shared([block_H, block_N], dtype)
            acc_o = T.alloc_fragment([block_H, D], accum)
            m_run = T.alloc_fragment([block_H], accum)
            m_prev = T.alloc_fragment([block_H], accum)
            l_run = T.alloc_fragment([block_H], accum)
            tile_sum = T.alloc_fragment([block_H], accum)
            alpha = T.alloc_fragment([block_H], accum)

            slot = TABLE[bx, COL_SLOT]
            row = TABLE[bx, COL_ROW]
            kvh = TABLE[bx, COL_KVH]
            sidx = TABLE[bx, COL_SPLIT]
            ns = TABLE[bx, COL_NSPLIT]
            part = TABLE[bx, COL_PART]
            b = by
            qs = SCALE * LOG2E
            ks = (K0, K1, K2, K3, K4, K5, K6, K7)
            vs = (V0, V1, V2, V3, V4, V5, V6, V7)
            cs = (C0, C1, C2, C3, C4, C5, C6, C7)
            bs = (B0, B1, B2, B3, B4, B5, B6, B7)

            T.fill(acc_o, 0)
            T.fill(l_run, 0)
            T.fill(m_run, neg_inf)

            if slot == nslots:
                segment(Q, WK, WV, None, None, D, b, kvh, row, sidx, ns, WLEN[b], qs, bars,
                        acc_s, acc_s_cast, acc_o, m_run, m_prev, l_run, tile_sum, alpha)
            for s in list(range(nslots)):
                if slot == s:
                    segment(Q, ks[s], vs[s], cs[s], bs[s] if has_bias else None, slot_dims[s],
                            b, kvh, row, sidx, ns, ALEN[b], qs, bars,
                            acc_s, acc_s_cast, acc_o, m_run, m_prev, l_run, tile_sum, alpha)
            if pdl:
                T.pdl_trigger()  # the combine may launch; it waits for this grid before reading the parts

            for i in T.Parallel(block_H):
                if i < rep:
                    LPART[b, kvh * rep + i, part] = T.if_then_else(
                        l_run[i] > 0, T.log2(l_run[i]) + m_run[i], neg_inf)
            for i, j in T.Parallel(block_H, D):
                if i < rep:
                    OPART[b, kvh * rep + i, part, j] = T.if_then_else(
                        l_run[i] > 0, acc_o[i, j] / l_run[i], 0)

    return split


def combine_kernel_chunked(num_heads, num_kv_heads, head_dim, dtype, pdl=False):
    """Build the combine pass (the default) with one block per (32-channel chunk, query head, sequence):
    the same LSE-merge of ``nparts[kv_head]`` (at most 128) float32 parts as ``combine_kernel``.

    At batch 1 ``combine_kernel`` runs one block per query head (28 for Qwen2.5-7B) whose threads each
    sum one channel over every part, a chain of dependent L2 reads as long as the parts (5-7 µs for
    60-100 parts on the H200, ``eval/results/kernel_bench_h200_kernel_times.log``). Here ``head_dim / 32``
    blocks share a head: each computes the parts' max and sum of weights itself (thread ``t`` loads part
    ``t``'s LSE), then warp ``w`` sums parts ``w, w + 4, ...`` for its chunk's 32 channels (one 128-byte
    read per part and warp) and the four warps' sums meet in shared memory. Each thread's chain is a
    quarter of the parts; there are 4x (head_dim 128) or 2x (64) the blocks. On the H200 it took the
    combine from 5.2-7.1 to 3.4-4.5 µs per call and the call 1.3-3.0 µs faster at batch 1
    (``eval/results/kernel_bench_h200_combine_chunked.log``, ``eval/kernel_bench.py --kernel-times``).
    """
    rep = num_heads // num_kv_heads
    D = head_dim
    NT = COMBINE_THREADS
    CH = 32  # channels per block: one per lane
    NW = NT // 32  # warps, each over every NW-th part
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {D}")
    accum = T.float32
    neg_inf = -T.infinity(accum)
    B = T.dynamic("batch")
    NP = T.dynamic("num_parts")

    @T.prim_func
    def combine(
        OPART: T.Tensor([B, num_heads, NP, D], accum),
        LPART: T.Tensor([B, num_heads, NP], accum),
        NPARTS: T.Tensor([num_kv_heads], T.int32),
        O: T.Tensor([B, num_heads, D], dtype),
        LSE: T.Tensor([B, num_heads], accum),
    ):
        with T.Kernel(D // CH, num_heads, B, threads=NT) as (c, h, b):
            if pdl:
                T.pdl_sync()  # the split grid has finished and its parts are visible
            tx = T.get_thread_binding()
            warp = tx // 32
            lane = tx % 32
            red = T.alloc_shared([2 * NW], accum)
            wts = T.alloc_shared([NT], accum)
            sums = T.alloc_shared([NW, CH], accum)
            n = T.alloc_var(T.int32, init=NPARTS[h // rep])
            lp = T.alloc_var(accum, init=neg_inf)
            if tx < n:
                lp = LPART[b, h, tx]
            m = T.alloc_var(accum, init=lp)
            for off in [16, 8, 4, 2, 1]:
                m = T.max(m, T.shfl_xor(m, off))
            if lane == 0:
                red[warp] = m
            T.sync_threads()
            m = T.max(T.max(red[0], red[1]), T.max(red[2], red[3]))
            w = T.alloc_var(accum, init=T.if_then_else(lp == neg_inf, 0.0, T.exp2(lp - m)))
            wts[tx] = w
            tot = T.alloc_var(accum, init=w)
            for off in [16, 8, 4, 2, 1]:
                tot = tot + T.shfl_xor(tot, off)
            if lane == 0:
                red[NW + warp] = tot
            T.sync_threads()
            tot = red[NW] + red[NW + 1] + red[NW + 2] + red[NW + 3]
            # parts warp, warp + NW, ... below n: full rounds without a bound check (the loads of an unrolled
            # stretch are independent), then at most one more part
            acc = T.alloc_var(accum, init=0.0)
            full = T.alloc_var(T.int32, init=n // NW)
            for i in T.unroll(full, unroll_factor=8):
                acc = acc + wts[i * NW + warp] * OPART[b, h, i * NW + warp, c * CH + lane]
            if full * NW + warp < n:
                acc = acc + wts[full * NW + warp] * OPART[b, h, full * NW + warp, c * CH + lane]
            sums[warp, lane] = acc
            T.sync_threads()
            if tx < CH:
                total = T.alloc_var(accum, init=sums[0, tx] + sums[1, tx] + sums[2, tx] + sums[3, tx])
                O[b, h, c * CH + tx] = T.if_then_else(tot > 0, total / tot, 0.0)
            if tx == 0 and c == 0:
                LSE[b, h] = T.if_then_else(tot > 0, (T.log2(tot) + m) * LN2, neg_inf)

    return combine


def combine_kernel(num_heads, num_kv_heads, head_dim, dtype, vector=1, pdl=False):
    """Build the per-head combine pass (``--no-combine-chunked``; the default is ``combine_kernel_chunked``):
    LSE-merge of ``nparts[kv_head]`` (at most 128) float32 parts.

    One block of 128 threads per (query head, sequence): thread ``t`` loads part ``t``'s
    LSE, the block reduces max and sum with warp shuffles, then the weighted sum over parts:

    * ``vector=1``: thread ``j < head_dim`` sums channel ``j`` over all parts (independent
      loads, unrolled). For head_dim 64 the upper half of the block only takes part in the
      reductions.
    * ``vector=4`` (experiment, ``eval/kernel_bench.py --combine-vector 4``): a thread reads 4
      channels at once and the block's ``128 / (head_dim / 4)`` lanes of threads take every
      lane-th part, so each thread issues a quarter (head_dim 128) or an eighth (64) of the
      dependent-latency rounds; the lanes' sums meet in shared memory.

    ``pdl`` (experiment, with the split kernel's): launched as a programmatic dependent of the split
    kernel, it waits (``griddepcontrol.wait``) for the split grid before reading anything.
    """
    rep = num_heads // num_kv_heads
    D = head_dim
    NT = COMBINE_THREADS
    if D not in HEAD_DIMS or D > NT:
        raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {D}")
    if vector not in (1, 4):
        raise ValueError(f"vector (config combine_vector, kernel_bench --combine-vector): expected 1 or 4 "
                         f"channels per thread, got {vector}")
    cols = D // vector  # threads across the channels of one part
    lanes = NT // cols  # parts summed side by side (1 when vector=1 and D=128)
    accum = T.float32
    neg_inf = -T.infinity(accum)
    B = T.dynamic("batch")
    NP = T.dynamic("num_parts")
    NW = NT // 32  # warps

    @T.prim_func
    def combine(
        OPART: T.Tensor([B, num_heads, NP, D], accum),
        LPART: T.Tensor([B, num_heads, NP], accum),
        NPARTS: T.Tensor([num_kv_heads], T.int32),
        O: T.Tensor([B, num_heads, D], dtype),
        LSE: T.Tensor([B, num_heads], accum),
    ):
        with T.Kernel(num_heads, B, threads=NT) as (h, b):
            if pdl:
                T.pdl_sync()  # the split grid has finished and its parts are visible
            tx = T.get_thread_binding()
            red = T.alloc_shared([2 * NW], accum)
            wts = T.alloc_shared([NT], accum)
            n = T.alloc_var(T.int32, init=NPARTS[h // rep])
            lp = T.alloc_var(accum, init=neg_inf)
            if tx < n:
                lp = LPART[b, h, tx]
            m = T.alloc_var(accum, init=lp)
            for off in [16, 8, 4, 2, 1]:
                m = T.max(m, T.shfl_xor(m, off))
            if tx % 32 == 0:
                red[tx // 32] = m
            T.sync_threads()
            m = T.max(T.max(red[0], red[1]), T.max(red[2], red[3]))
            w = T.alloc_var(accum, init=T.if_then_else(lp == neg_inf, 0.0, T.exp2(lp - m)))
            wts[tx] = w
            tot = T.alloc_var(accum, init=w)
            for off in [16, 8, 4, 2, 1]:
                tot = tot + T.shfl_xor(tot, off)
            if tx % 32 == 0:
                red[NW + tx // 32] = tot
            T.sync_threads()
            tot = red[NW] + red[NW + 1] + red[NW + 2] + red[NW + 3]
            if vector == 1:
                acc = T.alloc_var(accum, init=0.0)
                if tx < D:
                    for p in T.unroll(n, unroll_factor=8):
                        acc = acc + wts[p] * OPART[b, h, p, tx]
                    O[b, h, tx] = T.if_then_else(tot > 0, acc / tot, 0.0)
            else:
                lane = tx // cols
                c0 = (tx % cols) * vector
                acc4 = T.alloc_local([vector], accum)
                lane_sum = T.alloc_shared([lanes, D], accum)
                for v in T.vectorized(vector):
                    acc4[v] = 0.0
                for i in T.unroll((n + lanes - 1) // lanes, unroll_factor=4):
                    if i * lanes + lane < n:
                        for v in T.vectorized(vector):
                            acc4[v] = acc4[v] + wts[i * lanes + lane] * OPART[b, h, i * lanes + lane, c0 + v]
                for v in T.vectorized(vector):
                    lane_sum[lane, c0 + v] = acc4[v]
                T.sync_threads()
                if tx < D:
                    s = T.alloc_var(accum, init=0.0)
                    for r in T.unroll(lanes):
                        s = s + lane_sum[r, tx]
                    O[b, h, tx] = T.if_then_else(tot > 0, s / tot, 0.0)
            if tx == 0:
                LSE[b, h] = T.if_then_else(tot > 0, (T.log2(tot) + m) * LN2, neg_inf)

    return combine
