"""The Triton flush (``leank.flush_kernel``) against PyTorch indexing, in Triton's interpreter on the CPU.

The same random window, archive groups (with and without β) and lengths go through
``flush_rows_reference`` and ``flush_rows_triton``; every tensor they write and the rollback
rows they return must be equal, bit for bit (the flush only copies). Awkward sizes: rows that
are not a multiple of the kernel's 16-row blocks, one and several flushing sequences out of a
larger batch, head_dim 64 and 128, kept counts from 16 to head_dim, a 0-channel head.
"""

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [  # (batch, kv_heads, head_dim, kept per head, flushing sequences, move, recent, keep, bias)
    (1, 2, 64, [16, 64], [0], 32, 40, 4, False),
    (3, 4, 128, [32, 0, 128, 32], [0, 2], 17, 23, 17, True),
    (4, 3, 64, [48, 16, 48], [3], 5, 1, 2, False),
    (2, 8, 128, [16, 32, 48, 64, 80, 96, 112, 128], [1, 0], 32, 64, 4, True),
]

SCRIPT = r"""
import sys, torch
from types import SimpleNamespace
from leank import flush_kernel as fk

def case(batch, kvh, d, kept, seqs, move, recent, keep, bias, seed):
    g = torch.Generator().manual_seed(seed)
    sinks = [int(torch.randint(0, 6, (1,), generator=g)) for _ in seqs]
    rows = max(sinks) + move + recent + 3
    win_k = torch.randn(batch, kvh, rows, d, generator=g)
    win_v = torch.randn(batch, kvh, rows, d, generator=g)
    win_len = torch.randint(0, rows, (batch,), generator=g, dtype=torch.int32)
    for b, s in zip(seqs, sinks):
        win_len[b] = s + move + recent
    cap = 80
    arch_len = torch.randint(0, cap - move, (batch,), generator=g, dtype=torch.int32)
    groups = []
    for dk in sorted({c for c in kept if c}):
        heads = [h for h, c in enumerate(kept) if c == dk]
        chan = torch.stack([torch.randperm(d, generator=g)[:dk].sort().values for _ in heads])
        groups.append(SimpleNamespace(heads=torch.tensor(heads), chan=chan,
                                      keys=torch.randn(batch, len(heads), cap, dk, generator=g),
                                      values=torch.randn(batch, len(heads), cap, d, generator=g),
                                      bias=torch.randn(batch, len(heads), cap, generator=g) if bias else None))
    return (win_k, win_v, win_len, arch_len, groups, torch.tensor(seqs), torch.tensor(sinks), move, recent, keep)

def state(c):
    win_k, win_v, win_len, arch_len, groups = c[:5]
    out = [win_k, win_v, win_len, arch_len]
    for gr in groups:
        out += [gr.keys, gr.values] + ([gr.bias] if gr.bias is not None else [])
    return out

import copy
cases = eval(sys.argv[1])
for n, (batch, kvh, d, kept, seqs, move, recent, keep, bias) in enumerate(cases):
    ref = case(batch, kvh, d, kept, seqs, move, recent, keep, bias, seed=n)
    tri = copy.deepcopy(ref)
    before = [t.clone() for t in state(ref)]
    rk, rv = fk.flush_rows_reference(*ref)
    tk, tv = fk.flush_rows_triton(*tri)
    assert torch.equal(rk, tk) and torch.equal(rv, tv), ("rollback rows", n)
    for i, (a, b, was) in enumerate(zip(state(ref), state(tri), before)):
        assert torch.equal(a, b), ("state tensor", n, i)
    assert any(not torch.equal(a, w) for a, w in zip(state(ref), before)), ("the flush changed nothing", n)
print("ok", len(cases))
"""


def test_triton_flush_equals_pytorch_indexing_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    # a fresh process: TRITON_INTERPRET is read when the kernels are decorated
    proc = subprocess.run([sys.executable, "-c", SCRIPT, repr(CASES)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ok {len(CASES)}", proc.stdout + proc.stderr


def test_flush_kernel_is_off_by_default_and_the_cache_flush_is_the_reference(monkeypatch):
    """``ENABLED`` is False: every device runs PyTorch indexing; enabled on a CPU tensor it still does (the
    Triton path is CUDA-only outside the interpreter)."""
    from leank import flush_kernel as fk

    assert fk.ENABLED is False
    calls = []
    monkeypatch.setattr(fk, "flush_rows_reference", lambda *a: calls.append(a) or (None, None))
    monkeypatch.setattr(fk, "ENABLED", True)
    fk.flush_rows_(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, dtype=torch.int32),
                   torch.zeros(1, dtype=torch.int32), [], torch.zeros(1, dtype=torch.long),
                   torch.zeros(1, dtype=torch.long), 1, 2, 1)
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_flush_equals_pytorch_indexing_on_cuda(dtype):
    """The compiled kernels on the GPU, bf16 and fp16, same cases and same exact equality."""
    ns = {}
    exec(SCRIPT.split("import copy\ncases = eval")[0], ns)  # the case builder and state() of the script
    from leank import flush_kernel as fk

    for n, (batch, kvh, d, kept, seqs, move, recent, keep, bias) in enumerate(CASES):
        ref = ns["case"](batch, kvh, d, kept, seqs, move, recent, keep, bias, seed=n)
        ref = _to(ref, "cuda", dtype)
        tri = copy.deepcopy(ref)
        rk, rv = fk.flush_rows_reference(*ref)
        tk, tv = fk.flush_rows_triton(*tri)
        torch.cuda.synchronize()
        assert torch.equal(rk, tk) and torch.equal(rv, tv), n
        for i, (a, b) in enumerate(zip(ns["state"](ref), ns["state"](tri))):
            assert torch.equal(a, b), (n, i)


def _to(case, device, dtype):
    """A case's tensors on ``device``; window, K and V in ``dtype`` (lengths, indices and β keep theirs)."""
    win_k, win_v, win_len, arch_len, groups, seq, sink, *rest = case
    for g in groups:
        g.heads, g.chan = g.heads.to(device), g.chan.to(device)
        g.keys, g.values = g.keys.to(device, dtype), g.values.to(device, dtype)
        g.bias = None if g.bias is None else g.bias.to(device)
    return (win_k.to(device, dtype), win_v.to(device, dtype), win_len.to(device), arch_len.to(device), groups,
            seq.to(device), sink.to(device), *rest)
