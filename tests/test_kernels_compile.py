"""CI (CPU): the decode-kernel variants of the supported model shapes compile for sm_90a.

TileLang lowers the kernels and nvcc builds them for ``sm_90a``; no GPU is used. A
representative set, about 15-40 s per variant on a 2-core CPU:

* head_dim 128: Llama-3.1-8B (32 q / 8 kv heads) and Qwen2.5-7B (28 / 4), bf16 and fp16,
  the default slot set of the published masks (kept counts 32, 64, 96 -> slots 32, 64, 96,
  128), with and without the attention-matching bias;
* head_dim 64: Llama-3.2-1B/3B-class (32 / 8) and Qwen2.5-0.5B-class (14 / 2), fp16 and
  bf16, kept counts in steps of 16 (slots 16, 32, 48, 64);
* one query head per KV head (8 / 8) at head_dim 64, kept counts 16 and 48;
* ``slow``: every kept count of head_dim 128 in steps of 16 (all 8 slots).

Every compiled split kernel, and the lowered CUDA (no nvcc) of GQA groups 1-8 at head_dim 64 and 128
with every kept count, is checked for reads of the channel indices outside their row
(``channel_reads_outside_their_row``). Skipped with a reason when tilelang or nvcc is missing.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shutil
import time

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("tilelang") is None, reason="tilelang is not installed"),
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH"),
]

SHAPES = {"llama-3.1-8b": (32, 8), "qwen2.5-7b": (28, 4), "llama-3.2-1b": (32, 8), "qwen2.5-0.5b": (14, 2),
          "mha-hd64": (8, 8)}
HEAD_DIM = {"llama-3.1-8b": 128, "qwen2.5-7b": 128, "llama-3.2-1b": 64, "qwen2.5-0.5b": 64, "mha-hd64": 64}
PUBLISHED = [32, 64, 96]  # kept counts of the published head_dim-128 masks
BF16, FP16 = torch.bfloat16, torch.float16
# (model, dtype, bias, kept counts of the layer, marks)
VARIANTS = [
    ("llama-3.1-8b", BF16, False, PUBLISHED, ()),
    ("qwen2.5-7b", FP16, True, PUBLISHED, ()),
    ("llama-3.2-1b", BF16, False, [16, 48], ()),
    ("qwen2.5-0.5b", FP16, True, [32, 64], ()),
    # one query head per KV head and a 48-channel slot: the shape whose q gather read past arch_chan
    ("mha-hd64", BF16, False, [16, 48], ()),
    ("llama-3.1-8b", FP16, True, list(range(16, 129, 16)), (pytest.mark.slow,)),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh TileLang cache, so that the test really lowers and runs nvcc."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("tilelang-cache")
    mp.setenv("TILELANG_CACHE_DIR", str(path))
    yield path
    mp.undo()


def test_default_slots():
    from leank.tilelang_kernels.decode import default_slot_dims

    assert default_slot_dims(128, [32, 64, 96]) == (32, 64, 96, 128)
    assert default_slot_dims(128, [16, 32]) == tuple(range(16, 129, 16))
    assert default_slot_dims(64, [32, 64]) == (32, 64)
    assert default_slot_dims(64, [16, 48]) == (16, 32, 48, 64)


def test_builders_refuse_what_supports_refuses():
    from leank.tilelang_kernels import decode_kernels as dk

    with pytest.raises(ValueError, match="head_dim"):
        dk.default_config(96)
    with pytest.raises(ValueError, match="head_dim"):
        dk.split_kernel(8, 2, 96, (32,), "float16", False)
    with pytest.raises(ValueError, match="head_dim"):
        dk.combine_kernel(8, 2, 256, "float16")
    with pytest.raises(ValueError, match="head_dim"):
        dk.combine_kernel_chunked(8, 2, 96, "float16")
    with pytest.raises(ValueError, match="slot_dims"):
        dk.split_kernel(8, 2, 64, (24,), "float16", False)
    with pytest.raises(ValueError, match="slot_dims"):
        dk.split_kernel(8, 2, 64, (80,), "float16", False)
    with pytest.raises(ValueError, match="num_heads"):
        dk.split_kernel(128, 1, 64, (32,), "float16", False)
    assert dk.BLOCK_H == 64
    # the query-row tile is the smallest that holds the GQA group
    assert [dk.default_config(128, g)["block_H"] for g in (1, 4, 7, 16, 17, 32, 33, 64)] == [16, 16, 16, 16, 32, 32, 64, 64]
    assert dk.default_config(64, 8)["block_H"] == 16
    with pytest.raises(ValueError, match="group: at most 64"):
        dk.default_config(128, 65)


def _py(expr: str) -> str:
    """A CUDA C integer expression of TileLang's output as Python (operands are non-negative here)."""
    expr = re.sub(r"\((?:int64_t|int|uint)\)", "", expr).replace("threadIdx.x", "tx")
    return re.sub(r"!(?!=)", " not ", expr.replace("&&", " and ").replace("||", " or ")).replace("/", "//")


