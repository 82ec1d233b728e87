"""Matrix-vector products of a small-batch decode step in one Triton launch each, without split-K.

At batch 1 every projection of a decode step is a matrix-vector product: it reads the weight
once and does two flops per element, so its time is the weight's bytes over the memory
bandwidth. cuBLAS runs the small ones below that (on the H200, for Qwen2.5-7B's shapes,
q/k/v at 71% and ``o_proj`` at 67% of the copy bandwidth) and splits ``o_proj`` and
``down_proj`` over K, with a second launch that sums the parts
(``eval/results/decode_profile_h200_qwen_rope.json``). With the tiles of ``config_for`` it took
0.42-0.47 ms off a batch-1 ``generate()`` step of a Llama-3.1-8B or Qwen2.5-7B shape on the H200
(``eval/results/e2e_decode_h200_*_32k_{gemv,cublas}.json``); per product against cuBLAS writing into the
output, 5.0% (Llama) and 7.5% (Qwen) less time over a step's products (``eval/results/gemv_bench_h200_fair.json``).

``linear(x, weight, bias)`` equals ``F.linear`` for one row ``x``: each program of the kernel
reads ``BLOCK_N`` rows of the weight ``BLOCK_K`` columns at a time, keeps ``BLOCK_N x BLOCK_K``
float32 partial sums in registers and reduces them once at the end; the bias is added in
float32 and the result is rounded once to the output dtype (as cuBLAS's epilogue does). The
sums run in another order than cuBLAS's, so the two differ by float32 rounding before the
final rounding.

For 2..``MAX_ROWS`` rows a second kernel pads the rows to one 16-row tensor-core tile and reads the
weight once for all of them (``_rows_kernel``, tiles ``rows_config_for``, timed at 2, 4 and 8 rows); the
decode step uses it for batches 2..``MAX_BATCH`` (8; ``eval/e2e_decode.py --gemv-max-batch 1`` keeps cuBLAS there).

It is an opaque custom op (``torch.ops.leank.gemv``, registered by ``register``) for ``torch.compile``,
which ``leank.fused_decode.decode_logits`` calls on CUDA for batches up to ``MAX_BATCH`` (8) when
``ENABLED``, for every product of the step (q/k/v, ``o_proj``, gate/up, ``down_proj``, ``lm_head``;
not under tensor parallelism, whose two-GPU tests do not cover these kernels yet); anything else (no
Triton, CPU, more than ``MAX_ROWS`` rows, float32, a strided weight) goes to ``F.linear``. The tile
config per weight shape is ``config_for`` (``CONFIG`` overrides it; measured with
``eval/gemv_bench.py``).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# the fused decode step's products (batch <= MAX_BATCH) through these kernels (False: F.linear, i.e. cuBLAS;
# eval/e2e_decode.py --no-gemv)
ENABLED: bool = True
# largest batch whose decode products the fused step sends here (eval/e2e_decode.py --gemv-max-batch). Batches
# of 2..MAX_BATCH run the tensor-core kernel (``_rows_kernel``): with the tiles of ``rows_config_for`` it took
# 3-6% off batch-4/8 generate() steps of a Qwen2.5-7B shape on the H200 (eval/results/e2e_decode_h200_qwen_*_rows.json
# against *_cublas.json). The default since the GPU suite passed with it (eval/results/gpu_tests_h200_e1082f4_maxbatch8.log;
# the illegal-address error of earlier MAX_BATCH = 8 runs was the decode kernel's out-of-row q gather, fixed in
# tilelang_kernels/decode_kernels.py)
MAX_BATCH: int = 8
MAX_ROWS = 16  # rows of x the tensor-core kernel takes (one 16-row MMA tile)
# tile config override for every shape, e.g. {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4}; None: config_for
# (one row) / rows_config_for (2..MAX_ROWS rows)
CONFIG: Optional[dict] = None
_DTYPES = (torch.float16, torch.bfloat16)
# whether Triton is importable, looked up once: ``supported`` runs while torch.compile traces the decode step,
# where Dynamo refuses import machinery such as ``importlib.util.find_spec``
HAS_TRITON: bool = importlib.util.find_spec("triton") is not None


def config_for(n: int, k: int) -> dict:
    """Tile config of the kernel for a ``[n, k]`` weight: ``BLOCK_N`` rows per program, ``BLOCK_K``
    columns per load, ``num_warps``.

    ``BLOCK_K`` is the largest of 2048 / 1024 / 512 that divides ``k`` (no column masks), else 512
    (masked), or the power of two covering a smaller ``k``. Measured on the H200 (``eval/gemv_bench.py``,
    ``eval/results/gemv_bench_h200.json``, 21 configs): one row x 2048 columns per 4-warp program was
    the fastest config over a Llama-3.1-8B step's products (k = 4096, 14336) and four rows x 512 columns
    over a Qwen2.5-7B step's (k = 3584, 18944: 2048 and 1024 leave masked tails). That file's cuBLAS times
    include a copy of the result; against cuBLAS without it: ``eval/results/gemv_bench_h200_fair.json``.
    """
    for block_k, block_n in ((2048, 1), (1024, 2), (512, 4)):
        if k % block_k == 0:
            return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4}
    if k > 512:
        return {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4}
    return {"BLOCK_N": 4, "BLOCK_K": max(64, 1 << (max(k, 1) - 1).bit_length()), "num_warps": 4}


def rows_config_for(n: int, k: int) -> dict:
    """Tile config of the 2..``MAX_ROWS``-row kernel for a ``[n, k]`` weight: ``BLOCK_N`` weight rows per
    program, ``BLOCK_K`` columns per load, ``num_warps``, ``num_stages`` (tiles Triton keeps in flight).

    Measured on the H200 at 2, 4 and 8 rows (``eval/gemv_bench.py --rows 2,4,8``,
    ``eval/results/gemv_bench_h200_rows.json``, 14 configs per product): 32 weight rows per program won
    everywhere; 512 columns and 4 stages for the square and tall weights (``o_proj``, ``down_proj``),
    256 and 4 for q/k/v (``n`` up to ``2k``), 128 and 3 for the wide ones (gate/up, ``lm_head``). ``BLOCK_K``
    is capped at the power of two covering ``k``; a ``k`` it does not divide runs with column masks.
    """
    if n <= k:  # o_proj (square), down_proj (tall)
        block_k, stages = 512, 4
    elif n <= 2 * k:
        block_k, stages = 256, 4
    else:
        block_k, stages = 128, 3
    block_k = min(block_k, max(64, 1 << (max(k, 1) - 1).bit_length()))
    return {"BLOCK_N": 32, "BLOCK_K": block_k, "num_warps": 4, "num_stages": stages}


@functools.lru_cache(maxsize=None)
def _kernel():
    """The Triton kernel, compiled on first use per config (None when Triton is not importable)."""
    if not HAS_TRITON:
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w,
                    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                x = tl.load(x_ptr + cols)
                w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
            else:
                col_ok = cols < K
                x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
                w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    return gemv_kernel


@functools.lru_cache(maxsize=None)
def _rows_kernel():
    """The 2..``MAX_ROWS``-row kernel (None when Triton is not importable): ``y[m] = W @ x[m] (+ b)`` with the
    rows of ``x`` padded to one 16-row tensor-core tile, each program ``BLOCK_N`` weight rows over all of K
    (no split-K), the weight read once for every row."""
    if not HAS_TRITON:
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_rows_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_w,
                         HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_w
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None], other=0.0)
                w = tl.load(w_rows + cols[None, :], mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
            else:
                col_ok = cols < K
                x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & col_ok[None, :], other=0.0)
                w = tl.load(w_rows + cols[None, :], mask=n_ok[:, None] & col_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
            acc = tl.dot(x, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    return gemv_rows_kernel


def supported(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether ``gemv_`` takes these inputs (else ``linear`` uses ``F.linear``): CUDA, 1..``MAX_ROWS`` rows of
    ``k`` elements, fp16/bf16 of one dtype, the weight ``[n, k]`` with unit column stride, ``x`` and ``bias``
    contiguous."""
    # traced by torch.compile (``linear``): module constants and tensor metadata only, no import machinery
    return (HAS_TRITON and _on_device(x) and x.dtype in _DTYPES and weight.dtype == x.dtype and weight.dim() == 2
            and x.shape[-1] == weight.shape[1] and x.numel() <= MAX_ROWS * weight.shape[1] and x.numel() > 0
            and x.is_contiguous() and weight.stride(1) == 1
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous() and bias.numel() == weight.shape[0])))


