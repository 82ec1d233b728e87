"""CPU tests of eval/kernel_bench.py's options (the timing itself needs a GPU)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from eval import kernel_bench as kb


def test_device_label():
    assert kb.device_label("NVIDIA H200") == "h200"
    assert kb.device_label("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert kb.device_label("NVIDIA") == "device"


def test_default_out_is_scratch_and_names_the_device():
    out = kb.build_parser().get_default("out")
    assert "{device}" in out and "h100" not in out
    assert Path(out).parent == Path(kb.__file__).resolve().parents[1] / "runs"


@pytest.mark.parametrize("head_dim,expect", [(None, ["llama", "qwen"]), (128, ["llama", "qwen"]),
                                             (64, ["llama-1b", "qwen-0.5b"])])
def test_shapes_of_head_dim(head_dim, expect):
    shapes = kb.resolve_shapes(None, head_dim)
    assert [k for k, _ in shapes] == expect
    assert all(s["head_dim"] == (head_dim or 128) for _, s in shapes)


def test_head_dim_64_shapes():
    s = dict(kb.resolve_shapes("llama-1b,qwen-0.5b", None))
    assert (s["llama-1b"]["heads"], s["llama-1b"]["kv_heads"], s["llama-1b"]["head_dim"]) == (32, 8, 64)
    assert (s["qwen-0.5b"]["heads"], s["qwen-0.5b"]["kv_heads"], s["qwen-0.5b"]["head_dim"]) == (14, 2, 64)
    over = dict(kb.resolve_shapes("qwen", 64))["qwen"]
    assert over["head_dim"] == 64 and "head_dim 64" in over["name"]
    with pytest.raises(ValueError, match="--shapes"):
        kb.resolve_shapes("llama,nope", None)


@pytest.mark.parametrize("key", list(kb.SHAPES))
def test_default_mask_follows_the_mix(key):
    s = kb.SHAPES[key]
    keeps = kb.default_keeps(s, seed=0)
    assert keeps.shape == (s["layers"], s["kv_heads"], s["head_dim"])
    counts = Counter(keeps.sum(-1).flatten().tolist())
    mix = kb.scaled_mix(s["mix"], s["head_dim"])
    assert set(counts) <= set(mix) and all(c % 16 == 0 for c in counts)
    total = s["layers"] * s["kv_heads"]
    n = sum(mix.values())
    for d, c in mix.items():  # largest remainder: within one head of the proportion
        assert abs(counts.get(d, 0) - c * total / n) < 1
    # same kept fraction at head_dim 64 as at 128
    frac = sum(d * c for d, c in mix.items()) / (n * s["head_dim"])
    frac128 = sum(d * c for d, c in s["mix"].items()) / (n * 128)
    assert frac == pytest.approx(frac128)


def test_native_shapes_keep_the_committed_placement():
    """The H100 run's layer choice (eval/results/kernel_bench_h100.json) is reproduced."""
    for key, layers in (("llama", [18, 24, 28, 30]), ("qwen", [2, 4, 12, 24])):
        assert kb.sample_layers(kb.default_keeps(kb.SHAPES[key], 0), 4) == layers


