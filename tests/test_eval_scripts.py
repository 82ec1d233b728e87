"""CPU smoke runs of eval/e2e_decode.py and eval/memory.py on tiny model shapes.

They check that every code path the GPU run takes (model shapes, mask mix, patch/unpatch,
step timing, JSON + config + table + plot, the memory walk and its checks) works, so GPU
time is not spent finding crashes. Timings on CPU mean nothing and are not checked.
"""

from __future__ import annotations

import json

import pytest
import torch

from eval import common, e2e_decode, memory

pytestmark = pytest.mark.skipif(common.leank_available() is not None, reason=f"leank: {common.leank_available()}")

SMALL = ["--device", "cpu", "--tiny", "--layers", "1", "--sink", "8", "--recent", "16", "--flush-every", "4",
         "--backend", "reference", "--no-progress"]


def test_e2e_decode_cpu_tiny(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    rc = e2e_decode.main([*SMALL, "--models", "qwen2.5-7b", "--lengths", "64", "--batches", "2", "--warmup", "1",
                          "--steps", "5", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert (tmp_path / "e2e.config.json").is_file()
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == set(e2e_decode.METHODS)
    for r in runs.values():
        assert r["status"] == "ok" and r["measured_steps"] == 5 and r["tokens_per_s"] > 0
    assert runs["leank"]["report"]["leank_bytes"] > 0
    counts = common.mix_counts(1, common.PUBLISHED_MIX["qwen"])  # 1 layer x 1 KV head: the most common count, 0
    assert counts == [0] and res["models"][0]["mask_v_sparsity"] == 1.0
    assert "| model" in capsys.readouterr().out


def test_step_stats_exact():
    s = e2e_decode.step_stats([1000.0, 50.0, 10.0, 20.0, 30.0, 40.0], warmup=1, batch=4)
    assert s["prefill_s"] == 1.0 and s["latency_ms_median"] == 25.0 and s["latency_ms_mean"] == 25.0
    assert s["tokens_per_s"] == pytest.approx(4 * 4 / 0.1)


def test_memory_cpu_tiny(tmp_path):
    out = tmp_path / "mem.json"
    rc = memory.main([*SMALL, "--models", "llama3.1-8b", "--lengths", "80", "--steps", "6", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and res["checks"] and all(c["ok"] for c in res["checks"])
    runs = res["runs"]["llama3.1-8b/80"]
    d = runs["dense"]["after_decode"]["measured"]
    # a DynamicCache holds exactly batch x tokens x kv_heads x head_dim fp32 values per layer for K and for V
    cfg = common.model_config("llama3.1-8b", layers=1, tiny=True)
    assert d["k_bytes"] == d["v_bytes"] == 1 * (80 + 6) * cfg.num_key_value_heads * cfg.head_dim * 4
    assert runs["leank"]["after_decode"]["report"]["leank_bytes"] > 0


def test_tensor_bytes_counts_storages_once():
    class Layer:
        def __init__(self):
            self.keys = torch.zeros(2, 3, dtype=torch.float32)
            self.values = torch.zeros(4, dtype=torch.float64)
            self.view = self.keys[0]  # same storage: not counted twice
            self.groups = [type("G", (), {})()]
            self.groups[0].keys = torch.zeros(5, dtype=torch.int8)

    b = memory.tensor_bytes(Layer())
    assert b == {"k": 24 + 5, "v": 32, "other": 0}