def _on_device(x: Tensor) -> bool:
    """Whether ``x`` lives where the kernel runs (CUDA; tests stand in for it on the CPU)."""
    return x.is_cuda


def gemv_(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor, config: Optional[dict] = None) -> Tensor:
    """``out = x @ weight.T (+ bias)`` in one launch (``supported`` must hold).

    Args:
        x: ``[..., k]``, ``m`` rows (1..``MAX_ROWS``) of ``k`` elements, contiguous.
        weight: ``[n, k]``, unit stride along ``k``; bias: ``[n]`` or None.
        out: ``[..., n]`` (``m * n`` elements), contiguous, written.
        config: tile config (default ``CONFIG``, else ``config_for(n, k)`` for one row and
            ``rows_config_for(n, k)`` for more).
    """
    n, k = weight.shape
    m = x.numel() // k
    cfg = dict(config or CONFIG or (config_for(n, k) if m == 1 else rows_config_for(n, k)))
    launch = {"num_warps": cfg.pop("num_warps", 4)}
    if "num_stages" in cfg:
        launch["num_stages"] = cfg.pop("num_stages")
    block_n, block_k = cfg["BLOCK_N"], cfg["BLOCK_K"]
    bias_ptr = weight if bias is None else bias
    if m == 1:
        _kernel()[(_cdiv(n, block_n),)](
            x, weight, bias_ptr, out, n, k, weight.stride(0),
            HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, **launch)
    else:
        _rows_kernel()[(_cdiv(n, block_n),)](
            x, weight, bias_ptr, out, m, n, k, weight.stride(0),
            HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, BLOCK_M=MAX_ROWS, BLOCK_N=block_n,
            BLOCK_K=block_k, **launch)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_OP = None


