"""GPU tests of the TileLang decode kernels against the float64 reference (``-m gpu``).

Every case draws fresh random data; rows past the lengths hold finite junk so masking
is exercised; outputs are poisoned before the kernel writes them.
"""

from __future__ import annotations

import pytest
import torch

from tilelang_kernels.reference import decode_attention_reference

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("tilelang", reason="tilelang not importable")

from tilelang_kernels import decode as dec  # noqa: E402

DEV = torch.device("cuda")
TOL = {torch.float16: 4e-3, torch.bfloat16: 2.5e-2}  # relative L2 error of the output
LLAMA_MIX = [0, 32, 32, 32, 64, 64, 96, 0]


def make_case(batch, num_heads, num_kv_heads, kept, win_lens, arch_lens, dtype, *,
              head_dim=128, win_cap=None, arch_cap=None, bias=False, seed=0):
    """Random decode inputs following the contract; ``kept[h]`` = kept count of KV head h."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    win_cap = win_cap or max(max(win_lens), 1) + 3
    arch_cap = arch_cap or max(max(arch_lens), 1) + 5

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype).to(DEV)

    q = rnd(batch, num_heads, head_dim)
    win_k, win_v = rnd(batch, num_kv_heads, win_cap, head_dim, s=2.0), rnd(batch, num_kv_heads, win_cap, head_dim)
    arch_k, arch_v, arch_heads, arch_chan, arch_bias = [], [], [], [], []
    for d in sorted(set(x for x in kept if x > 0)):
        heads = [h for h, x in enumerate(kept) if x == d]
        chan = torch.stack([torch.randperm(head_dim, generator=g)[:d].sort().values for _ in heads])
        arch_heads.append(torch.tensor(heads, dtype=torch.int64))
        arch_chan.append(chan.to(DEV))
        arch_k.append(rnd(batch, len(heads), arch_cap, d, s=2.0))
        arch_v.append(rnd(batch, len(heads), arch_cap, head_dim))
        if bias:
            bb = torch.randn(batch, len(heads), arch_cap, generator=g)
            bb[torch.rand(bb.shape, generator=g) < 0.1] = float("-inf")
            arch_bias.append(bb.to(DEV))
    win_len = torch.tensor(win_lens, dtype=torch.int32, device=DEV)
    arch_len = torch.tensor(arch_lens, dtype=torch.int32, device=DEV)
    return (q, win_k, win_v, win_len, arch_k, arch_v, arch_heads, arch_chan, arch_len,
            arch_bias if bias else None)


def check(case, dtype, tol=None):
    out, lse = dec.decode_attention(*case, return_lse=True)
    ref, ref_lse = decode_attention_reference(*case, return_lse=True, compute_dtype=torch.float64)
    torch.cuda.synchronize()
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "non-finite output"
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)
    assert err < (tol or TOL[dtype]), f"relative error {err:.2e}"
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse)), "LSE -inf pattern differs"
    assert (ref_lse[~fin] < 0).all() and (lse[~fin] < 0).all()
    if fin.any():
        assert (lse[fin].double() - ref_lse[fin].double()).abs().max() < 2e-3
    assert (out[~fin] == 0).all(), "empty rows must be zero"
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wl,al", [(1, 1), (17, 17), (97, 97), (65, 65), (1, 0), (130, 0), (5, 4097), (1184, 20000)])
def test_lengths(dtype, wl, al):
    case = make_case(2, 32, 8, LLAMA_MIX, [wl, max(1, wl // 2)], [al, al // 3], dtype, seed=wl * 7 + al)
    check(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_kept_count(dtype):
    kept = list(range(16, 129, 16))  # 8 KV heads, kept counts 16..128: all 8 slots
    case = make_case(3, 32, 8, kept, [33, 1, 200], [97, 1000, 0], dtype, seed=3)
    check(case, dtype)


@pytest.mark.parametrize("heads,kv", [(8, 8), (32, 8), (28, 4), (64, 8)])
def test_gqa(heads, kv):
    kept = ([0, 32, 64, 96, 16, 128, 48, 80] * 2)[:kv]
    case = make_case(2, heads, kv, kept, [70, 3], [300, 129], torch.bfloat16, seed=heads + kv)
    check(case, torch.bfloat16)


@pytest.mark.parametrize("batch", [1, 5, 32])
def test_batch_ragged(batch):
    g = torch.Generator().manual_seed(batch)
    wl = torch.randint(0, 200, (batch,), generator=g).tolist()
    al = torch.randint(0, 3000, (batch,), generator=g).tolist()
    wl[0], al[0] = 0, 0  # one sequence with nothing at all
    case = make_case(batch, 32, 8, LLAMA_MIX, wl, al, torch.float16, seed=batch)
    out, lse = check(case, torch.float16)
    # each sequence alone gives the same result (up to split rounding)
    for i in sorted({min(1, batch - 1), batch - 1}):
        one = tuple(t[i:i + 1] if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch else t
                    for t in case[:4]) + (
            [k[i:i + 1] for k in case[4]], [v[i:i + 1] for v in case[5]], case[6], case[7], case[8][i:i + 1], None)
        o1, l1 = dec.decode_attention(*one, return_lse=True)
        assert (o1.float() - out[i:i + 1].float()).abs().max() < 2e-2
        fin = torch.isfinite(lse[i:i + 1])
        assert torch.equal(fin, torch.isfinite(l1))
        if fin.any():
            assert (l1[fin] - lse[i:i + 1][fin]).abs().max() < 1e-3


def test_all_heads_pruned_and_empty_archive():
    case = make_case(2, 32, 8, [0] * 8, [40, 0], [0, 0], torch.float16, seed=11)
    check(case, torch.float16)


def test_arch_bias():
    case = make_case(2, 32, 8, LLAMA_MIX, [50, 7], [500, 90], torch.float16, bias=True, seed=5)
    check(case, torch.float16)


def test_custom_scale_and_kept_not_multiple_of_16():
    case = make_case(1, 32, 8, [24, 0, 0, 0, 0, 0, 0, 8], [20], [77], torch.float16, seed=9)
    out = dec.decode_attention(*case, scale=0.05)
    ref = decode_attention_reference(*case, scale=0.05, compute_dtype=torch.float64)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < TOL[torch.float16]


def test_no_recompile_across_lengths(monkeypatch):
    import tilelang

    case = make_case(1, 32, 8, LLAMA_MIX, [100], [100], torch.bfloat16, arch_cap=70000, win_cap=1200, seed=1)
    dec.decode_attention(*case)  # compiles (or loads) once
    n_kernels = len(dec._kernels)

    def boom(*a, **k):
        raise AssertionError("recompiled")

    monkeypatch.setattr(tilelang, "compile", boom)
    for wl, al in [(1, 1), (700, 9000), (1200, 69999)]:
        c = list(case)
        c[3] = torch.tensor([wl], dtype=torch.int32, device=DEV)
        c[8] = torch.tensor([al], dtype=torch.int32, device=DEV)
        check(tuple(c), torch.bfloat16)
    assert len(dec._kernels) == n_kernels


def test_bad_input_raises():
    case = list(make_case(1, 32, 8, LLAMA_MIX, [4], [4], torch.float16))
    with pytest.raises(ValueError, match="q"):
        dec.decode_attention(case[0].float(), *case[1:])
    with pytest.raises(ValueError, match="win_k"):
        dec.decode_attention(case[0], case[1].to(torch.bfloat16), *case[2:])
