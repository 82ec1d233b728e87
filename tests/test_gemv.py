"""The batch-1 product kernel (``leank.gemv``): against a float64 product of the same inputs, in Triton's
interpreter on the CPU (a fresh process with ``TRITON_INTERPRET=1``), compiled for sm_90 on the CPU, and on
CUDA (GPU tests, also inside a CUDA graph and in the fused decode step)."""

import itertools
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from leank import gemv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TRITON = gemv._kernel() is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")

# (n, k, bias, config): awkward sizes (n not a multiple of BLOCK_N, k not of BLOCK_K, k below one block), both
# code paths of the loop (EVEN_K and masked columns), the default config and explicit ones
CASES = [
    (1, 1, False, None), (7, 33, True, None), (37, 1000, False, None), (64, 2048, True, None),
    (130, 3072, True, {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4}),
    (5, 777, False, {"BLOCK_N": 2, "BLOCK_K": 256, "num_warps": 2}),
    (33, 4096, False, {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4}),
]


# (rows, n, k, bias, config): the 2..16-row tensor-core kernel; rows 2, 3, 8, 16, n not a multiple of the
# 16-row weight tile, k not a multiple of BLOCK_K, both loop paths
ROW_CASES = [
    (2, 7, 33, True, None), (3, 37, 1000, False, None), (8, 64, 2048, True, None), (16, 130, 3072, False, None),
    (5, 33, 777, True, {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}),
    # the default tiles on tests.oracle.tiny_model's shapes (q/k/v, down_proj, lm_head, o_proj and gate/up) and a
    # k of one 64-column tile: fewer K tiles than pipeline stages
    (3, 512, 256, True, None), (3, 256, 128, False, None), (8, 96, 256, False, None), (8, 256, 256, True, None),
    (2, 200, 64, True, None),
]


