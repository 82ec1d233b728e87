"""The Triton flush (``leank.flush_kernel``) against PyTorch indexing.

The same random window, archive groups (with and without β) and lengths go through
``flush_rows_reference`` and ``flush_rows_triton``; every tensor they write and the rollback
rows they return must be equal, bit for bit (the flush only copies). Awkward sizes: rows that
are not a multiple of the kernel's 16-row blocks, one and several flushing sequences out of a
larger batch, head_dim 64 and 128, kept counts from 16 to head_dim, a 0-channel head.
On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, in a fresh
process: it is read when the kernels are decorated); on CUDA compiled.
"""

import copy
import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [  # (batch, kv_heads, head_dim, kept per head, flushing sequences, move, recent, keep, bias)
    (1, 2, 64, [16, 64], [0], 32, 40, 4, False),
    (3, 4, 128, [32, 0, 128, 32], [0, 2], 17, 23, 17, True),
    (4, 3, 64, [48, 16, 48], [3], 5, 1, 2, False),
    (2, 8, 128, [16, 32, 48, 64, 80, 96, 112, 128], [1, 0], 32, 64, 4, True),
]


def _case(batch, kvh, d, kept, seqs, move, recent, keep, bias, seed, device, dtype, cap=80):
    """``flush_rows_reference``'s arguments: a random window and archive of ``cap`` rows, the due
    sequences' windows full."""
    g = torch.Generator().manual_seed(seed)
    sinks = [int(torch.randint(0, 6, (1,), generator=g)) for _ in seqs]
    rows = max(sinks) + move + recent + 3
    win_k = torch.randn(batch, kvh, rows, d, generator=g)
    win_v = torch.randn(batch, kvh, rows, d, generator=g)
    win_len = torch.randint(0, rows, (batch,), generator=g, dtype=torch.int32)
    for b, s in zip(seqs, sinks):
        win_len[b] = s + move + recent
    arch_len = torch.randint(0, cap - move, (batch,), generator=g, dtype=torch.int32)
    groups = []
    for dk in sorted({c for c in kept if c}):
        heads = [h for h, c in enumerate(kept) if c == dk]
        chan = torch.stack([torch.randperm(d, generator=g)[:dk].sort().values for _ in heads])
        groups.append(SimpleNamespace(
            heads=torch.tensor(heads, device=device), chan=chan.to(device),
            keys=torch.randn(batch, len(heads), cap, dk, generator=g).to(device, dtype),
            values=torch.randn(batch, len(heads), cap, d, generator=g).to(device, dtype),
            bias=torch.randn(batch, len(heads), cap, generator=g).to(device) if bias else None))
    return (win_k.to(device, dtype), win_v.to(device, dtype), win_len.to(device), arch_len.to(device), groups,
            torch.tensor(seqs, device=device), torch.tensor(sinks, device=device), move, recent, keep)


def _state(case) -> list:
    """Every tensor a flush may write."""
    win_k, win_v, win_len, arch_len, groups = case[:5]
    out = [win_k, win_v, win_len, arch_len]
    for g in groups:
        out += [g.keys, g.values] + ([g.bias] if g.bias is not None else [])
    return out


def check_all(device: str = "cpu", dtype: torch.dtype = torch.float32) -> int:
    """Run every case through both paths and assert equality; returns the number of cases."""
    from leank import flush_kernel as fk

    for n, spec in enumerate(CASES):
        ref = _case(*spec, seed=n, device=device, dtype=dtype)
        tri = copy.deepcopy(ref)
        before = [t.clone() for t in _state(ref)]
        rk, rv = fk.flush_rows_reference(*ref)
        tk, tv = fk.flush_rows_triton(*tri)
        assert torch.equal(rk, tk) and torch.equal(rv, tv), ("rollback rows", n)
        for i, (a, b) in enumerate(zip(_state(ref), _state(tri))):
            assert torch.equal(a, b), ("state tensor", n, i)
        assert any(not torch.equal(a, w) for a, w in zip(_state(ref), before)), ("the flush changed nothing", n)
    return len(CASES)


