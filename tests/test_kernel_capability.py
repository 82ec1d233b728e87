"""CPU tests of ``tilelang_kernels.supports``: what the TileLang decode kernel can run.

No GPU is needed: a stand-in object with ``type == "cuda"`` plays the device, and the SM
version is faked where the test needs one.
"""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from leank.tilelang_kernels import capability, supports

HAS_TILELANG = importlib.util.find_spec("tilelang") is not None
CUDA = SimpleNamespace(type="cuda", index=None)  # a CUDA device as far as the check can tell
GOOD = dict(device=CUDA, dtype=torch.bfloat16, head_dim=128, num_heads=32, num_kv_heads=8,
            kept_counts=[0, 32, 32, 64, 96, 128, 16, 48])


@pytest.fixture
def no_cuda(monkeypatch):
    """CUDA unavailable, whatever the machine: the SM version is never queried."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda *a: pytest.fail("queried the SM version without CUDA"))


@pytest.fixture
def fake_sm(monkeypatch):
    """CUDA available with a chosen compute capability (set ``fake_sm.cap``)."""
    state = SimpleNamespace(cap=(9, 0), asked=[])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def cap(index=None):
        state.asked.append(index)
        return state.cap

    monkeypatch.setattr(torch.cuda, "get_device_capability", cap)
    capability._capability.cache_clear()
    yield state
    capability._capability.cache_clear()


def call(**over):
    return supports(**{**GOOD, **over})


def test_signature_is_keyword_only_and_exported():
    import leank.tilelang_kernels as tilelang_kernels

    assert tilelang_kernels.supports is capability.supports
    params = inspect.signature(supports).parameters
    assert list(params) == ["device", "dtype", "head_dim", "num_heads", "num_kv_heads", "kept_counts"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    with pytest.raises(TypeError):
        supports(CUDA, torch.bfloat16, 128, 32, 8, [32])  # noqa


def test_import_needs_no_tilelang():
    code = ("import sys; sys.modules['tilelang'] = None\n"
            "import torch, tilelang_kernels\n"
            "from leank.tilelang_kernels import supports\n"
            "r = supports(device=torch.device('cuda'), dtype=torch.float16, head_dim=64, num_heads=8,"
            " num_kv_heads=2, kept_counts=[16, 64])\n"
            "assert r is not None and r.startswith('tilelang not importable'), r\n"
            "print('OK', r)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK tilelang not importable" in r.stdout


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), torch.device("meta")])
def test_non_cuda_device(no_cuda, device):
    reason = call(device=device)
    assert reason is not None and reason.startswith("CUDA device required")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8])
def test_dtype(no_cuda, dtype):
    reason = call(dtype=dtype)
    name = str(dtype).replace("torch.", "")
    assert reason == f"dtype {name} not supported (needs float16 or bfloat16)"


@pytest.mark.parametrize("head_dim", [32, 80, 96, 256])
def test_head_dim(no_cuda, head_dim):
    reason = call(head_dim=head_dim, kept_counts=[16])
    assert reason == f"head_dim {head_dim} not supported (64 or 128)"


@pytest.mark.parametrize("counts,expect", [
    ([40], "kept count 40 not a multiple of 16"),
    ([16, 24, 8], "kept count 8 not a multiple of 16"),
    ([144], "kept count 144 outside 0..head_dim 128"),
    ([-16], "kept count -16 outside 0..head_dim 128"),
])
def test_kept_counts(no_cuda, counts, expect):
    assert call(kept_counts=counts) == expect


def test_kept_counts_beyond_head_dim_64(no_cuda):
    assert call(head_dim=64, kept_counts=[64, 80]) == "kept count 80 outside 0..head_dim 64"


def test_too_many_distinct_kept_counts(no_cuda, monkeypatch):
    # multiples of 16 up to 128 are exactly MAX_SLOTS values; a smaller limit must bite
    if HAS_TILELANG:
        assert call(kept_counts=list(range(16, 129, 16))) is None
    monkeypatch.setattr(capability, "MAX_SLOTS", 4)
    reason = call(kept_counts=[16, 32, 48, 64, 80])
    assert reason == "5 distinct kept counts, more than MAX_SLOTS 4"


@pytest.mark.parametrize("heads,kv,expect", [
    (30, 4, "num_heads 30 not a multiple of num_kv_heads 4"),
    (8, 0, "num_heads 8 not a multiple of num_kv_heads 0"),
    (128, 1, "GQA group of 128 query heads per KV head exceeds the kernel's block_H 64"),
])
def test_heads(no_cuda, heads, kv, expect):
    assert call(num_heads=heads, num_kv_heads=kv, kept_counts=[32] * max(kv, 1)) == expect


def test_several_reasons_are_joined(no_cuda):
    reason = call(device="cpu", dtype=torch.float32, head_dim=96, kept_counts=[40])
    parts = reason.split("; ")
    assert parts[0].startswith("CUDA device required")
    assert parts[1].startswith("dtype float32")
    assert parts[2].startswith("head_dim 96")
    assert parts[3] == "kept count 40 not a multiple of 16"


def test_nested_and_tensor_kept_counts(no_cuda):
    per_layer = torch.tensor([[0, 32, 64, 128], [16, 16, 48, 40]])
    assert call(num_heads=16, num_kv_heads=4, kept_counts=per_layer) == "kept count 40 not a multiple of 16"
    assert call(num_heads=16, num_kv_heads=4, kept_counts=[[0, 32], [16, 40]]) == "kept count 40 not a multiple of 16"


def test_bad_device_argument():
    with pytest.raises(ValueError, match="device"):
        call(device=3)


@pytest.mark.skipif(not HAS_TILELANG, reason="tilelang is not installed")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv", [(32, 8), (14, 2), (28, 4), (8, 8), (64, 1)])
def test_supported(no_cuda, head_dim, dtype, heads, kv):
    counts = [(16 * (h + 1)) % (head_dim + 16) for h in range(kv)]  # 16, 32, ... and 0
    assert call(dtype=dtype, head_dim=head_dim, num_heads=heads, num_kv_heads=kv, kept_counts=counts) is None
    assert call(device="cuda:0", dtype=dtype, head_dim=head_dim, num_heads=heads, num_kv_heads=kv,
                kept_counts=[]) is None


@pytest.mark.skipif(not HAS_TILELANG, reason="tilelang is not installed")
def test_sm_version(fake_sm):
    assert call() is None
    assert fake_sm.asked == [0]
    fake_sm.cap = (8, 0)
    capability._capability.cache_clear()
    assert call(device=torch.device("cuda", 1)) == "sm_80 not supported (kernels are built for sm_90a: H100/H200)"
    assert fake_sm.asked[-1] == 1
    fake_sm.cap = (10, 0)
    capability._capability.cache_clear()
    assert call().startswith("sm_100 not supported")


def test_sm_not_queried_when_other_reasons(fake_sm):
    assert call(dtype=torch.float32).startswith("dtype float32")
    assert fake_sm.asked == []


def test_tilelang_not_importable(no_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "tilelang", None)
    capability._tilelang_import_error.cache_clear()
    try:
        reason = call()
    finally:
        capability._tilelang_import_error.cache_clear()  # sys.modules is restored by monkeypatch
    assert reason is not None and reason.startswith("tilelang not importable (ModuleNotFoundError")


# -- decode_attention refuses unsupported calls with the same reasons (no GPU needed: the
# -- check runs before anything is compiled or launched)

def _inputs(dtype=torch.float16, head_dim=64, heads=8, kv=2, kept=(16, 40), device="cpu"):
    q = torch.randn(1, heads, head_dim).to(dtype)
    wk = torch.randn(1, kv, 8, head_dim).to(dtype)
    ak, av, ah, ac = [], [], [], []
    for h, d in enumerate(kept):
        ak.append(torch.randn(1, 1, 4, d).to(dtype))
        av.append(torch.randn(1, 1, 4, head_dim).to(dtype))
        ah.append(torch.tensor([h]))
        ac.append(torch.arange(d).unsqueeze(0))
    ln = torch.tensor([3], dtype=torch.int32)
    return (q, wk, wk.clone(), ln, ak, av, ah, ac, ln.clone())


@pytest.mark.parametrize("over,expect", [
    (dict(), "CUDA device required"),
    (dict(dtype=torch.float32), "dtype float32 not supported (needs float16 or bfloat16)"),
    (dict(head_dim=96, kept=(16, 32)), "head_dim 96 not supported (64 or 128)"),
    (dict(heads=128, kv=1, kept=(16,)), "GQA group of 128 query heads"),
])
def test_decode_attention_raises_the_reason(no_cuda, over, expect):
    from leank.tilelang_kernels.decode import decode_attention

    with pytest.raises(ValueError, match="does not support this call") as e:
        decode_attention(*_inputs(**over))
    assert expect in str(e.value)


@pytest.mark.parametrize("batch", [1, 3, 32])
def test_plan_rows_per_kv_head_are_its_parts(batch):
    """What the combine relies on: the work table holds exactly ``nparts[h]`` rows of KV head
    ``h`` (every head at least its window split), parts numbered 0..nparts-1."""
    import torch

    from leank.tilelang_kernels import decode as dec

    groups = [(32, [0, 3, 5], 9000), (64, [1], 9000), (96, [2, 6], 9000), (128, [], 0)]  # heads 4 and 7: window only
    plan = dec.build_plan(batch, 8, 128, 1184, groups, dec.default_slot_dims(128, [32, 64, 96]), torch.device("cpu"),
                          sms=132)
    table, nparts = plan.table.tolist(), plan.nparts.tolist()
    for h in range(8):
        parts = sorted(r[5] for r in table if r[2] == h)
        assert parts == list(range(nparts[h])) and nparts[h] >= 1, (h, parts)
    assert plan.num_items == len(table) == sum(nparts) and plan.num_parts == max(nparts) <= 128


def test_min_split_tiles_caps_splits_of_short_segments(monkeypatch):
    """``MIN_SPLIT_TILES`` (default 4): a segment of capacity C gets at most ceil(C / (4 * 64))
    splits; long segments keep the SM-count split; 0 turns the cap off."""
    from leank.tilelang_kernels import decode as dec

    assert dec.MIN_SPLIT_TILES == 4
    kept = [32, 64, 0, 96]
    monkeypatch.setattr(dec, "MIN_SPLIT_TILES", 0)
    base = dec.choose_splits(1, 128, 1184, kept, 132, arch_caps=[1000, 200_000, 0, 500])
    monkeypatch.setattr(dec, "MIN_SPLIT_TILES", 4)
    win, arch = dec.choose_splits(1, 128, 1184, kept, 132, arch_caps=[1000, 200_000, 0, 500])
    assert win == min(base[0], 5)  # ceil(1184 / 256)
    assert arch == [min(base[1][0], 4), base[1][1], 0, min(base[1][3], 2)]
    assert base[1][0] > 4 and base[1][3] > 2, "the SM-count split was already short: the test shows nothing"


@pytest.mark.parametrize("batch,expected", [(1, 2), (2, 2), (3, 3), (8, 3), (9, 4), (32, 4)])
def test_blocks_per_sm_rule_by_batch(batch, expected):
    """The default split budget: 2 blocks per SM at batch <= 2, 3 up to batch 8, 4 beyond (measured
    winners on the H200); an explicit ``blocks_per_sm`` overrides it. A long archive (no minimum-split
    cap), 4 KV heads and no split cap, so the budget alone decides the splits."""
    from leank.tilelang_kernels import decode as dec

    kept, caps = [32, 64, 96, 128], [1 << 20] * 4
    plans = {n: dec.choose_splits(batch, 128, 1184, kept, 132, max_split=1000, blocks_per_sm=n, arch_caps=caps)
             for n in (2, 3, 4)}
    assert len({str(p) for p in plans.values()}) == 3, "the three budgets must give three plans, or the test shows nothing"
    assert dec.choose_splits(batch, 128, 1184, kept, 132, max_split=1000, arch_caps=caps) == plans[expected]


def _block_loads(win, arch, kept, caps, head_dim=128, win_cap=1184):
    """Elements each block of one sequence reads at capacity (window rows at full width)."""
    loads = []
    for h, d in enumerate(kept):
        if arch[h]:
            loads += [caps[h] * (d + head_dim) / arch[h]] * arch[h]
        loads += [win_cap * 2 * head_dim / win] * win
    return loads


@pytest.mark.parametrize("kept", [[32, 64, 0, 96, 128, 64, 32, 0], [0, 0, 128, 0], [64, 64, 64, 64]],
                         ids=["llama-like", "one-archive-head", "uniform"])
@pytest.mark.parametrize("arch_cap", [7000, 31_700, 130_000])
@pytest.mark.parametrize("batch", [1, 8])
def test_byte_balanced_split_rule(monkeypatch, kept, arch_cap, batch):
    """``SPLIT_RULE = "bytes"``: within the block budget, the heaviest block is never heavier than under the
    default rule, and at batch 1 from 31K tokens on it is within 10% of the mean (the default rule's
    window blocks carry a fraction of an archive block); caps (``MIN_SPLIT_TILES``, ``max_split``) hold."""
    from leank.tilelang_kernels import decode as dec

    caps = [arch_cap if d else 0 for d in kept]
    budget = dec.default_blocks_per_sm(batch) * 132 // batch
    monkeypatch.setattr(dec, "SPLIT_RULE", "window")
    old = dec.choose_splits(batch, 128, 1184, kept, 132, arch_caps=caps)
    monkeypatch.setattr(dec, "SPLIT_RULE", "bytes")
    win, arch = dec.choose_splits(batch, 128, 1184, kept, 132, arch_caps=caps)
    assert win * len(kept) + sum(arch) <= budget
    assert 1 <= win <= 5 and all((a == 0) == (d == 0) for a, d in zip(arch, kept))  # 5 = ceil(1184 / (4 * 64))
    assert all(a <= min(96, -(-c // 256)) for a, c in zip(arch, caps))
    new_loads, old_loads = _block_loads(win, arch, kept, caps), _block_loads(*old, kept, caps)
    assert max(new_loads) <= max(old_loads) * 1.0001, (old, (win, arch))
    if batch == 1 and arch_cap >= 31_700 and sum(1 for d in kept if d) > 1:
        assert max(new_loads) <= 1.1 * sum(new_loads) / len(new_loads), (win, arch)
    if batch == 1 and arch_cap >= 31_700 and len(set(kept) - {0}) > 1:  # mixed kept counts: the default rule is not
        assert max(old_loads) > 1.1 * sum(old_loads) / len(old_loads), "the default rule was balanced: nothing shown"


def test_split_rule_is_validated_and_needs_capacities(monkeypatch):
    from leank.tilelang_kernels import decode as dec

    monkeypatch.setattr(dec, "SPLIT_RULE", "tiles")
    with pytest.raises(ValueError, match="SPLIT_RULE: expected one of"):
        dec.choose_splits(1, 128, 1184, [32, 64], 132, arch_caps=[1000, 1000])
    monkeypatch.setattr(dec, "SPLIT_RULE", "bytes")  # without capacities the bytes are unknown: the default rule
    by_bytes = dec.choose_splits(1, 128, 1184, [32, 64], 132)
    monkeypatch.setattr(dec, "SPLIT_RULE", "window")
    assert by_bytes == dec.choose_splits(1, 128, 1184, [32, 64], 132)