def register():
    """Register ``torch.ops.leank.gemv`` (once per process): ``x [..., k], weight [n, k], bias [n] or None ->
    [..., n]``, an opaque op for ``torch.compile`` (its fake returns the shape). The decode runner calls this
    before it compiles a step: torch.compile cannot trace a registration."""
    global _OP
    if _OP is None:
        @torch.library.custom_op("leank::gemv", mutates_args=(),
                                 schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
        def gemv(x, weight, bias):
            out = x.new_empty((*x.shape[:-1], weight.shape[0]))
            if supported(x, weight, bias):
                return gemv_(x, weight, bias, out)
            return out.copy_(F.linear(x, weight, bias))

        @gemv.register_fake
        def _(x, weight, bias):
            return x.new_empty((*x.shape[:-1], weight.shape[0]))

        _OP = gemv
    return _OP


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``; on CUDA (``supported``: up to ``MAX_ROWS`` rows) through the split-K-free
    kernels when ``ENABLED``. Called while ``torch.compile`` traces the decode step, so the choice is made at
    trace time from shapes, dtypes and devices only, and the op must be registered before (``register``).
    ``leank.fused_decode`` calls it for batches up to ``MAX_BATCH``."""
    rows = x.contiguous()
    if ENABLED and supported(rows, weight, bias):
        if _OP is None:
            if torch.compiler.is_compiling():
                raise RuntimeError("leank.gemv: call leank.gemv.register() before torch.compile traces a step "
                                   "that uses leank.gemv.linear (a registration cannot be traced)")
            register()
        return _OP(rows, weight, bias)
    return F.linear(x, weight, bias)