def test_triton_flush_equals_pytorch_indexing_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    code = "from tests.test_flush_kernel import check_all; print('ok', check_all())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ok {len(CASES)}", proc.stdout + proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_flush_equals_pytorch_indexing_on_cuda(dtype):
    """The compiled kernels on the GPU, bf16 and fp16, same cases and same exact equality."""
    assert check_all("cuda", dtype) == len(CASES)


def _variants(fn) -> int:
    """Compiled variants a Triton ``JITFunction`` holds (its per-device kernel caches)."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:  # Triton >= 3.2: device -> (kernel cache, ...)
        return sum(len(c[0]) for c in caches.values())
    if isinstance(getattr(fn, "cache", None), dict):
        return sum(len(c) for c in fn.cache.values())
    pytest.skip(f"this Triton ({type(fn).__name__}) keeps its compiled kernels where the test cannot count them")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flush_kernels_compile_once_for_every_batch_and_capacity():
    """A generate() call at a new batch or prompt length must not compile the flush kernels again: after a
    flush of 1 sequence of a batch of 1 with an archive of 80 rows, flushes of 8 of 8 (97 rows), 3 of 5
    (130 rows) and 2 of 3 add no compiled variant. seq/sink come from ``LeanKLayer.flush_index`` as in
    the cache (on the H200 a first flush at batch 8 after batch 1 took 716 ms: the kernels compiled anew)."""
    import leank
    from leank import flush_kernel as fk
    from leank.masks import ChannelMask

    layer = leank.LeanKCache(ChannelMask(keep=torch.ones(1, 2, 64, dtype=torch.bool), align=8),
                             leank.LeanKConfig(sink=4, recent=8, flush_every=4)).layers[0]
    layer.device = torch.device("cuda")
    kernels = fk._kernels()
    counts = None
    for batch, seqs, cap in ((1, [0], 80), (8, list(range(8)), 97), (5, [0, 2, 4], 130), (3, [1, 2], 80)):
        case = list(_case(batch, 4, 128, [32, 0, 128, 32], seqs, 17, 23, 17, True, seed=batch, device="cuda",
                          dtype=torch.bfloat16, cap=cap))
        ref = copy.deepcopy(case)
        case[5], case[6] = layer.flush_index([(b, int(s), 17) for b, s in zip(seqs, case[6].tolist())])
        assert torch.equal(fk.flush_rows_triton(*case)[0], fk.flush_rows_reference(*ref)[0])
        now = [_variants(k) for k in kernels]
        assert counts is None or now == counts, (batch, len(seqs), cap, counts, now)
        counts = now


def test_flush_kernel_is_on_by_default_and_cpu_tensors_take_the_reference(monkeypatch):
    """``ENABLED`` is True (the Triton flush on CUDA); a CPU tensor still goes through PyTorch indexing (the
    Triton path is CUDA-only outside the interpreter), and so does every device with ``ENABLED = False``."""
    from leank import flush_kernel as fk

    assert fk.ENABLED is True
    calls, tri = [], []
    monkeypatch.setattr(fk, "flush_rows_reference", lambda *a: calls.append(a) or (None, None))
    monkeypatch.setattr(fk, "flush_rows_triton", lambda *a: tri.append(a) or (None, None))
    args = (torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32), [], torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
            1, 2, 1)
    fk.flush_rows_(*args)
    assert len(calls) == 1 and not tri
    monkeypatch.setattr(fk, "_triton_ok", lambda *a: True)  # as a CUDA tensor would: the Triton path
    fk.flush_rows_(*args)
    assert len(calls) == 1 and len(tri) == 1
    monkeypatch.setattr(fk, "ENABLED", False)  # switched off: the reference, whatever the device
    fk.flush_rows_(*args)
    assert len(calls) == 2 and len(tri) == 1