def channel_reads_outside_their_row(src: str, slot_dims, threads: int = 128) -> list:
    """Reads of a slot's channel indices (``C<s>[...]``, int64 ``[heads, d]``) that can leave row ``row``.

    Each read's index is evaluated with ``row = 0`` (and ``heads_<s> = 1``) for every thread and every
    value of the constant-extent loops around it, under the enclosing ``if`` conditions that can be
    evaluated (those that depend on other values are taken as true, which only adds cases); every index
    must lie in ``[0, d)``. Returns ``(slot, index expression, worst index)`` for each read that does not.
    """
    body = src[src.index('extern "C" __global__'):]
    stack, bad = [], []  # stack entries: ("for", var, extent) | ("if", condition) | ("block",)
    for raw in body.splitlines()[1:]:
        line = raw.strip()
        for s, d in enumerate(slot_dims):
            for expr in re.findall(rf"\bC{s}\[([^\]]*)\]", line):
                loops = [(e[1], e[2]) for e in stack if e[0] == "for"]
                conds = [e[1] for e in stack if e[0] == "if"]
                worst = None
                for values in itertools.product(range(threads), *[range(n) for _, n in loops]):
                    env = {"tx": values[0], "row": 0, f"heads_{s}": 1, **{v: x for (v, _), x in zip(loops, values[1:])}}

                    def holds(c):
                        try:
                            return bool(eval(_py(c), {}, env))
                        except NameError:  # depends on other values: may hold
                            return True

                    if all(holds(c) for c in conds):
                        idx = eval(_py(expr), {}, env)
                        if not 0 <= idx < d and (worst is None or idx > worst):
                            worst = idx
                if worst is not None:
                    bad.append((s, expr, worst))
        if line.startswith("}"):
            stack.pop()
        if line.endswith("{"):
            m_for = re.match(r"for \(int (\w+) = 0; \1 < (\d+); \+\+\1\) \{$", line)
            m_if = re.match(r"if \((.*)\) \{$", line)
            stack.append(("for", m_for[1], int(m_for[2])) if m_for else ("if", m_if[1]) if m_if else ("block",))
    return bad


def _id(v):
    m, dt, bias, kept, _ = v
    return f"{m}-hd{HEAD_DIM[m]}-{str(dt)[6:]}-{'bias' if bias else 'nobias'}-{len(kept)}counts"


@pytest.mark.parametrize("model,dtype,bias,kept", [pytest.param(*v[:4], marks=v[4], id=_id(v)) for v in VARIANTS])
def test_compile_sm90a(cache_dir, model, dtype, bias, kept):
    from leank.tilelang_kernels import decode as dec

    heads, kv = SHAPES[model]
    head_dim = HEAD_DIM[model]
    slots = dec.default_slot_dims(head_dim, kept)
    dec._kernels.clear()
    t = time.time()
    split, combine = dec.get_kernels(heads, kv, head_dim, dtype, slots, bias)
    print(f"compiled {model} head_dim {head_dim} {dtype} slots {slots} bias {bias}: {time.time() - t:.1f} s")
    src = split.get_kernel_source()
    # groups of up to 16 query heads run 16-row mma.sync tiles, larger ones wgmma (SM90 TMA loads in both)
    wgmma = heads // kv > 16
    assert ("wgmma" in src) == wgmma and "mma" in src and "tma_load" in src, \
        f"expected the SM90 path ({'wgmma' if wgmma else 'mma.sync'} tiles + TMA loads)"
    assert not channel_reads_outside_their_row(src, slots), "a q gather reads arch_chan outside its row"
    csrc = combine.get_kernel_source()
    assert "combine" in csrc
    # a block per 32-channel chunk, query head and sequence
    assert "blockIdx.z" in csrc and "(n >> 2)" in csrc


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-0.5b"])
def test_compile_small_query_tile(cache_dir, model):
    """``block_H=16`` (the default for groups of up to 16 query heads): mma.sync tiles, P exchanged
    through shared memory."""
    from leank.tilelang_kernels import decode as dec

    heads, kv = SHAPES[model]
    head_dim = HEAD_DIM[model]
    dec._kernels.clear()
    split, _ = dec.get_kernels(heads, kv, head_dim, BF16, dec.default_slot_dims(head_dim, [32, 64]), False,
                               config={"block_H": 16})
    src = split.get_kernel_source()
    assert "wgmma" not in src and "mma" in src and "tma_load" in src


