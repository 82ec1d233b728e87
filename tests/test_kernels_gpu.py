"""GPU tests of the TileLang decode kernels against the float64 reference (``-m gpu``).

Every case draws fresh random data; rows past the lengths hold finite junk so masking
is exercised. Covered: head_dim 64 and 128, fp16 and bf16, awkward lengths (1, 17, 97, block+1 = 65, 4097, ...), empty
archives, all-pruned heads, every kept count in steps of 16, ragged batches 1-32, GQA
groups 1/4/7/8, the attention-matching bias, kept counts that need padding, no
recompile as the context grows, the capability errors, and the tuning experiments of
``eval/kernel_bench.py`` (``--block-h 64`` / ``32``, ``--num-stages 3``, ``--combine-vector 4``, ``--pdl``,
``--block-n 128``)
and other split plans (``MIN_SPLIT_TILES`` 0 and 64, ``BLOCKS_PER_SM`` 4 and 1, ``SPLIT_RULE`` "bytes").

Each distinct kernel variant (head shape, head_dim, dtype, slot set, bias) costs a cold
compile (~25 s); the module compiles all of them in parallel processes first (TileLang's
disk cache), so that the file runs in about two minutes on a 16-core GPU machine. The
bf16 head_dim-64 variants are also those ``eval/kernel_bench.py --head-dim 64`` needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from leank.tilelang_kernels.reference import decode_attention_reference

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("tilelang", reason="tilelang not importable")

from leank.tilelang_kernels import decode as dec  # noqa: E402

DEV = torch.device("cuda")
ROOT = Path(__file__).resolve().parents[1]
FP16, BF16 = torch.float16, torch.bfloat16
TOL = {FP16: 4e-3, BF16: 2.5e-2}  # relative L2 error of the output
BLOCK_N = 64  # the split kernel's token tile: block+1 = 65


def mix(head_dim: int) -> list:
    """Kept counts of 8 KV heads with the published proportions (0/32/64/96 of 128), scaled."""
    return [x * head_dim // 128 for x in (0, 32, 32, 32, 64, 64, 96, 0)]


def gqa_kept(head_dim: int, kv: int) -> list:
    return ([x * head_dim // 128 for x in (0, 32, 64, 96, 32, 128, 64, 96)] * 2)[:kv]


ALIGNED_32 = [64, 32]  # a head_dim-64 layer whose kept counts are multiples of 32: slots (32, 64)


def every_step(head_dim: int) -> list:
    steps = list(range(16, head_dim + 1, 16))
    return (steps * 2)[:8]  # 8 KV heads: every kept count in steps of 16 (all slots)


# ----------------------------------------------------------------------------- cases (and their kernel variants)

LENGTHS = [(1, 1), (17, 17), (97, 97), (BLOCK_N + 1, BLOCK_N + 1), (1, 0), (130, 0), (5, 4097), (1184, 20000)]
HD_DTYPES = [(128, FP16), (128, BF16), (64, FP16), (64, BF16)]
EVERY = [(128, FP16), (64, BF16)]
# (heads, kv_heads, head_dim, kept): groups of 1, 4, 7, 7, 7, 8
GQA = [(8, 8, 64, None), (32, 8, 128, None), (28, 4, 128, None), (14, 2, 64, None), (14, 2, 64, ALIGNED_32),
       (64, 8, 128, None)]
RAGGED = [(1, 128, FP16), (5, 64, BF16), (32, 128, FP16), (32, 64, BF16)]
PRUNED = [(128, FP16), (128, BF16), (64, BF16)]
BIAS = [(128, FP16), (64, BF16)]


def variant(heads, kv, head_dim, dtype, kept, bias=False):
    """The compiled kernel a case uses (as ``decode_attention`` picks it)."""
    dims = sorted({(x + 15) // 16 * 16 for x in kept if x > 0})
    return heads, kv, head_dim, str(dtype).replace("torch.", ""), dec.call_slot_dims(head_dim, dims), bias


# the kernel_bench tuning experiments (decode.TILE_CONFIG), each on the shapes of SMALL_TILE
SMALL_TILE = [(32, 8, 128, BF16), (28, 4, 128, FP16), (14, 2, 64, BF16)]
TUNING = [{"block_H": 64}, {"block_H": 32}, {"num_stages": 3}, {"combine_vector": 4}, {"pdl": True}, {"block_N": 128},
          {"threads": 32}, {"threads": 32, "block_N": 32}, {"combine_chunked": False}]
TUNED = {variant(h, kv, hd, dt, gqa_kept(hd, kv)) + (tuple(sorted(c.items())),) for h, kv, hd, dt in SMALL_TILE
         for c in TUNING}
TUNED |= {variant(28, 4, 128, BF16, gqa_kept(128, 4)) + ((("pdl", True),),)}  # the PDL graph test

VARIANTS = sorted(
    {variant(32, 8, hd, dt, mix(hd)) for hd, dt in HD_DTYPES}
    | {variant(32, 8, hd, dt, every_step(hd)) for hd, dt in EVERY}
    | {variant(h, kv, hd, BF16, kept or gqa_kept(hd, kv)) for h, kv, hd, kept in GQA}
    | {variant(32, 8, hd, dt, mix(hd)) for _, hd, dt in RAGGED}
    | {variant(32, 8, hd, dt, [0] * 8) for hd, dt in PRUNED}
    | {variant(32, 8, hd, dt, mix(hd), True) for hd, dt in BIAS}
    | {variant(32, 8, 128, FP16, [24, 8])}
    | TUNED,
    key=repr)


@pytest.fixture(scope="module", autouse=True)
def precompile():
    """Compile every variant of this file in parallel processes (one per core at most);
    the tests then load them from TileLang's disk cache. A failure here is not an error:
    the test that needs the variant compiles it itself and reports what went wrong."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]);"
            "from leank.tilelang_kernels.decode import get_kernels;"
            "h, kv, hd, dt, slots, bias, *cfg = eval(sys.argv[2]);"
            "get_kernels(h, kv, hd, getattr(torch, dt), slots, bias, config=dict(cfg[0]) if cfg else None)")
    t0 = time.time()
    todo = list(VARIANTS)
    running, failed = [], []
    width = max(1, min(len(todo), os.cpu_count() or 1))
    while todo or running:
        while todo and len(running) < width:
            v = todo.pop(0)
            log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty compile never blocks on it
            running.append((v, log, subprocess.Popen([sys.executable, "-c", code, str(ROOT), repr(v)], cwd=ROOT,
                                                     stdout=log, stderr=subprocess.STDOUT, text=True)))
        v, log, p = running.pop(0)
        try:
            p.wait(timeout=max(1.0, 600 - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.returncode != 0:
            log.seek(0)
            failed.append((v, (log.read().strip().splitlines() or ["timed out"])[-1]))
        log.close()
    print(f"precompiled {len(VARIANTS)} kernel variants in {time.time() - t0:.0f} s; failed: {failed}")


def make_case(batch, num_heads, num_kv_heads, kept, win_lens, arch_lens, dtype, *,
              head_dim=128, win_cap=None, arch_cap=None, bias=False, seed=0):
    """Random decode inputs following the contract; ``kept[h]`` = kept count of KV head h."""
    assert len(kept) == num_kv_heads and max(kept, default=0) <= head_dim
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


def _ids(pairs):
    return [f"hd{hd}-{str(dt)[6:]}" for hd, dt in pairs]


@pytest.mark.parametrize("head_dim,dtype", HD_DTYPES, ids=_ids(HD_DTYPES))
@pytest.mark.parametrize("wl,al", LENGTHS)
def test_lengths(head_dim, dtype, wl, al):
    case = make_case(2, 32, 8, mix(head_dim), [wl, max(1, wl // 2)], [al, al // 3], dtype,
                     head_dim=head_dim, seed=wl * 7 + al + head_dim)
    check(case, dtype)


@pytest.mark.parametrize("head_dim,dtype", EVERY, ids=_ids(EVERY))
def test_every_kept_count(head_dim, dtype):
    case = make_case(3, 32, 8, every_step(head_dim), [33, 1, 200], [97, 1000, 0], dtype, head_dim=head_dim, seed=3)
    check(case, dtype)


@pytest.mark.parametrize("heads,kv,head_dim,kept", GQA,
                         ids=[f"{h}q-{kv}kv-hd{hd}{'-aligned32' if k else ''}" for h, kv, hd, k in GQA])
def test_gqa(heads, kv, head_dim, kept):
    case = make_case(2, heads, kv, kept or gqa_kept(head_dim, kv), [70, 3], [300, BLOCK_N * 2 + 1], BF16,
                     head_dim=head_dim, seed=heads + kv + head_dim)
    check(case, BF16)


@pytest.mark.parametrize("config", TUNING, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in TUNING])
@pytest.mark.parametrize("heads,kv,head_dim,dtype", SMALL_TILE,
                         ids=[f"{h}q-{kv}kv-hd{hd}-{str(dt)[6:]}" for h, kv, hd, dt in SMALL_TILE])
def test_tuning_variants(monkeypatch, heads, kv, head_dim, dtype, config):
    """The kernel_bench tuning experiments (``--block-h 64``: one wgmma tile, the default before
    16-row tiles; ``--block-h 32``;
    ``--num-stages 3``; ``--combine-vector 4``; ``--pdl``; ``--block-n 128``; ``--threads 32``, one warp per
    block, with 64- and 32-token tiles; ``--no-combine-chunked``, a combine block per query head) against the
    float64 reference."""
    monkeypatch.setattr(dec, "TILE_CONFIG", config)
    for wl, al in [(1, 0), (70, 300), (BLOCK_N + 1, 4097)]:
        case = make_case(2, heads, kv, gqa_kept(head_dim, kv), [wl, max(1, wl // 2)], [al, al // 3], dtype,
                         head_dim=head_dim, seed=heads + wl + al)
        check(case, dtype)


def test_pdl_recorded_in_a_cuda_graph_replays_each_steps_lengths(monkeypatch):
    """``--pdl``: both kernels launched as programmatic dependents, recorded in a CUDA graph after a
    kernel that writes the window (as the append does in a decode step): every replay with new lengths
    and a freshly written window row 0 equals the float64 reference, so no kernel read before the one
    it depends on had finished."""
    monkeypatch.setattr(dec, "TILE_CONFIG", {"pdl": True})
    case = list(make_case(3, 28, 4, gqa_kept(128, 4), [0, 70, BLOCK_N + 1], [0, 4097, 300], BF16, seed=11))
    check(case, BF16)  # compiles and plans outside the recording
    fresh = torch.zeros_like(case[1][:, :, 0])  # [batch, kv_heads, head_dim]: this step's K, written in the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        case[1][:, :, 0].copy_(fresh)  # the kernel right before the split kernel, as the append is in a step
        g_out = dec.decode_attention(*case)
    for i, (wl, al) in enumerate([(1, 0), (33, 4000), (0, 0), (BLOCK_N + 1, 4097)]):
        case[3].copy_(torch.tensor([wl, max(0, wl - 1), wl], dtype=torch.int32))
        case[8].copy_(torch.tensor([al, al // 2, max(0, al - 7)], dtype=torch.int32))
        fresh.copy_(torch.randn(fresh.shape, generator=torch.Generator().manual_seed(i)).to(fresh))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(case[1][:, :, 0], fresh)
        ref = decode_attention_reference(*case, compute_dtype=torch.float64)
        err = (g_out.double() - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < TOL[BF16], (wl, al, float(err))


PLANNING = [("MIN_SPLIT_TILES", 0), ("MIN_SPLIT_TILES", 64), ("BLOCKS_PER_SM", 4), ("BLOCKS_PER_SM", 1),
            ("SPLIT_RULE", "bytes")]


@pytest.mark.parametrize("knob,value", PLANNING, ids=[f"{k}={v}" for k, v in PLANNING])
def test_planning_variants(monkeypatch, knob, value):
    """Other split plans than the default (no minimum split length; at most one split per 64 tiles of a
    segment; 4 or 1 blocks per SM; splits in proportion to bytes) give the same function: ragged lengths,
    an empty sequence. The plan cache is keyed by the knobs, so each variant really builds its own plan."""
    monkeypatch.setattr(dec, knob, value)
    case = make_case(3, 28, 4, gqa_kept(128, 4), [0, 70, BLOCK_N + 1], [0, 4097, 300], BF16,
                     seed=len(knob) + PLANNING.index((knob, value)))
    check(case, BF16)
    assert any(k[-3:] == (dec.SPLIT_RULE, dec.BLOCKS_PER_SM, dec.MIN_SPLIT_TILES) for k in dec._plans), \
        "no plan of this variant"


@pytest.mark.parametrize("batch,head_dim,dtype", RAGGED, ids=[f"b{b}-hd{hd}-{str(dt)[6:]}" for b, hd, dt in RAGGED])
def test_batch_ragged(batch, head_dim, dtype):
    g = torch.Generator().manual_seed(batch + head_dim)
    wl = torch.randint(0, 200, (batch,), generator=g).tolist()
    al = torch.randint(0, 3000, (batch,), generator=g).tolist()
    wl[0], al[0] = 0, 0  # one sequence with nothing at all
    case = make_case(batch, 32, 8, mix(head_dim), wl, al, dtype, head_dim=head_dim, seed=batch)
    out, lse = check(case, dtype)
    # each sequence alone gives the same result (up to split rounding)
    for i in sorted({min(1, batch - 1), batch - 1}):
        one = tuple(t[i:i + 1] for t in case[:4]) + (
            [k[i:i + 1] for k in case[4]], [v[i:i + 1] for v in case[5]], case[6], case[7], case[8][i:i + 1], None)
        o1, l1 = dec.decode_attention(*one, return_lse=True)
        assert (o1.float() - out[i:i + 1].float()).abs().max() < 2e-2
        fin = torch.isfinite(lse[i:i + 1])
        assert torch.equal(fin, torch.isfinite(l1))
        if fin.any():
            assert (l1[fin] - lse[i:i + 1][fin]).abs().max() < 1e-3


@pytest.mark.parametrize("head_dim,dtype", PRUNED, ids=_ids(PRUNED))
def test_all_heads_pruned_and_empty_archive(head_dim, dtype):
    case = make_case(2, 32, 8, [0] * 8, [40, 0], [0, 0], dtype, head_dim=head_dim, seed=11)
    out, lse = check(case, dtype)
    assert torch.isinf(lse[1]).all() and (out[1] == 0).all()


@pytest.mark.parametrize("head_dim,dtype", BIAS, ids=_ids(BIAS))
def test_arch_bias(head_dim, dtype):
    case = make_case(2, 32, 8, mix(head_dim), [50, 7], [500, 90], dtype, head_dim=head_dim, bias=True, seed=5)
    check(case, dtype)


def test_custom_scale_and_kept_not_multiple_of_16():
    case = make_case(1, 32, 8, [24, 0, 0, 0, 0, 0, 0, 8], [20], [77], FP16, seed=9)
    out = dec.decode_attention(*case, scale=0.05)
    ref = decode_attention_reference(*case, scale=0.05, compute_dtype=torch.float64)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < TOL[FP16]


@pytest.mark.parametrize("head_dim,dtype", [(128, BF16), (64, BF16)], ids=["hd128", "hd64"])
def test_no_recompile_across_lengths(monkeypatch, head_dim, dtype):
    import tilelang

    case = make_case(1, 32, 8, mix(head_dim), [100], [100], dtype, head_dim=head_dim, arch_cap=70000, win_cap=1200,
                     seed=1)
    dec.decode_attention(*case)  # compiles (or loads) once
    n_kernels = len(dec._kernels)

    def boom(*a, **k):
        raise AssertionError("recompiled")

    monkeypatch.setattr(tilelang, "compile", boom)
    for wl, al in [(1, 1), (700, 9000), (1200, 69999)]:
        c = list(case)
        c[3] = torch.tensor([wl], dtype=torch.int32, device=DEV)
        c[8] = torch.tensor([al], dtype=torch.int32, device=DEV)
        check(tuple(c), dtype)
    assert len(dec._kernels) == n_kernels


def test_bad_input_raises():
    case = list(make_case(1, 32, 8, mix(128), [4], [4], FP16))
    with pytest.raises(ValueError, match="win_k"):
        dec.decode_attention(case[0], case[1].to(BF16), *case[2:])
    as_float = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in case[:4]]
    as_float += [[t.float() for t in case[4]], [t.float() for t in case[5]]] + case[6:]
    with pytest.raises(ValueError, match=r"dtype float32 not supported \(needs float16 or bfloat16\)"):
        dec.decode_attention(*as_float)
    odd = make_case(1, 8, 2, [32, 0], [4], [4], FP16, head_dim=96)
    with pytest.raises(ValueError, match="head_dim 96 not supported"):
        dec.decode_attention(*odd)
    wide = make_case(1, 128, 1, [32], [4], [4], FP16, head_dim=64)
    with pytest.raises(ValueError, match="GQA group of 128"):
        dec.decode_attention(*wide)


def test_supports_agrees_on_this_device():
    from leank.tilelang_kernels import supports

    for hd in (64, 128):
        for dt in (FP16, BF16):
            assert supports(device=DEV, dtype=dt, head_dim=hd, num_heads=32, num_kv_heads=8,
                            kept_counts=mix(hd)) is None
