"""The decode window append (leank.append_kernel): the one-launch CUDA kernel equals the PyTorch reference.

The RoPE + append kernel (``rope_append_rows_``, the fused decode step's) is checked three ways: its
reference against an independent float64 RoPE (pairs rotated as complex numbers) and against the
models' own ``apply_rotary_pos_emb``; the Triton kernel against the reference bit for bit, in
Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, a fresh process) and compiled on CUDA.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from leank.append_kernel import (append_rows_, append_rows_reference, is_standard_rope, rope_append_rows_,
                                 rope_append_rows_reference, rope_reference)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROPE_CASES = [  # (batch, heads, kv_heads, head_dim): Qwen2.5-7B and Llama-8B per-rank shapes, GQA 7, odd sizes
    (1, 28, 4, 128), (3, 32, 8, 128), (2, 7, 1, 64), (5, 6, 3, 80), (4, 2, 2, 16),
]


def _state(b, h, w, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    win_k = torch.randn(b, h, w, d, generator=g).to(device, dtype)
    win_v = torch.randn(b, h, w, d, generator=g).to(device, dtype)
    lens = torch.randint(0, w - 3, (b,), generator=g, dtype=torch.int32).to(device)
    # the step's rows as the model produces them: [b, 1, h, d] transposed (not contiguous)
    key = torch.randn(b, 1, h, d, generator=g).to(device, dtype).transpose(1, 2)
    value = torch.randn(b, 1, h, d, generator=g).to(device, dtype).transpose(1, 2)
    return win_k, win_v, lens, key, value


def test_reference_writes_each_sequence_at_its_length():
    win_k, win_v, lens, key, value = _state(3, 2, 9, 8, torch.float32, "cpu")
    before_k, before_v, before_len = win_k.clone(), win_v.clone(), lens.clone()
    append_rows_reference(win_k, win_v, lens, key, value)
    assert torch.equal(lens, before_len + 1)
    for b in range(3):
        p = int(before_len[b])
        assert torch.equal(win_k[b, :, p], key[b, :, 0]) and torch.equal(win_v[b, :, p], value[b, :, 0])
        others = [t for t in range(9) if t != p]
        assert torch.equal(win_k[b, :, others], before_k[b, :, others])
        assert torch.equal(win_v[b, :, others], before_v[b, :, others])


def test_cpu_falls_back_to_the_reference():
    a = _state(2, 3, 7, 16, torch.float32, "cpu", seed=1)
    b = [t.clone() for t in a]
    append_rows_(*a)
    append_rows_reference(*b)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,h,d", [(1, 8, 128), (5, 4, 128), (3, 7, 64), (2, 1, 64), (9, 28, 128)])
def test_kernel_equals_reference_and_replays_in_a_graph(dtype, b, h, d):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    a = _state(b, h, 40, d, dtype, "cuda", seed=b + h + d)
    r = [t.clone() for t in a]
    from leank.append_kernel import _triton_kernel, _triton_ok

    assert _triton_kernel() is not None and _triton_ok(*a), "the Triton kernel must run here, not the reference"
    append_rows_(*a)
    append_rows_reference(*r)
    assert all(torch.equal(x, y) for x, y in zip(a, r))
    # recorded once, replayed three times: three more rows per sequence, each at the length of its replay
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            append_rows_(*a)
    # (recording executes nothing: `a` still equals `r`)
    for _ in range(3):
        graph.replay()
        append_rows_reference(*r)
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(a, r))


def _rope_state(b, h, kvh, d, dtype, device, seed=0, w=40):
    """A window with ragged lengths, and the step's q/k/v as views of one fused q/k/v product (the fused
    decode step's layout: ``[b, 1, (h + 2 kvh) d]`` split, viewed, transposed), cos/sin ``[b, 1, d]``."""
    g = torch.Generator().manual_seed(seed)
    win_k = torch.randn(b, kvh, w, d, generator=g).to(device, dtype)
    win_v = torch.randn(b, kvh, w, d, generator=g).to(device, dtype)
    lens = torch.randint(0, w - 3, (b,), generator=g, dtype=torch.int32).to(device)
    qkv = torch.randn(b, 1, (h + 2 * kvh) * d, generator=g).to(device, dtype)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k, v = (t.view(b, 1, -1, d).transpose(1, 2) for t in (q, k, v))
    angle = torch.rand(b, 1, d // 2, generator=g, dtype=torch.float64) * 1000
    emb = torch.cat((angle, angle), dim=-1)
    scale = 1.0 + torch.rand(1, generator=g, dtype=torch.float64)  # Llama 3's attention_scaling folds into cos/sin
    cos, sin = (emb.cos() * scale).to(device, dtype), (emb.sin() * scale).to(device, dtype)
    return win_k, win_v, lens, q, k, v, cos, sin


def _round(x: torch.Tensor, dtype, truncate: bool) -> torch.Tensor:
    """float32 -> dtype, to nearest even, or by dropping the low bits (Triton's interpreter converts float32
    to bfloat16 that way; compiled kernels round to nearest)."""
    if truncate and dtype == torch.bfloat16:
        return (x.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return x.to(dtype)


def check_rope_kernel(device: str = "cpu") -> int:
    """``rope_append_rows_triton`` equals the float32 reference rounded once, bit for bit (bf16, fp16: the
    products of two 16-bit numbers are exact in float32, so fused multiply-adds cannot differ), and, rounded
    to nearest as on the GPU, ``rope_append_rows_reference`` itself; every case. Returns the number of checks."""
    from leank.append_kernel import rope_append_rows_triton

    truncate = device == "cpu"  # the interpreter's bfloat16 conversion
    n = 0
    for dtype in (torch.bfloat16, torch.float16):
        for i, case in enumerate(ROPE_CASES):
            tri = _rope_state(*case, dtype, device, seed=i)
            ref = [t.clone() for t in tri]
            ref32 = [t.float() if t.is_floating_point() else t.clone() for t in tri]
            q32 = rope_append_rows_reference(*ref32)  # exact inputs: the float32 values before rounding
            q_ref = rope_append_rows_reference(*ref)
            q_tri = rope_append_rows_triton(*tri)
            assert q_tri.shape == (case[0], case[1], case[3]) and q_tri.is_contiguous()
            assert torch.equal(q_tri, _round(q32, dtype, truncate)), ("query", dtype, case)
            assert torch.equal(tri[0], _round(ref32[0], dtype, truncate)), ("window keys", dtype, case)
            assert torch.equal(tri[1], ref[1]) and torch.equal(tri[2], ref[2]), ("values, lengths", dtype, case)
            if not truncate:
                assert torch.equal(q_tri, q_ref) and torch.equal(tri[0], ref[0]), ("reference", dtype, case)
            assert torch.equal(tri[2], _rope_state(*case, dtype, device, seed=i)[2] + 1)
            n += 1
    return n


def _rope_float64(x, cos, sin):
    """RoPE as complex rotation of the pairs (x_j, x_{j + d/2}) by e^{i angle}: an independent float64 form."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    r = torch.complex(cos[..., :half].double(), sin[..., :half].double())[:, None]
    out = z * r
    return torch.cat((out.real, out.imag), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_reference_equals_complex_rotation_and_the_models_rope(dtype):
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    for case in ROPE_CASES:
        _, _, _, q, k, _, cos, sin = _rope_state(*case, dtype, "cpu")
        got = rope_reference(q[:, :, 0], cos[:, 0], sin[:, 0])
        exact = _rope_float64(q[:, :, 0], cos[:, 0], sin[:, 0])
        # one rounding of a float32 sum: within half an ulp of the dtype plus float32's error
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol * 4)
        assert (got.double() - exact).abs().max() <= (exact.to(dtype).double() - exact).abs().max() * 1.01 + 1e-6
        for module in (llama, qwen2):  # the models' own RoPE in float64 on the same inputs
            q_m, k_m = module.apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
            torch.testing.assert_close(q_m[:, :, 0], exact, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(rope_reference(k.double()[:, :, 0], cos[:, 0].double(), sin[:, 0].double()),
                                       k_m[:, :, 0], rtol=0, atol=0)


def test_standard_rope_is_recognised_and_others_are_not():
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    def interleaved(q, k, cos, sin):  # GPT-J style pairs (x_2j, x_2j+1)
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + rot(q) * s, k * c + rot(k) * s

    def partial(q, k, cos, sin):  # rotary on half the channels only
        d = q.shape[-1] // 2
        q2, k2 = llama.apply_rotary_pos_emb(q[..., :d], k[..., :d], cos[..., :d], sin[..., :d])
        return torch.cat((q2, q[..., d:]), -1), torch.cat((k2, k[..., d:]), -1)

    assert is_standard_rope(llama.apply_rotary_pos_emb) and is_standard_rope(qwen2.apply_rotary_pos_emb)
    assert not is_standard_rope(interleaved)
    assert not is_standard_rope(partial)
    assert not is_standard_rope(lambda q, k, cos, sin: (q, k))
    assert not is_standard_rope(lambda q, k: (q, k))  # another signature


def test_rope_append_reference_appends_the_rotated_key():
    win_k, win_v, lens, q, k, v, cos, sin = _rope_state(3, 4, 2, 16, torch.float32, "cpu", seed=5)
    before_k, before_len = win_k.clone(), lens.clone()
    q_out = rope_append_rows_reference(win_k, win_v, lens, q, k, v, cos, sin)
    assert torch.equal(lens, before_len + 1)
    torch.testing.assert_close(q_out.double(), _rope_float64(q[:, :, 0], cos[:, 0], sin[:, 0]), rtol=1e-5, atol=1e-5)
    k_rot = _rope_float64(k[:, :, 0], cos[:, 0], sin[:, 0])
    for b in range(3):
        p = int(before_len[b])
        torch.testing.assert_close(win_k[b, :, p].double(), k_rot[b], rtol=1e-5, atol=1e-5)
        assert torch.equal(win_v[b, :, p], v[b, :, 0])
        others = [t for t in range(win_k.shape[2]) if t != p]
        assert torch.equal(win_k[b, :, others], before_k[b, :, others])
    # on the CPU the public entry point is the reference
    a = _rope_state(2, 4, 2, 16, torch.float32, "cpu", seed=6)
    r = [t.clone() for t in a]
    assert torch.equal(rope_append_rows_(*a), rope_append_rows_reference(*r)) and torch.equal(a[0], r[0])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_rope_kernel_equals_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    code = "from tests.test_append_kernel import check_rope_kernel; print('ok', check_rope_kernel())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ok {2 * len(ROPE_CASES)}", proc.stdout + proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_rope_kernel_compiles_for_sm90():
    """The kernel compiles to PTX for the H100/H200 (no GPU needed) at every case's shape and dtype: Triton's
    interpreter runs what the compiler may reject (a first GPU run failed on names typed differently in the
    two branches, for 4 KV heads against 8-head query blocks)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from leank import append_kernel as ak

    kernel = ak._rope_kernel()
    scalars = "sq_b sq_h sk_b sk_h sv_b sv_h sc_b ss_b so_b so_h sw_b sw_h sw_t".split()
    for ty in ("bf16", "fp16"):
        for _, h, kvh, d in ROPE_CASES:
            sig = {n: f"*{ty}" for n in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "out_ptr", "wk_ptr", "wv_ptr")}
            sig.update({"len_ptr": "*i32", **dict.fromkeys(scalars, "i32")})
            consts = dict(H=h, KVH=kvh, HALF=d // 2, BLOCK_H=min(ak._pow2(h), ak._Q_HEADS), BLOCK_KV=ak._pow2(kvh),
                          BLOCK_HALF=ak._pow2(d // 2, 16))
            sig.update(dict.fromkeys(consts, "constexpr"))
            try:
                compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                          target=GPUTarget("cuda", 90, 32))
            except RuntimeError as e:  # no ptxas / CUDA toolchain for this Triton here
                if "ptxas" in str(e).lower():
                    pytest.skip(f"Triton cannot compile for sm_90 here: {e}")
                raise
            assert ".entry rope_append_kernel" in compiled.asm["ptx"], (ty, h, kvh, d)


@pytest.mark.gpu
def test_rope_kernel_equals_reference_and_replays_in_a_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from leank.append_kernel import _rope_kernel, _rope_ok

    assert _rope_kernel() is not None and _rope_ok(*_rope_state(1, 28, 4, 128, torch.bfloat16, "cuda"))
    assert check_rope_kernel("cuda") == 2 * len(ROPE_CASES)
    a = _rope_state(3, 32, 8, 128, torch.bfloat16, "cuda", seed=9)
    r = [t.clone() for t in a]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = rope_append_rows_(*a)
    for _ in range(3):  # each replay writes the next row of every sequence
        graph.replay()
        expected = rope_append_rows_reference(*r)
    torch.cuda.synchronize()
    assert torch.equal(out, expected) and all(torch.equal(x, y) for x, y in zip(a[:3], r[:3]))