@pytest.mark.parametrize("model", ["qwen2.5-7b", "qwen2.5-0.5b"])
def test_compile_deeper_pipeline_and_vector_combine(cache_dir, model):
    """``--block-h 64 --num-stages 3 --combine-vector 4``: three K/V stages with a 64-row wgmma tile
    still fit two blocks per SM, and the combine reads float4 and sums parts in lanes side by side
    (4 lanes at head_dim 128, 8 at 64)."""
    from leank.tilelang_kernels import decode as dec

    heads, kv = SHAPES[model]
    head_dim = HEAD_DIM[model]
    dec._kernels.clear()
    split, combine = dec.get_kernels(heads, kv, head_dim, BF16, dec.default_slot_dims(head_dim, [32, 64]), False,
                                     config={"block_H": 64, "num_stages": 3, "combine_vector": 4})
    src = split.get_kernel_source()
    assert "wgmma" in src and "bars[(k % 3)]" in src, "expected a 3-stage TMA ring"
    # dynamic shared memory (the launch argument in the host code): q tile + 3 stages of K and V tiles,
    # 112 KiB at head_dim 128 (two blocks fit an SM's 228 KiB), 56 KiB at 64
    smem = 2 * (64 * head_dim + 3 * 64 * 2 * head_dim)
    assert smem <= 114688 and f"((int64_t){smem})" in split.get_host_source(), smem
    csrc = combine.get_kernel_source()
    lanes = 128 // (head_dim // 4)
    assert "*(float4*)(OPART" in csrc and f"for (int r = 0; r < {lanes}; ++r)" in csrc


def test_compile_128_token_tiles(cache_dir):
    """``--block-n 128``: 128-token K/V tiles in a two-stage TMA ring. The dynamic shared memory is the
    q tile, two stages of K and V tiles and P's exchange tile, plus 1 KiB: 140,288 B at head_dim 128
    with the 16-row tile, within the 227 KiB a block may take (one block per SM)."""
    from leank.tilelang_kernels import decode as dec

    dec._kernels.clear()
    split, _ = dec.get_kernels(32, 8, 128, BF16, dec.default_slot_dims(128, [32, 64]), False, config={"block_N": 128})
    smem = 2 * (16 * 128 + 2 * 128 * 2 * 128 + 16 * 128) + 1024  # + 1 KiB TileLang 0.1.15 adds (seen, not derived)
    assert f"((int64_t){smem})" in split.get_host_source() and smem <= 232448, smem
    assert "(n0 + 256)" in split.get_kernel_source(), "the refill two 128-token tiles ahead"


def test_compile_one_warp_blocks(cache_dir):
    """``--threads 32 --block-n 32``: a block is one warp, so the softmax's row max and sum are warp
    shuffles (no shared-memory workspace, which 128-thread blocks reduce through), and it takes the q
    tile, two stages of 32-token K and V tiles and 1 KiB of shared memory (no P exchange tile with one
    warp: seen, not derived), 37,888 B at head_dim 128: five blocks fit an SM."""
    from leank.tilelang_kernels import decode as dec

    dec._kernels.clear()
    slots = dec.default_slot_dims(128, [32, 64])
    split, _ = dec.get_kernels(32, 8, 128, BF16, slots, False, config={"threads": 32, "block_N": 32})
    src = split.get_kernel_source()
    assert "AllReduce" in src and "workspace" not in src and "tma_load" in src
    smem = 2 * (16 * 128 + 2 * 32 * 2 * 128) + 1024
    assert f"((int64_t){smem})" in split.get_host_source() and 5 * (smem + 1024) <= 233472, smem
    default, _ = dec.get_kernels(32, 8, 128, BF16, slots, False)
    assert "workspace" in default.get_kernel_source(), "128 threads reduce across warps through shared memory"


def test_compile_programmatic_dependent_launch(cache_dir):
    """``--pdl``: the split kernel waits for the kernel before it (``cudaGridDependencySynchronize``)
    before its first global read or TMA load, and lets the combine launch after its tiles, before the
    partial writes; the combine waits before reading anything. Without the option neither appears."""
    from leank.tilelang_kernels import decode as dec

    dec._kernels.clear()
    slots = dec.default_slot_dims(128, [32, 64])
    split, combine = dec.get_kernels(28, 4, 128, BF16, slots, False, config={"pdl": True})
    src = split.get_kernel_source()
    body = src[src.index("__global__"):]
    wait, trigger = body.index("cudaGridDependencySynchronize();"), body.index("cudaTriggerProgrammaticLaunchCompletion();")
    assert wait < body.index("TABLE[") and wait < body.index("tma_load"), "the wait must come before any read"
    assert trigger > body.rindex("tma_load") and trigger < body.index("LPART["), "trigger after the tiles, before the parts"
    csrc = combine.get_kernel_source()
    cbody = csrc[csrc.index("__global__"):]
    assert cbody.index("cudaGridDependencySynchronize();") < cbody.index("LPART[")
    plain_split, plain_combine = dec.get_kernels(28, 4, 128, BF16, slots, False)
    assert "GridDependency" not in plain_split.get_kernel_source() + plain_combine.get_kernel_source()