def _case(n, k, bias, dtype, device, seed, rows=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return [t if t is None else t.to(device) for t in (x, w, b)]


GUARD = 4096  # elements of NaN before and after every tensor of a guarded case


def _guarded(t):
    """``t`` copied into the middle of a NaN-filled buffer: ``(view, buffer)``. A kernel that reads past the view
    and uses what it read returns NaN (a read whose result is dropped, e.g. of padding rows, does not show); one
    that writes past it changes the buffer's NaN margins (checked: dropping the row mask of the store fails)."""
    if t is None:
        return None, None
    buf = torch.full((t.numel() + 2 * GUARD,), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[GUARD:GUARD + t.numel()].view(t.shape)
    view.copy_(t)
    return view, buf


def _margins_untouched(buf) -> bool:
    return bool(buf[:GUARD].isnan().all() and buf[-GUARD:].isnan().all())


def _tolerance(x, w, dtype):
    """Rounding of the output (half an ulp of the largest value) plus float32 accumulation in any order."""
    eps = torch.finfo(dtype).eps
    scale = (x.double().abs() @ w.double().abs().T).max().item()
    return scale * (eps + 64 * torch.finfo(torch.float32).eps) + 1e-6


def check_gemv(device: str = "cpu") -> int:
    """``gemv_`` within float32 accumulation + one rounding of the float64 product, every case, bf16 and fp16;
    returns the number of checks. On the CPU this needs ``TRITON_INTERPRET=1`` (set before Triton is imported)."""
    done = 0
    for dtype in (torch.bfloat16, torch.float16):
        for i, (n, k, bias, cfg) in enumerate(CASES):
            x, w, b = _case(n, k, bias, dtype, device, seed=i)
            out = torch.full((1, 1, n), float("nan"), dtype=dtype, device=device)
            gemv.gemv_(x, w, b, out, cfg)
            want = F.linear(x.double(), w.double(), None if b is None else b.double())
            # the interpreter converts float32 to bfloat16 by truncation: up to one whole ulp of the output
            tol = 2 * _tolerance(x, w, dtype) + (b.double().abs().max().item() * torch.finfo(dtype).eps if bias else 0)
            err = (out.double() - want).abs().max().item()
            assert err <= tol, (dtype, n, k, bias, cfg, err, tol)
            done += 1
        if device == "cpu" and dtype == torch.bfloat16:
            # Triton 3.x's interpreter multiplies bfloat16 tl.dot operands wrongly (errors of 1e10 on inputs of
            # size 1, float16 exact to rounding): the rows kernel's bf16 runs are checked on the GPU only
            continue
        for i, (rows, n, k, bias, cfg) in enumerate(ROW_CASES):
            # every tensor inside NaN margins: no read past the inputs that reaches the output (as NaN), no write
            # past the output
            (x, _), (w, _), (b, _) = (_guarded(t) for t in _case(n, k, bias, dtype, device, seed=100 + i, rows=rows))
            out, out_buf = _guarded(torch.zeros((rows, 1, n), dtype=dtype, device=device))
            gemv.gemv_(x, w, b, out, cfg)
            want = F.linear(x.double(), w.double(), None if b is None else b.double())
            tol = 2 * _tolerance(x, w, dtype) + (b.double().abs().max().item() * torch.finfo(dtype).eps if bias else 0)
            err = (out.double() - want).abs().max().item()
            assert err <= tol, (dtype, rows, n, k, bias, cfg, err, tol)
            assert _margins_untouched(out_buf), ("write past the output", dtype, rows, n, k, bias, cfg)
            done += 1
    return done


@needs_triton
def test_gemv_equals_float64_product_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    code = "from tests.test_gemv import check_gemv; print('ok', check_gemv())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ok {2 * len(CASES) + len(ROW_CASES)}", \
        proc.stdout + proc.stderr


def _variants_ptx(kernel, scalars: tuple, consts_of, options: dict):
    """``(dtype, has_bias, even_k, ptx)`` of ``kernel`` compiled for sm_90 (no GPU needed) in bf16/fp16, with and
    without bias, with and without column masks; the pointers and sizes (not the batch ``M``) marked divisible by
    16, as Triton specialises at launch for the models' shapes. Skips where this Triton has no ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = []
    for ty in ("bf16", "fp16"):
        for has_bias in (True, False):
            for even in (True, False):
                sig = {**{n: f"*{ty}" for n in ("x_ptr", "w_ptr", "b_ptr", "y_ptr")}, **dict.fromkeys(scalars, "i32")}
                consts = dict(HAS_BIAS=has_bias, EVEN_K=even, **consts_of())
                sig.update(dict.fromkeys(consts, "constexpr"))
                # the batch M (1..16 rows) is not a multiple of 16 in general: Triton does not specialise it so
                attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(list(sig)[:4 + len(scalars)]) if n != "M"}
                try:
                    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                                              target=GPUTarget("cuda", 90, 32), options=options)
                except RuntimeError as e:  # no ptxas / CUDA toolchain for this Triton here
                    if "ptxas" in str(e).lower():
                        pytest.skip(f"Triton cannot compile for sm_90 here: {e}")
                    raise
                out.append((ty, has_bias, even, compiled.asm["ptx"]))
    return out


@needs_triton
def test_gemv_compiles_for_sm90_with_vector_loads():
    """The kernel compiles to PTX for the H100/H200 (no GPU needed) in every variant, and with the weight's
    row stride a multiple of 16 (as Triton specialises at launch for the models' shapes) it loads 16 bytes per
    instruction: a scalar-load kernel would read the weights at a fraction of the bandwidth."""
    import re

    cfg = gemv.config_for(4096, 4096)
    tiles = {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"]}
    for ty, has_bias, even, ptx in _variants_ptx(gemv._kernel(), ("N", "K", "stride_w"), lambda: tiles,
                                                 {"num_warps": cfg["num_warps"]}):
        assert ".entry gemv_kernel" in ptx
        if even:
            loads = re.findall(r"ld\.global[\w:.]*\.v4\.b32", ptx)
            assert loads and not re.search(r"ld\.global[\w:.]*evict_first[\w:.]*\.b16", ptx), (ty, has_bias)


@needs_triton
def test_rows_kernel_compiles_for_sm90_on_tensor_cores():
    """The 2..16-row kernel compiles to PTX for sm_90 in every variant, multiplies on tensor cores (``mma`` /
    ``wgmma``) and loads the weight 16 bytes per instruction."""
    import re

    cfg = gemv.rows_config_for(4096, 4096)
    tiles = {"BLOCK_M": gemv.MAX_ROWS, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"]}
    for ty, has_bias, even, ptx in _variants_ptx(gemv._rows_kernel(), ("M", "N", "K", "stride_w"), lambda: tiles,
                                                 {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}):
        assert ".entry gemv_rows_kernel" in ptx
        assert re.search(r"\b(wgmma|mma)\.", ptx), (ty, has_bias, even)
        if even:
            # 16-byte loads: vector loads, or cp.async.cg (16-byte copies into the software pipeline)
            assert re.search(r"(ld\.global[\w:.]*\.v4|cp\.async\.cg\.shared\.global)", ptx), (ty, has_bias)


def test_rows_config_for():
    """The tiles measured best at 2/4/8 rows (gemv_bench_h200_rows.json), by weight shape."""
    tiles = lambda n, k: tuple(gemv.rows_config_for(n, k)[key] for key in ("BLOCK_N", "BLOCK_K", "num_stages"))
    assert tiles(3584, 3584) == tiles(4096, 14336) == (32, 512, 4)  # o_proj, down_proj
    assert tiles(4608, 3584) == tiles(6144, 4096) == (32, 256, 4)  # q/k/v
    assert tiles(37888, 3584) == tiles(128256, 4096) == (32, 128, 3)  # gate/up, lm_head
    assert tiles(64, 40) == (32, 64, 4)  # BLOCK_K capped at the power of two covering k


def test_config_for_covers_the_model_shapes():
    for n, k in [(6144, 4096), (4096, 4096), (4096, 14336), (4608, 3584), (3584, 18944), (5, 3), (1, 1)]:
        cfg = gemv.config_for(n, k)
        assert set(cfg) == {"BLOCK_N", "BLOCK_K", "num_warps"}
        assert cfg["BLOCK_K"] & (cfg["BLOCK_K"] - 1) == 0 and cfg["BLOCK_K"] >= 64
        assert cfg["BLOCK_N"] & (cfg["BLOCK_N"] - 1) == 0


def test_linear_falls_back_to_f_linear_off_cuda_and_above_batch_1():
    """Inputs the kernel does not take go to ``F.linear``: the CPU, two rows, float32, a transposed weight."""
    x, w, b = _case(9, 40, True, torch.float32, "cpu", seed=0)
    assert not gemv.supported(x, w, b)
    assert torch.equal(gemv.linear(x, w, b), F.linear(x, w, b))
    x2 = torch.randn(2, 1, 40)
    assert torch.equal(gemv.linear(x2, w, b), F.linear(x2, w, b))
    assert not gemv.supported(x.bfloat16(), w.bfloat16().T.contiguous().T, None)


def test_custom_op_traces_under_torch_compile():
    """``torch.ops.leank.gemv`` has a fake implementation: a compiled function calling it traces in one graph,
    and off CUDA the op returns ``F.linear``'s result."""
    op = gemv.register()
    x, w, b = _case(11, 24, True, torch.float32, "cpu", seed=1)
    fn = torch.compile(lambda x, w, b: op(x, w, b) * 2, fullgraph=True, backend="aot_eager")
    assert torch.allclose(fn(x, w, b), F.linear(x, w, b) * 2)
    assert op(x, w, None).shape == (1, 1, 11)


@pytest.mark.gpu
def test_gemv_on_cuda_and_in_a_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert check_gemv("cuda") == 2 * (len(CASES) + len(ROW_CASES))
    # model shapes with the default tiles: one row (config_for) and 3 / 8 rows (rows_config_for: q/k/v, down_proj
    # and gate/up take its three tile shapes)
    shapes = [(4608, 3584, True), (3584, 18944, False), (4096, 14336, False), (37888, 3584, False)]
    for (n, k, bias), rows in itertools.product(shapes, (1, 3, 8)):
        x, w, b = _case(n, k, bias, torch.bfloat16, "cuda", seed=n + rows, rows=rows)
        assert gemv.supported(x, w, b)
        want = F.linear(x.double(), w.double(), None if b is None else b.double())
        got = gemv.linear(x, w, b)
        cublas = F.linear(x, w, b)
        # as close to the float64 product as cuBLAS is (both round once; the sums run in other orders)
        assert (got.double() - want).abs().max() <= 1.5 * (cublas.double() - want).abs().max() + 1e-3
        out = torch.empty_like(cublas)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            gemv.gemv_(x, w, b, out)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                gemv.gemv_(x, w, b, out)
        torch.cuda.current_stream().wait_stream(stream)
        x.copy_(torch.randn_like(x))
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, gemv.linear(x, w, b))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_decode_routes_batch1_products_through_gemv(kind, monkeypatch):
    """The fused decode step sends every product (q/k/v, o_proj, gate/up, down_proj, lm_head) through
    ``gemv.linear`` at batch 1 and only there (never at batch 3), and the run equals the cuBLAS-path run. On the CPU the
    kernel itself cannot run: ``supported`` is forced and ``gemv_`` computes ``F.linear``, so this checks the
    routing (shapes, bias, residual wiring), the GPU tests the kernel."""
    from tests.oracle import sparse_keep, tiny_model, with_biases
    from tests.test_capture import _assert_same_run, _ragged, _run

    model = with_biases(tiny_model(kind))
    keep = sparse_keep(2, 4, 32)
    calls = []

    def fake_gemv(x, w, b, out, config=None):
        calls.append((tuple(w.shape), b is not None))
        return out.copy_(F.linear(x, w, b).reshape(out.shape))

    ids, am = _ragged([26], seed=3)
    monkeypatch.setattr(gemv, "ENABLED", False)
    plain, _ = _run(model, keep, ids, am, 9, capture=True)
    monkeypatch.setattr(gemv, "ENABLED", True)
    monkeypatch.setattr(gemv, "HAS_TRITON", True)
    monkeypatch.setattr(gemv, "_on_device", lambda x: x.dtype == torch.float32)  # the tiny model runs in float32
    monkeypatch.setattr(gemv, "_DTYPES", (torch.float32,))
    monkeypatch.setattr(gemv, "gemv_", fake_gemv)
    routed, runner = _run(model, keep, ids, am, 9, capture=True)
    assert runner.fused and runner.replays >= 6
    _assert_same_run(plain, routed, tol=1e-5)
    # compiled: the routing (``supported``, ``linear``) traces into one graph (a first version called
    # importlib from ``supported`` and torch.compile of the step failed on the GPU; it fell back to the
    # uncompiled step and was 0.4-0.5 ms per step slower)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled, runner = _run(model, keep, ids, am, 9, capture=True, compile_decode=True)
    assert runner.compiled_steps >= 6 and not runner._compile_failed
    _assert_same_run(plain, compiled, tol=1e-4)
    cfg = model.config
    hd, h, kvh = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    want = {(((h + 2 * kvh) * hd, cfg.hidden_size), attn.q_proj.bias is not None),
            ((cfg.hidden_size, h * hd), attn.o_proj.bias is not None),
            ((2 * cfg.intermediate_size, cfg.hidden_size), mlp.gate_proj.bias is not None),
            ((cfg.hidden_size, cfg.intermediate_size), mlp.down_proj.bias is not None),
            ((cfg.vocab_size, cfg.hidden_size), model.lm_head.bias is not None)}
    assert set(calls) == want, (set(calls), want)  # (from the compiled run's warm-up and recording)
    calls.clear()
    ids, am = _ragged([5, 26, 13], seed=3)
    monkeypatch.setattr(gemv, "ENABLED", False)
    plain3, _ = _run(model, keep, ids, am, 5, capture=True)
    monkeypatch.setattr(gemv, "ENABLED", True)
    monkeypatch.setattr(gemv, "MAX_BATCH", 2)  # --gemv-max-batch 2: batch 3 keeps F.linear
    routed3, _ = _run(model, keep, ids, am, 5, capture=True)
    assert not calls, "batch 3 uses F.linear under MAX_BATCH = 2"
    _assert_same_run(plain3, routed3, tol=0)
    monkeypatch.setattr(gemv, "MAX_BATCH", 8)  # --gemv-max-batch 8: the rows kernel for batches 2..8
    routed3, _ = _run(model, keep, ids, am, 5, capture=True)
    assert set(calls) == want, (set(calls), want)
    _assert_same_run(plain3, routed3, tol=1e-5)


def test_gemv_bench_cublas_baseline_is_f_linear():
    """The benchmark's cuBLAS side writes F.linear's product into the output (no copy of a temporary)."""
    from eval import gemv_bench

    for bias in (True, False):
        x, w, b = _case(48, 40, bias, torch.float32, "cpu", seed=7, rows=3)
        out = torch.empty(3, 48)
        assert gemv_bench._cublas(x[:, 0], w, b, out) is out
        torch.testing.assert_close(out, F.linear(x[:, 0], w, b), rtol=0, atol=1e-5)


def test_gemv_bench_dry_run_lists_the_products(capsys):
    from eval import gemv_bench

    assert gemv_bench.main(["--dry-run", "--configs", "default,4x512/4,16x256/4s3", "--rows", "1,8"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-7b qkv n=4608 k=3584 bias=True" in out and "llama3.1-8b down n=4096 k=14336" in out
    assert "gemv 4x512/4" in out and "gemv 16x256/4s3" in out and "rows 8 configs" in out
    assert gemv_bench.parse_configs("sweep", rows=4) == gemv_bench.ROW_SWEEP
    with pytest.raises(SystemExit, match="--rows"):
        gemv_bench.main(["--dry-run", "--rows", "1,17"])
    with pytest.raises(SystemExit, match="--configs"):
        gemv_bench.parse_configs("4x512")
    with pytest.raises(SystemExit, match="--products"):
        gemv_bench.main(["--dry-run", "--products", "qkv,mlp"])


ROUTED_COMPILE = """
import torch, warnings
import torch.nn.functional as F
import leank
from leank import gemv
from tests.oracle import sparse_keep, tiny_model
from tests.test_capture import _ragged, _run
calls = []
gemv.HAS_TRITON = True
gemv._DTYPES = (torch.float32,)
gemv._on_device = lambda x: x.dtype == torch.float32
gemv.gemv_ = lambda x, w, b, out, config=None: calls.append(1) or out.copy_(F.linear(x, w, b).reshape(out.shape))
assert gemv._OP is None
ids, am = _ragged([26], seed=3)
with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    out, runner = _run(tiny_model("qwen2"), sparse_keep(2, 4, 32), ids, am, 9, capture=True, compile_decode=True)
print("ok", runner.compiled_steps >= 6 and not runner._compile_failed and len(calls) > 0)
"""


def test_compiled_step_registers_the_op_before_tracing():
    """In a fresh process (the op not yet registered), the first compiled batch-1 step traces the routed
    products in one graph: the runner registers ``torch.ops.leank.gemv`` before torch.compile traces (a first
    version registered it on first use, inside the trace; on the H200 the compile failed and the uncompiled
    step was recorded instead)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", ROUTED_COMPILE], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok True"), proc.stdout[-2000:] + proc.stderr[-4000:]