def test_dry_run_on_cpu(capsys):
    assert kb.main(["--dry-run", "--head-dim", "64", "--small-lengths", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "Llama-3.2-1B" in out and "Qwen2.5-0.5B" in out and "head_dim 64" in out
    assert out.count("point:") == 2 * len(kb.SMALL_KV_LENS.split(","))
    assert "kv_len 1 " in out and "kv_len 256 " in out
    assert f"dry run: {2 * len(kb.SMALL_KV_LENS.split(','))} points" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_needs_gpu_without_dry_run(capsys):
    assert kb.main(["--batches", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def _row(shape, batch, kv_len, us, base):
    return dict(shape=shape, model=shape, batch=batch, kv_len=kv_len, head_dim=64, leank_us=us,
                baselines_us={"sdpa_flash": base})


def test_fixed_costs():
    rows = [_row("a", 1, 1, 9.0, 6.0), _row("a", 1, 64, 10.0, 7.0), _row("a", 1, 256, 12.0, 8.0),
            _row("a", 1, 8192, 40.0, 50.0), _row("a", 8, 1, 11.0, 6.5), _row("b", 1, 16, 7.0, 5.0)]
    fc = {(r["shape"], r["batch"]): r for r in kb.fixed_costs(rows)}
    assert set(fc) == {("a", 1), ("a", 8), ("b", 1)}
    assert fc[("a", 1)]["kv_lens"] == [1, 64, 256]  # 8192 is not a fixed-cost point
    assert fc[("a", 1)]["leank_us_median"] == 10.0 and fc[("a", 1)]["leank_us_max"] == 12.0
    assert fc[("a", 1)]["fastest_baseline_us_median"] == 7.0
    assert "| a | 1 | 64 | 10.0 | 12.0 | 7.0 |" in kb.fixed_cost_table(kb.fixed_costs(rows))
    assert kb.fixed_costs([_row("a", 1, 8192, 40.0, 50.0)]) == []


def test_tuning_flags_reach_the_kernels(monkeypatch):
    """--pdl / --block-h / --combine-vector become the tile config; --min-split-tiles 0 turns the cap off,
    leaving it out restores the kernel's default, a negative value is refused."""
    from leank.tilelang_kernels import decode as dec

    monkeypatch.setattr(dec, "MIN_SPLIT_TILES", dec.MIN_SPLIT_TILES)  # restored after the test
    monkeypatch.setattr(dec, "BLOCKS_PER_SM", dec.BLOCKS_PER_SM)
    monkeypatch.setattr(dec, "TILE_CONFIG", dec.TILE_CONFIG)
    monkeypatch.setattr(dec, "SPLIT_RULE", dec.SPLIT_RULE)
    args = kb.build_parser().parse_args(["--pdl", "--block-h", "32"])
    assert kb.tile_config(args) == {"block_H": 32, "pdl": True}
    args = kb.build_parser().parse_args(["--threads", "32", "--block-n", "32"])
    assert kb.tile_config(args) == {"block_N": 32, "threads": 32}
    assert kb.tile_config(kb.build_parser().parse_args([])) is None
    assert kb.main(["--dry-run", "--batches", "1", "--kv-lens", "8192", "--min-split-tiles", "0", "--pdl",
                    "--split-rule", "bytes"]) == 0
    assert dec.MIN_SPLIT_TILES == 0 and dec.TILE_CONFIG == {"pdl": True} and dec.SPLIT_RULE == "bytes"
    assert kb.main(["--dry-run", "--batches", "1", "--kv-lens", "8192"]) == 0
    assert dec.MIN_SPLIT_TILES == dec.DEFAULT_MIN_SPLIT_TILES and dec.TILE_CONFIG is None and dec.SPLIT_RULE == "window"
    with pytest.raises(SystemExit, match="--min-split-tiles: expected >= 0"):
        kb.main(["--dry-run", "--min-split-tiles", "-1"])


@pytest.mark.parametrize("key,kv_len,batch", [("qwen", 131072, 1), ("llama", 32768, 8), ("qwen-0.5b", 5000, 3)])
def test_layer_plan_covers_the_layer_bytes(key, kv_len, batch):
    """``layer_plan`` (recorded per timed layer, printed by --dry-run): its blocks read exactly the layer's
    K/V at this point's lengths (window at full width, archive rows at their kept width), the heaviest block
    is at least the mean, and the block count is the work table's."""
    from leank.tilelang_kernels import decode as dec

    s = kb.SHAPES[key]
    keeps = kb.default_keeps(s, 0)
    _, arch, win = kb.WINDOW.split(kv_len)
    for layer in kb.sample_layers(keeps, 4):
        p = kb.layer_plan(batch, s, kv_len, keeps[layer], 132)
        counts = keeps[layer].sum(-1).tolist()
        want = sum(win * 2 * s["head_dim"] + (arch * (c + s["head_dim"]) if c else 0) for c in counts) * 2
        assert p["mean_block_bytes"] * p["blocks"] == pytest.approx(want)
        assert p["heaviest_block_bytes"] >= p["mean_block_bytes"] and 1 <= p["max_parts"] <= 128
        assert p["blocks"] <= dec.default_blocks_per_sm(batch) * 132 // batch + 8 * s["kv_heads"]


def test_dry_run_prints_the_plan_of_each_timed_layer(capsys):
    """Qwen2.5-7B at 128K x 1: the two timed layers with two archive heads hit the 96-split cap (212 blocks
    for a budget of 264, eval/RESULTS.md); the dry run shows it without a GPU."""
    assert kb.main(["--dry-run", "--shapes", "qwen", "--kv-lens", "131072", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("blocks per sequence") == 4
    assert "layer 12: 212 blocks per sequence" in out and "layer 4: 262 blocks per sequence" in out