@pytest.mark.parametrize("head_dim,heads,kv", [(128, 28, 4), (64, 14, 2)])
def test_compile_chunked_combine(cache_dir, head_dim, heads, kv):
    """The default combine: a block per (32-channel chunk, query head, sequence), its warps over every
    fourth part, their sums meeting in shared memory. ``--no-combine-chunked`` (``combine_chunked=False``)
    builds the per-head kernel: a block per query head, whose threads below ``head_dim`` each sum one
    channel (for head_dim 64 the upper half only takes part in the reductions)."""
    from leank.tilelang_kernels import decode as dec

    dec._kernels.clear()
    slots = dec.default_slot_dims(head_dim, [head_dim // 4])
    _, combine = dec.get_kernels(heads, kv, head_dim, BF16, slots, False)
    src = combine.get_kernel_source()
    assert "blockIdx.z" in src, "a grid of (chunk, head, sequence)"
    assert "(n >> 2)" in src, "each warp takes every fourth part"
    _, per_head = dec.get_kernels(heads, kv, head_dim, BF16, slots, False, config={"combine_chunked": False})
    psrc = per_head.get_kernel_source()
    assert "blockIdx.z" not in psrc, "one block per query head"
    if head_dim < 128:
        assert f"((int)threadIdx.x) < {head_dim}" in psrc


def test_combine_kernel_is_compiled_once_for_every_slot_set(monkeypatch):
    """Layers whose kept counts differ compile their own split kernels but share one combine (it does not
    depend on the slots or β): a second ``tilelang.compile`` of it made TileLang log "Found kernel 'combine'
    in memory cache" at users (the demo on the H200). ``tilelang.compile`` is counted, not run."""
    import tilelang

    from leank.tilelang_kernels import decode as dec

    monkeypatch.setattr(dec, "_kernels", {})
    monkeypatch.setattr(dec, "_combines", {})
    compiled = []
    monkeypatch.setattr(tilelang, "compile", lambda func, **kw: compiled.append(func) or object())
    a = dec.get_kernels(28, 4, 128, BF16, dec.default_slot_dims(128, [32, 64]), False)
    b = dec.get_kernels(28, 4, 128, BF16, dec.default_slot_dims(128, [16, 32]), True)
    assert a[0] is not b[0] and a[1] is b[1] and len(compiled) == 3
    c = dec.get_kernels(28, 4, 128, FP16, dec.default_slot_dims(128, [32, 64]), False)  # another dtype: its own
    d = dec.get_kernels(28, 4, 128, BF16, dec.default_slot_dims(128, [32, 64]), False, config={"pdl": True})
    assert c[1] is not a[1] and d[1] is not a[1] and len(compiled) == 7


def test_block_h_is_checked():
    from leank.tilelang_kernels import decode_kernels as dk

    with pytest.raises(ValueError, match="block_H: expected 16, 32 or 64"):
        dk.split_kernel(32, 8, 128, (32,), "bfloat16", False, block_H=8)
    with pytest.raises(ValueError, match="at most block_H=16"):
        dk.split_kernel(64, 2, 128, (32,), "bfloat16", False, block_H=16)
    with pytest.raises(ValueError, match="combine_vector.*expected 1 or 4"):
        dk.combine_kernel(32, 8, 128, "bfloat16", vector=2)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_q_gather_reads_stay_in_their_row(head_dim, group):
    """The split kernel as TileLang lowers it to CUDA (no nvcc), for GQA groups 1-8 and every kept count
    in steps of 16: each read of a slot's channel indices (``arch_chan``, ``[heads, d]``) stays in its
    row. TileLang 0.1.15 lowered the q gather of group 1 at head_dim 64 with a read up to 767 int64s past
    the row of the 48-channel slot (an intermittent CUDA_ERROR_ILLEGAL_ADDRESS on the GPU)."""
    import tilelang
    import tvm

    from leank.tilelang_kernels import decode_kernels as dk

    slots = tuple(range(16, head_dim + 1, 16))
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    with target:
        src = tilelang.lower(dk.split_kernel(2 * group, 2, head_dim, slots, "bfloat16", False), target=target).kernel_source
    assert all(f"C{s}[" in src for s in range(len(slots))), "no channel-index read found: the check shows nothing"
    assert not channel_reads_outside_their_row(src, slots)
