"""CPU smoke runs of eval/e2e_decode.py and eval/memory.py on tiny model shapes.

They check that every code path the GPU run takes (model shapes, mask mix, patch/unpatch,
step timing, JSON + config + table + plot, the memory walk and its checks) works, so GPU
time is not spent finding crashes. Timings on CPU mean nothing and are not checked.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from eval import common, e2e_decode, memory

pytestmark = pytest.mark.skipif(common.leank_available() is not None, reason=f"leank: {common.leank_available()}")

SMALL = ["--device", "cpu", "--tiny", "--layers", "1", "--sink", "8", "--recent", "16", "--flush-every", "4",
         "--backend", "reference", "--no-progress"]


def test_e2e_decode_cpu_tiny(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rc = e2e_decode.main([*SMALL, "--models", "qwen2.5-7b", "--lengths", "64", "--batches", "2", "--warmup", "1",
                              "--steps", "5", "--dense-prefill-chunk", "24", "--out", str(out)])
    assert rc == 0
    # every LeanK method's mask (leank-dense's all-kept one too) targets the context set of the YaRN config
    assert not [w for w in seen if "context set" in str(w.message)], [str(w.message) for w in seen]
    res = json.loads(out.read_text())
    assert (tmp_path / "e2e.config.json").is_file()
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == set(e2e_decode.METHODS)
    for r in runs.values():
        assert r["status"] == "ok" and r["measured_steps"] == 5 and r["tokens_per_s"] > 0
    assert runs["leank"]["report"]["leank_bytes"] > 0
    # 1 layer x 1 KV head gets the Qwen mix's most common count, 0: its archive is dropped
    assert res["models"][0]["mask_v_sparsity"] == 1.0 and res["models"][0]["mask_k_sparsity"] == 1.0
    assert "| model" in capsys.readouterr().out


def test_torch_config_patches_restore_without_hiding_the_entry():
    """The helper the flag test below uses: after the block, Inductor's switches read as before (a deleted entry
    would raise "does not exist" at the next torch.compile)."""
    import torch._inductor.config as inductor_config

    from tests.conftest import torch_config_patches

    before = (inductor_config.combo_kernels, inductor_config.triton.enable_pdl)
    with torch_config_patches() as set_:
        set_(inductor_config, "combo_kernels", not before[0])
        set_(inductor_config, "triton.enable_pdl", not before[1])
        inductor_config.combo_kernels = before[0]  # as e2e_decode.py's flags assign it
        assert inductor_config.triton.enable_pdl is (not before[1])
    assert (inductor_config.combo_kernels, inductor_config.triton.enable_pdl) == before


def test_e2e_decode_kernel_experiment_flags(tmp_path, monkeypatch, torch_config):
    """--split-rule / --pdl / --inductor-pdl / --inductor-combo / --no-flush-kernel / --no-rope-append / --no-gemv
    set the TileLang planner's and kernels' knobs, Inductor's PDL and combo-kernel switches and LeanK's flush, RoPE +
    append and batch-1 product kernels for the run (what a GPU A/B needs) and are recorded in the config; without them the defaults
    stay (the Triton flush and RoPE in the append on)."""
    from leank.tilelang_kernels import decode as dec

    monkeypatch.setattr(dec, "SPLIT_RULE", dec.SPLIT_RULE)  # restored after the test
    monkeypatch.setattr(dec, "TILE_CONFIG", dec.TILE_CONFIG)
    import torch._inductor.config as inductor_config

    torch_config(inductor_config, "triton.enable_pdl", inductor_config.triton.enable_pdl)  # restored after the test
    torch_config(inductor_config, "combo_kernels", inductor_config.combo_kernels)
    from leank import flush_kernel

    monkeypatch.setattr(flush_kernel, "ENABLED", flush_kernel.ENABLED)
    from leank import defer

    monkeypatch.setattr(defer, "ENABLED", defer.ENABLED)
    from leank import append_kernel

    monkeypatch.setattr(append_kernel, "FUSE_ROPE", append_kernel.FUSE_ROPE)
    from leank import gemv

    monkeypatch.setattr(gemv, "ENABLED", gemv.ENABLED)
    monkeypatch.setattr(gemv, "MAX_BATCH", gemv.MAX_BATCH)
    out = tmp_path / "e2e.json"
    base = [*SMALL, "--models", "llama3.1-8b", "--methods", "leank", "--lengths", "40", "--batches", "1",
            "--warmup", "1", "--steps", "2"]
    assert e2e_decode.main([*base, "--split-rule", "bytes", "--pdl", "--inductor-pdl", "--inductor-combo",
                            "--no-flush-kernel", "--no-defer-stop", "--no-rope-append", "--no-gemv", "--gemv-max-batch", "4",
                            "--out", str(out)]) == 0
    assert not defer.ENABLED and json.loads((tmp_path / "e2e.config.json").read_text())["config"]["defer_stop"] is False
    assert dec.SPLIT_RULE == "bytes" and dec.TILE_CONFIG == {"pdl": True} and inductor_config.triton.enable_pdl
    assert not flush_kernel.ENABLED and inductor_config.combo_kernels
    cfg = json.loads((tmp_path / "e2e.config.json").read_text())["config"]
    assert cfg["split_rule"] == "bytes" and cfg["pdl"] is True and cfg["inductor_pdl"] is True
    assert cfg["flush_kernel"] is False and cfg["rope_append"] is False and not append_kernel.FUSE_ROPE
    assert cfg["inductor_combo"] is True and cfg["gemv"] is False and not gemv.ENABLED
    assert cfg["gemv_max_batch"] == 4 and gemv.MAX_BATCH == 4
    with pytest.raises(SystemExit, match="--gemv-max-batch: expected 1..16, got 17"):
        e2e_decode.main([*base, "--gemv-max-batch", "17", "--out", str(out)])
    monkeypatch.setattr(gemv, "MAX_BATCH", 1)
    monkeypatch.setattr(dec, "SPLIT_RULE", "window")
    monkeypatch.setattr(dec, "TILE_CONFIG", None)
    inductor_config.triton.enable_pdl = False  # (restored by torch_config)
    inductor_config.combo_kernels = False
    assert e2e_decode.main([*base, "--out", str(out)]) == 0
    assert dec.SPLIT_RULE == "window" and dec.TILE_CONFIG is None
    assert flush_kernel.ENABLED and not inductor_config.triton.enable_pdl and not inductor_config.combo_kernels
    assert defer.ENABLED and append_kernel.FUSE_ROPE  # the defaults: deferred stop, RoPE in the append
    cfg = json.loads((tmp_path / "e2e.config.json").read_text())["config"]
    assert cfg["flush_kernel"] is True and cfg["rope_append"] is True and cfg["gemv"] is True and gemv.ENABLED
    assert cfg["gemv_max_batch"] == gemv.MAX_BATCH == 1  # the value the run used (set above), not None


def test_e2e_decode_second_turn_and_row_fields(tmp_path):
    out = tmp_path / "e2e.json"
    rc = e2e_decode.main([*SMALL, "--models", "llama3.1-8b", "--lengths", "40", "--batches", "1", "--warmup", "1",
                          "--steps", "3", "--methods", "leank,dense-dynamic", "--second-turn", "12",
                          "--leank-prefill-chunk", "16", "--dense-prefill-chunk", "16", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    turns = res["models"][0]["second_turn"]
    assert {t["method"] for t in turns} == {"leank", "dense-dynamic"}
    assert all(t["status"] == "ok" and t["ttft_s"] > 0 and t["followup"] == 12 for t in turns)
    # issue 13's records: one per measurement, ratio = leank_s / dense_s of this run's rows
    recs = {r["measure"]: r for r in res["multi_token"]}
    assert set(recs) == {"chunked_prefill", "second_turn"} and len(res["multi_token"]) == 2
    rows = {r["method"]: r for r in res["runs"]}
    pre = recs["chunked_prefill"]
    assert (pre["length"], pre["batch"], pre["chunk"]) == (40, 1, 16)
    assert (pre["leank_s"], pre["dense_s"]) == (rows["leank"]["prefill_s"], rows["dense-dynamic"]["prefill_s"])
    ttft = {t["method"]: t["ttft_s"] for t in turns}
    assert (recs["second_turn"]["leank_s"], recs["second_turn"]["dense_s"]) == (ttft["leank"], ttft["dense-dynamic"])
    for r in recs.values():
        assert r["ratio"] == pytest.approx(r["leank_s"] / r["dense_s"])
    # the same records gathered later from the written file (and its .config.json)
    again = tmp_path / "records.json"
    assert e2e_decode.main(["--records-from", str(out), "--out", str(again)]) == 0
    gathered = json.loads(again.read_text())["records"]
    assert [{k: r[k] for k in pre} for r in gathered if r["measure"] == "chunked_prefill"] == [pre]
    assert all(r["source"] == out.name for r in gathered) and len(gathered) == 2
    with pytest.raises(SystemExit, match="expected --out FILE"):  # never the default: it would overwrite a run
        e2e_decode.main(["--records-from", str(out)])
    with pytest.raises(SystemExit, match="other than the --records-from inputs"):
        e2e_decode.main(["--records-from", str(out), "--out", str(out)])
    for r in res["runs"]:  # the fields the issue asks for (floor needs the CUDA copy bandwidth)
        assert {"ms_per_token", "tokens_per_s", "kv_bytes", "baseline", "speedup_vs_strongest_dense"} <= set(r)
    leank_row = next(r for r in res["runs"] if r["method"] == "leank")
    dense_row = next(r for r in res["runs"] if r["method"] == "dense-dynamic")
    assert 0 < leank_row["kv_bytes"] < dense_row["kv_bytes"]
    # the LeanK row ran a short call at its batch first (--row-warmup, the default); dense rows do not
    assert leank_row["row_warmup_s"] > 0 and "row_warmup_s" not in dense_row


def test_e2e_decode_row_warmup_is_one_short_call_at_the_rows_batch(tmp_path, monkeypatch):
    """--row-warmup: before each LeanK row one generate at the row's batch on a prompt of at most
    ROW_WARMUP_TOKENS tokens with 2 x flush_every + 2 new tokens, then the row's own call;
    --no-row-warmup: the row's call only."""
    real, calls = e2e_decode.run_generate, []

    def recording(model, method, ids, new_tokens, device, chunk=0, synthetic=False):
        calls.append((method, tuple(ids.shape), new_tokens))
        return real(model, method, ids, new_tokens, device, chunk, synthetic)

    monkeypatch.setattr(e2e_decode, "run_generate", recording)
    monkeypatch.setattr(e2e_decode, "ROW_WARMUP_TOKENS", 24)
    base = [*SMALL, "--models", "llama3.1-8b", "--lengths", "40", "--batches", "2", "--warmup", "1", "--steps", "2",
            "--methods", "leank,dense-dynamic", "--no-max-batch", "--flush-every", "4"]
    assert e2e_decode.main([*base, "--out", str(tmp_path / "a.json")]) == 0
    rows = [c for c in calls if c[1][0] == 2]  # the global warm-up runs at batch 1
    assert rows == [("leank", (2, 24), 10), ("leank", (2, 40), 4), ("dense-dynamic", (2, 40), 4)]
    calls.clear()
    assert e2e_decode.main([*base, "--no-row-warmup", "--out", str(tmp_path / "b.json")]) == 0
    assert [c for c in calls if c[1][0] == 2] == [("leank", (2, 40), 4), ("dense-dynamic", (2, 40), 4)]
    assert "row_warmup_s" not in json.loads((tmp_path / "b.json").read_text())["runs"][0]


def test_chunked_prefill_records_only_for_prompts_of_several_chunks():
    """A prompt no longer than one LeanK chunk was prefilled in one shot: no ``chunked_prefill`` record for it
    (an H200 run's 1K rows with 8K chunks gave one, ratio 1.6, that measured no chunking)."""
    def row(method, length, s):
        return {"model": "m", "method": method, "length": length, "batch": 1, "status": "ok", "prefill_s": s}

    runs = [row("leank", 8192, 1.0), row("dense-dynamic", 8192, 0.5), row("leank", 8193, 2.0),
            row("dense-dynamic", 8193, 4.0)]
    recs = e2e_decode.multi_token_records(runs, [], {"leank_prefill_chunk": 8192, "dense_prefill_chunk": 8192})
    assert [(r["length"], r["ratio"]) for r in recs] == [(8193, 0.5)]
    assert e2e_decode.multi_token_records(runs, [], {"leank_prefill_chunk": 0}) == []


def test_e2e_decode_keeps_the_rows_of_a_run_cut_short(tmp_path, monkeypatch):
    """The JSON is written after every row (``complete: false``), so a run killed by its time limit keeps
    what it measured; a finished run says ``complete: true``."""
    out = tmp_path / "e2e.json"
    args = [*SMALL, "--models", "llama3.1-8b", "--lengths", "40", "--batches", "1,2", "--warmup", "1", "--steps", "2",
            "--methods", "leank,dense-dynamic", "--no-max-batch", "--out", str(out)]
    real, calls = e2e_decode.sweep_one, []

    def cut_after_three(*a, **k):
        calls.append(a[2])
        if len(calls) > 3:
            raise KeyboardInterrupt("the run's time limit")
        return real(*a, **k)

    monkeypatch.setattr(e2e_decode, "sweep_one", cut_after_three)
    with pytest.raises(KeyboardInterrupt):
        e2e_decode.main(args)
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and [(r["method"], r["batch"]) for r in partial["runs"]] == [
        ("leank", 1), ("dense-dynamic", 1), ("leank", 2)]
    assert partial["runs"][0]["baseline"] == "dense-dynamic" and (tmp_path / "e2e.config.json").is_file()
    monkeypatch.setattr(e2e_decode, "sweep_one", real)
    assert e2e_decode.main(args) == 0
    done = json.loads(out.read_text())
    assert done["complete"] is True and len(done["runs"]) == 4


def test_strongest_dense_includes_leank_dense():
    """``speedup_vs_strongest_dense`` divides by the fastest method that keeps every channel, LeanK's own
    ``leank-dense`` included when it beats transformers' static cache; rows of another batch are not mixed in."""
    def row(method, batch, tps):
        return {"model": "m", "length": 32768, "batch": batch, "method": method, "status": "ok", "tokens_per_s": tps}

    rows = [row("leank", 8, 760.0), row("leank-dense", 8, 590.0), row("dense-static", 8, 95.0),
            row("leank", 1, 158.0), row("dense-static", 1, 56.0), row("dense-dynamic", 1, 60.0)]
    e2e_decode.add_comparisons(rows)
    assert rows[0]["baseline"] == "leank-dense" and rows[0]["speedup_vs_strongest_dense"] == pytest.approx(760 / 590)
    assert rows[0]["speedup_vs_leank_dense"] == pytest.approx(760 / 590)
    assert rows[2]["speedup_vs_strongest_dense"] == pytest.approx(95 / 590)
    assert rows[3]["baseline"] == "dense-dynamic" and rows[3]["speedup_vs_strongest_dense"] == pytest.approx(158 / 60)
    assert "speedup_vs_leank_dense" not in rows[3]
    # recomputed from scratch: a faster baseline measured later replaces every derived field
    rows[3]["kv_held_bytes"], rows[5]["kv_held_bytes"] = 1.0, 2.0
    e2e_decode.add_comparisons(rows)
    assert rows[3]["kv_ratio"] == 0.5
    rows.append(row("dense-static", 1, 100.0))  # without kv_held_bytes: no ratio to it, and no stale one
    e2e_decode.add_comparisons(rows)
    assert rows[3]["baseline"] == "dense-static" and "kv_ratio" not in rows[3]


def test_static_prefill_in_chunks_equals_generates_own_static_prefill():
    """dense-static's eager chunked prefill (``static_prefill``, then ``generate`` on that cache) gives the
    tokens and logits of ``generate(cache_implementation="static")`` with a one-shot prefill; chunk sizes that
    do not divide the prompt, a prompt of one chunk, and a bad chunk size."""
    from leank.patching import cache_kwarg

    cfg = common.model_config("llama3.1-8b", layers=2, tiny=True)
    model = common.build_model(cfg, torch.device("cpu"), torch.float32, "sdpa")
    ids = torch.randint(1, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache_implementation="static", **kw)
        for chunk in (4, 7, 22, 64):
            cache = e2e_decode.static_prefill(model, ids, 5, chunk)
            assert cache.get_seq_length() == ids.shape[1] - 1
            got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{cache_kwarg(model): cache},
                                 **kw)
            assert torch.equal(got.sequences, ref.sequences), chunk
            for a, b in zip(got.logits, ref.logits):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="chunk"):
        e2e_decode.static_prefill(model, ids, 5, 0)


def test_generate_kwargs_prefill_per_method():
    """What run_generate and decode_profile pass to generate: dense-static with a chunk gets its StaticCache
    prefilled with every prompt token but the last (not generate's compiled chunked prefill); without a chunk it
    names its cache; the other methods pass the chunk to generate."""
    from leank.patching import cache_kwarg

    cfg = common.model_config("llama3.1-8b", layers=1, tiny=True)
    model = common.build_model(cfg, torch.device("cpu"), torch.float32, "sdpa")
    ids = torch.randint(1, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(5))
    kw = e2e_decode.generate_kwargs(model, "dense-static", ids, 5, 8)
    assert "cache_implementation" not in kw and "prefill_chunk_size" not in kw
    assert kw[cache_kwarg(model)].get_seq_length() == 22 and kw["max_new_tokens"] == 5
    assert e2e_decode.generate_kwargs(model, "dense-static", ids, 5, 0)["cache_implementation"] == "static"
    for method in ("dense-dynamic", "leank"):
        got = e2e_decode.generate_kwargs(model, method, ids, 5, 8)
        assert got["prefill_chunk_size"] == 8 and cache_kwarg(model) not in got


def _layer_state(cache) -> list:
    return [(layer.win_len_host, layer.arch_len_host, layer.capacity, tuple(layer.win_k.shape), layer.seen_tokens,
             [tuple(g.keys.shape) for g in layer.groups]) for layer in cache.layers]


@pytest.mark.parametrize("length,chunk", [(61, 16), (61, 61), (20, 8)])
def test_synthetic_leank_cache_is_laid_out_as_a_chunked_prefill(length, chunk):
    """``--synthetic-prefill``'s cache against the one ``generate(prefill_chunk_size=chunk)`` leaves after its
    prefill: the same window and archive lengths, capacities, buffer shapes and byte counts (allocations
    included), for a prompt past the window in several chunks, in one chunk, and one that stays in the window;
    ``generate`` then decodes on it."""
    import leank
    from leank.masks import ChannelMask
    from leank.patching import cache_kwarg, output_cache
    from tests.oracle import sparse_keep

    cfg = common.model_config("llama3.1-8b", layers=2, tiny=True)
    model = common.build_model(cfg, torch.device("cpu"), torch.float32, "sdpa")
    keep = sparse_keep(2, cfg.num_key_value_heads, cfg.head_dim, align=8, seed=3)
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AfterPrefill(StoppingCriteria):  # stop at the prefill's token: the cache as the prefill left it
        def __call__(self, input_ids, scores, **kwargs):
            return torch.ones(input_ids.shape[0], dtype=torch.bool)

    # a small initial archive, so the archive is sized by what the call reserves for its 40 new tokens
    leank.patch(model, masks=ChannelMask(keep=keep, align=8),
                config=leank.LeanKConfig(sink=4, recent=8, flush_every=4, backend="reference", initial_archive_capacity=4))
    try:
        ids = torch.randint(1, cfg.vocab_size, (3, length), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                 prefill_chunk_size=chunk, return_dict_in_generate=True, pad_token_id=0,
                                 stopping_criteria=StoppingCriteriaList([AfterPrefill()]))
        assert out.sequences.shape[1] == length + 1
        real = output_cache(out)
        fake = e2e_decode.synthetic_leank_cache(model, 3, length, 40, chunk)
        assert _layer_state(fake) == _layer_state(real)
        rep_real, rep_fake = real.memory_report(), fake.memory_report()
        for key in ("leank_bytes", "dense_bytes", "k_bytes", "v_bytes", "allocated_bytes"):
            assert rep_fake[key] == rep_real[key] > 0, key
        if length > 12:
            assert max(real.layers[0].arch_len_host) > 0, "the archive must be in use"
        kw = e2e_decode.generate_kwargs(model, "leank", ids, 6, chunk, synthetic=True)
        assert "prefill_chunk_size" not in kw and kw[cache_kwarg(model)].get_seq_length() == length - 1
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).sequences
        assert seq.shape == (3, length + 6)
        with pytest.raises(ValueError, match="fills LeanK caches and .*dense-static.* caches, got method 'dense-other'"):
            e2e_decode.generate_kwargs(model, "dense-other", ids, 6, chunk, synthetic=True)
    finally:
        leank.unpatch(model)


def test_synthetic_dynamic_cache_is_shaped_as_a_chunked_prefill():
    """dense-dynamic's synthetic cache: transformers' DynamicCache with the layers, shapes and length its own
    chunked prefill leaves, on which ``generate`` decodes without running the prompt (and without naming a cache
    implementation next to the cache)."""
    from leank.patching import cache_kwarg, output_cache

    cfg = common.model_config("llama3.1-8b", layers=2, tiny=True)
    model = common.build_model(cfg, torch.device("cpu"), torch.float32, "sdpa")
    ids = torch.randint(1, cfg.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                             prefill_chunk_size=16, return_dict_in_generate=True, pad_token_id=0,
                             cache_implementation="dynamic")
    real = output_cache(out)
    fake = e2e_decode.synthetic_dynamic_cache(model, 3, 37, 5, 16)
    assert type(fake) is type(real) and fake.get_seq_length() == real.get_seq_length() == 37
    assert [tuple(layer.keys.shape) for layer in fake.layers] == [tuple(layer.keys.shape) for layer in real.layers]
    assert [tuple(layer.values.shape) for layer in fake.layers] == [tuple(layer.values.shape) for layer in real.layers]
    kw = e2e_decode.generate_kwargs(model, "dense-dynamic", ids, 4, 16, synthetic=True)
    assert "cache_implementation" not in kw and kw[cache_kwarg(model)].get_seq_length() == 36
    with torch.no_grad():
        assert model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).sequences.shape == (3, 41)


def test_synthetic_static_cache_is_shaped_as_static_prefill():
    """dense-static's synthetic cache: a StaticCache of ``static_prefill``'s size and length (every prompt token
    but the last), its filled rows random and the rest zero as a prefill leaves them, on which ``generate``
    compiles nothing new on the CPU and decodes the same number of tokens."""
    from leank.patching import cache_kwarg

    cfg = common.model_config("llama3.1-8b", layers=2, tiny=True)
    model = common.build_model(cfg, torch.device("cpu"), torch.float32, "sdpa")
    ids = torch.randint(1, cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(2))
    real = e2e_decode.static_prefill(model, ids, 4, 16)
    fake = e2e_decode.synthetic_static_cache(model, 2, 28, 4, 16)
    assert type(fake) is type(real) and fake.get_seq_length() == real.get_seq_length() == 28
    for a, b in zip(fake.layers, real.layers):
        assert a.keys.shape == b.keys.shape and a.values.shape == b.values.shape  # [2, kv_heads, 33, head_dim]
        assert a.keys[:, :, :28].abs().sum(-1).min() > 0 and a.keys[:, :, 28:].abs().max() == 0
        assert a.values[:, :, :28].abs().sum(-1).min() > 0 and a.values[:, :, 28:].abs().max() == 0
    kw = e2e_decode.generate_kwargs(model, "dense-static", ids, 4, 16, synthetic=True)
    assert "cache_implementation" not in kw and kw[cache_kwarg(model)].get_seq_length() == 28
    with torch.no_grad():
        assert model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).sequences.shape == (2, 33)


def test_e2e_decode_synthetic_prefill_rows(tmp_path):
    out = tmp_path / "syn.json"
    args = [*SMALL, "--models", "llama3.1-8b", "--lengths", "64", "--batches", "2", "--warmup", "1", "--steps", "5",
            "--leank-prefill-chunk", "24", "--no-max-batch", "--out", str(out)]
    assert e2e_decode.main([*args, "--methods", "leank,leank-dense,dense-dynamic,dense-static",
                            "--synthetic-prefill", "--dense-prefill-chunk", "24"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert {r["method"] for r in runs} == {"leank", "leank-dense", "dense-dynamic", "dense-static"}
    assert all(r["status"] == "ok" and r["synthetic_prefill"] and r["measured_steps"] == 5 for r in runs)
    assert json.loads((tmp_path / "syn.config.json").read_text())["config"]["synthetic_prefill"] is True
    with pytest.raises(SystemExit, match="--synthetic-prefill: .* runs no --second-turn or --speculative"):
        e2e_decode.main([*args, "--methods", "leank,dense-dynamic", "--synthetic-prefill", "--second-turn", "8"])


def test_step_stats_exact():
    s = e2e_decode.step_stats([1000.0, 50.0, 10.0, 20.0, 30.0, 40.0], warmup=1, batch=4)
    assert s["prefill_s"] == 1.0 and s["latency_ms_median"] == 25.0 and s["latency_ms_mean"] == 25.0
    assert s["tokens_per_s"] == pytest.approx(4 * 4 / 0.1)
    assert s["step_ms"] == [10.0, 20.0, 30.0, 40.0] and s["latency_ms_max"] == 40.0
    # the call's decode (50 + 10 + 20 + 30 + 40 = 150 ms) against 5 steps at the 25 ms median
    assert s["warmup_step_ms"] == [50.0] and s["call_extra_ms"] == pytest.approx(25.0)


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


def _fake_search(monkeypatch, peak_of, oom_above):
    """``max_batch_search`` (40 GiB) against a fake ``run_generate``: decode peak ``peak_of(b)``, out of
    memory above ``oom_above``; returns ``(result, batches run in order)``."""
    args = e2e_decode.build_parser().parse_args(["--budget-length", "16", "--warmup", "1", "--steps", "4"])
    e2e_decode.resolve_args(args)

    class FakeOOM(Exception):
        pass

    monkeypatch.setattr(torch.cuda, "OutOfMemoryError", FakeOOM)
    calls = []

    def fake_run(model, method, ids, new_tokens, device, chunk, synthetic=False):
        b = ids.shape[0]
        calls.append(b)
        if b > oom_above:
            raise FakeOOM("out of memory")
        peak = peak_of(b)
        return {"decode_peak_gib": peak, "prefill_peak_gib": peak + 5, "peak_gib": peak + 5, "kv_held_bytes": 2**30 * b,
                "intervals_ms": [100.0] + [10.0] * (new_tokens - 1)}

    monkeypatch.setattr(e2e_decode, "run_generate", fake_run)
    cfg = common.model_config("llama3.1-8b", tiny=True)
    res = e2e_decode.max_batch_search(None, cfg, "leank", args, torch.device("cpu"), budget_gib=40.0, quiet=True)
    return res, calls


def test_max_batch_search_steps_down_from_the_prediction(monkeypatch):
    """Linear peak model -> predicted batch; over-budget and OOM answers step it down; the batch above the
    result is known not to fit (here from the way down), so nothing more runs."""
    # fixed 10 GiB + 2 GiB/seq: 15 predicted; OOM at 15; 14 measures 41 GiB > 40; 13 fits at 36
    res, calls = _fake_search(monkeypatch, lambda b: 10.0 + 2.0 * b + (3.0 if b == 14 else 0.0), oom_above=14)
    assert res["predicted_batch"] == 15 and calls == [1, 4, 15, 14, 13]
    assert res["status"] == "ok" and res["max_batch"] == 13 and res["decode_peak_gib"] == 36.0
    assert [t["batch"] for t in res["tried"]] == calls
    assert [t["decode_peak_gib"] for t in res["tried"]] == [12.0, 18.0, None, 41.0, 36.0]
    assert res["next_batch"] == {"batch": 14, "decode_peak_gib": 41.0} and res["limited_by"] == "budget"
    assert res["tokens_per_s"] == pytest.approx(13 / 0.010)


def test_max_batch_search_steps_up_until_the_next_batch_does_not_fit(monkeypatch):
    """A prediction below the real maximum (the peak grows slower than batches 1 and 4 suggest) is not
    reported as the maximum: the search runs the next batch until one does not fit."""
    # 1: 14, 4: 20 -> 2 GiB/seq + 12: 14 predicted; really 12 + 1.8 b from 5 on: 14 (37.2), 15 (39) fit, 16 (40.8) not
    res, calls = _fake_search(monkeypatch, lambda b: 12.0 + 2.0 * b if b <= 4 else 12.0 + 1.8 * b, oom_above=64)
    assert res["predicted_batch"] == 14 and calls == [1, 4, 14, 15, 16]
    assert res["max_batch"] == 15 and res["next_batch"]["batch"] == 16 and res["limited_by"] == "budget"
    assert res["next_batch"]["decode_peak_gib"] == pytest.approx(40.8)


def test_max_batch_search_when_four_sequences_run_out_of_memory(monkeypatch):
    """Batch 4 out of memory (a 70B model at 128K): batch 2 is the second probe; when 2 runs out too,
    the result is batch 1, limited by memory; when 1 does, the search says so."""
    res, calls = _fake_search(monkeypatch, lambda b: 30.0 + 4.0 * b, oom_above=2)
    assert calls == [1, 4, 2, 3] and res["per_sequence_gib"] == 4.0
    assert res["max_batch"] == 2 and res["next_batch"] == {"batch": 3, "decode_peak_gib": None}
    assert res["limited_by"] == "out of memory"
    res, calls = _fake_search(monkeypatch, lambda b: 30.0 + 4.0 * b, oom_above=1)
    assert calls == [1, 4, 2] and res["max_batch"] == 1 and res["limited_by"] == "out of memory"
    assert res["per_sequence_gib"] is None
    res, calls = _fake_search(monkeypatch, lambda b: 30.0, oom_above=0)
    assert calls == [1] and res["status"] == "OOM at batch 1"
    res, calls = _fake_search(monkeypatch, lambda b: 41.0 + b, oom_above=64)  # batch 1 over the budget
    assert calls == [1, 4] and res["status"] == "no batch fit" and "max_batch" not in res


# ----------------------------------------------------------------------------- defaults and smoke sizes
class _Parsed(Exception):
    pass


def _parser_of(module, monkeypatch):
    """The argparse parser a script's ``main`` builds (stopped before it runs anything)."""
    import argparse

    def grab(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Parsed) as e:
        module.main([])
    monkeypatch.undo()
    return e.value.args[0]


PRINT_ONLY = {"compaction_bench"}  # scripts that write nothing unless --out is given


@pytest.mark.parametrize("name", ["e2e_decode", "decode_profile", "memory", "ruler", "kernel_bench", "compaction_bench",
                                  "mask_quality", "train_tiny_model", "allreduce_latency"])
def test_default_outputs_never_touch_committed_files(name, monkeypatch):
    """Issue 11 items 8 and 11: a run without --out writes under runs/ (git-ignored), never over
    eval/results/ or the shipped model in leank/data/."""
    import importlib
    from pathlib import Path

    module = importlib.import_module(f"eval.{name}")
    out = _parser_of(module, monkeypatch).get_default("out")
    assert (out is None) == (name in PRINT_ONLY), f"{name}: default --out {out!r}"
    if out is None:
        return
    out = Path(out).resolve()
    assert out.is_relative_to(common.SCRATCH_DIR), f"{name}: default --out {out} is not under {common.SCRATCH_DIR}"
    gitignore = (common.REPO_ROOT / ".gitignore").read_text().split()
    assert "/runs/" in gitignore


def test_smoke_sizes_apply_only_to_options_left_at_default():
    args = e2e_decode.build_parser().parse_args(["--tiny", "--steps", "3"])
    e2e_decode.resolve_args(args)
    assert args.steps == 3  # set by the user: kept
    assert args.lengths == e2e_decode.TINY_SIZES["lengths"] and args.batches == e2e_decode.TINY_SIZES["batches"]
    assert args.out == str(common.SCRATCH_DIR / "e2e_decode.json")
    full = e2e_decode.build_parser().parse_args([])
    e2e_decode.resolve_args(full)
    assert full.lengths == [8192, 32768, 65536, 131072]  # no --tiny: untouched
    # a smoke run stays small: one or two lengths, batches <= 2, a few steps
    for mod in (e2e_decode, memory):
        sizes = mod.TINY_SIZES
        assert max(sizes["lengths"]) <= 256 and sizes["steps"] <= 16
    assert max(e2e_decode.TINY_SIZES["batches"]) <= 2


def test_build_mask_rope_spec():
    """--mask rope:S builds the data-free RoPE-frequency mask (it raised AttributeError before)."""
    from leank.masks import ChannelMask

    model = common.build_model(common.model_config("llama3.1-8b", tiny=True), torch.device("cpu"), torch.float32, "sdpa")
    mask = common.build_mask("rope:0.75", model, seed=0)
    assert isinstance(mask, ChannelMask) and mask.sparsity == pytest.approx(0.75) and mask.align == 32
    with pytest.raises(ValueError, match="--mask"):
        common.build_mask("rope:lots", model, seed=0)


def test_compaction_bench_tiny_smoke(tmp_path, capsys):
    """`eval/compaction_bench.py --tiny` (documented smoke mode) runs every method in seconds."""
    from eval import compaction_bench

    out = tmp_path / "cb.json"
    assert compaction_bench.main(["--tiny", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["method"], r["queries"]) for r in rows} == {("hak", "repeat"), ("hak", "repeat_rec"), ("omp", "repeat")}
    for r in rows:  # attention matching reconstructs better than keeping the same number of top keys
        assert r["context"] == 512 and r["heldout"]["am"]["out_rel"] < r["heldout"]["top_keys"]["out_rel"]


def test_decode_profile_cpu_tiny(tmp_path, capsys):
    from eval import decode_profile

    out = tmp_path / "prof.json"
    rc = decode_profile.main(["--device", "cpu", "--tiny", "--layers", "1", "--backend", "reference", "--no-progress",
                              "--methods", "leank,dense-dynamic", "--warmup", "1", "--steps", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["method"] for r in res["runs"]] == ["leank", "dense-dynamic"]
    for r in res["runs"]:
        assert r["step_ms_median"] > 0 and r["steps_traced"] >= 1
        assert all(f"{k}_ms" in r for k in decode_profile.KINDS)
    assert "| method" in capsys.readouterr().out
    assert res["defer_stop"] is True and res["rope_append"] is True  # the defaults
    from leank import append_kernel, defer

    try:
        assert decode_profile.main(["--device", "cpu", "--tiny", "--layers", "1", "--backend", "reference",
                                    "--no-progress", "--methods", "leank", "--warmup", "1", "--steps", "2",
                                    "--no-defer-stop", "--no-rope-append", "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert not defer.ENABLED and res["defer_stop"] is False
        assert not append_kernel.FUSE_ROPE and res["rope_append"] is False
    finally:
        defer.ENABLED = True
        append_kernel.FUSE_ROPE = True


def test_decode_profile_call_profile(tmp_path):
    """``--call-profile N``: a later call's decode under cProfile, from its first decode step to its end (flushes
    included: flush_every 4 in --tiny), its host step times chaining up to the decode time, and LeanK's decode
    path among the functions."""
    from eval import decode_profile

    out = tmp_path / "prof.json"
    assert decode_profile.main(["--device", "cpu", "--tiny", "--layers", "1", "--backend", "reference", "--no-progress",
                                "--methods", "leank", "--warmup", "1", "--steps", "1", "--call-profile", "9",
                                "--top", "40", "--out", str(out)]) == 0
    cp = json.loads(out.read_text())["runs"][0]["call_profile"]
    assert cp["new_tokens"] == 9 and len(cp["step_ms"]) == 9  # 8 decode steps and the loop's end
    assert cp["decode_s"] > 0 and abs(sum(cp["step_ms"]) / 1e3 - cp["decode_s"]) < 1e-6
    for key, field in (("top_self", "self_ms"), ("top_cumulative", "cum_ms")):
        values = [f[field] for f in cp[key]]
        assert len(values) == 40 and values == sorted(values, reverse=True) and values[-1] >= 0
    names = [f["function"] for f in cp["top_cumulative"]]
    assert any(n.startswith("leank/attention.py") and n.endswith("(decode_attention)") for n in names), names
    with pytest.raises(SystemExit, match="--call-profile"):
        decode_profile.main(["--device", "cpu", "--tiny", "--call-profile", "-1"])


def _torchrun2(script, *args: str):
    """``torchrun --standalone --nproc-per-node 2 script *args`` as two CPU (gloo) ranks with the repository
    importable (``PYTHONPATH``, and ``REPO`` for workers that read it); fails the test with the ranks' output
    if it exits non-zero. Returns the finished process (rank 0 and 1's stdout together)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT), "REPO": str(common.REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *args], env=env, cwd=common.REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _has_tp_api() -> bool:
    from transformers import PreTrainedModel

    return hasattr(PreTrainedModel, "prepare_distribute_model") and hasattr(PreTrainedModel, "maybe_distribute_model")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
@pytest.mark.skipif(not _has_tp_api(), reason="this transformers has no tensor-parallel prepare/maybe_distribute_model")
def test_decode_profile_tensor_parallel(tmp_path):
    """``torchrun --nproc-per-node 2 eval/decode_profile.py``: two gloo ranks shard the model; rank 0 alone
    prints and writes; rows carry tp=2, half the single-process K/V bytes (LeanK: the heavier rank's) and fewer
    weight bytes. LeanK's
    prompt is prefilled in chunks (``--leank-prefill-chunk``, what 128K x 8 needs on a GPU)."""
    args = ["--device", "cpu", "--tiny", "--layers", "1", "--backend", "reference", "--no-progress",
            "--methods", "dense-dynamic,leank", "--warmup", "1", "--steps", "2", "--leank-prefill-chunk", "40"]
    one = tmp_path / "p1.json"
    from eval import decode_profile

    assert decode_profile.main([*args, "--out", str(one)]) == 0
    two = tmp_path / "p2.json"
    proc = _torchrun2(common.REPO_ROOT / "eval" / "decode_profile.py", *args, "--out", str(two))
    assert proc.stdout.count("| method") == 1, "rank 0 alone prints the table"
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert r1["tp"] == 1 and r2["tp"] == 2 and [r["tp"] for r in r2["runs"]] == [2, 2]
    assert r2["weight_bytes"] < r1["weight_bytes"]
    for a, b in zip(r1["runs"], r2["runs"]):
        assert a["method"] == b["method"] and b["steps_traced"] == 2 and b["step_ms_median"] > 0
        if a["method"] == "dense-dynamic":  # half the heads
            assert b["kv_bytes"] * 2 == pytest.approx(a["kv_bytes"], abs=2)
        else:  # the tiny model's two KV heads keep different counts: the floor counts the heavier one
            assert a["kv_bytes"] < b["kv_bytes"] * 2 < 2 * a["kv_bytes"]


def test_slowest_rank_fraction():
    """decode_profile's TP floor: per layer the rank whose heads keep the most, in the order patch gave them."""
    from leank.mixes import LLAMA_MIX, mix_mask
    from leank.tp import balanced_order

    mask = mix_mask(32, 8, 128, mix=LLAMA_MIX, seed=0)
    mean = e2e_decode.kv_fraction("leank", mask)
    assert e2e_decode.slowest_rank_fraction("leank", mask, 1) == mean
    assert e2e_decode.slowest_rank_fraction("leank-dense", mask, 2) == 1.0
    contiguous = e2e_decode.slowest_rank_fraction("leank", mask, 2)
    balanced = e2e_decode.slowest_rank_fraction("leank", mask, 2, balanced_order(mask, 2))
    # seed 0: rank channel sums 17,920 / 19,072, the heavier per layer 20,800, balanced 19,264 (of 2 x 32 x 4 x 128)
    assert contiguous == pytest.approx(20800 / 32768) and balanced == pytest.approx(19264 / 32768)
    assert mean == pytest.approx((17920 + 19072) / 65536) and mean < balanced < contiguous


def test_decode_profile_kernel_kinds_and_busy_time():
    from eval.decode_profile import busy_union, kernel_kind

    names = {  # kernels seen in the H200 profile of a compiled LeanK decode step
        "nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT": "gemm",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "gemm",
        "split_kernel": "attention",
        "combine_kernel": "attention",
        "triton_poi_fused__unsafe_view_mul_silu_5": "triton",
        "void at::native::index_elementwise_kernel<128, 4>": "norm-elementwise",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>>>":
            "norm-elementwise",
        "Memcpy DtoD (Device -> Device)": "copy",
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>": "attention",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "comm",  # TP all-reduce
        # LeanKConfig.tp_allreduce="one_shot" (a name of PyTorch's kernel template, not yet seen in a profile)
        "void c10d::symmetric_memory::one_shot_all_reduce_kernel<c10::BFloat16, 16, 2>(c10::BFloat16**)": "comm",
    }
    for name, kind in names.items():
        assert kernel_kind(name) == kind, name
    assert busy_union([(0, 2), (1, 3), (5, 6)]) == 4
    assert busy_union([]) == 0


def test_e2e_decode_speculative_rows(tmp_path):
    """--speculative: prompt lookup vs plain greedy for dense and LeanK; speculation changes no token."""
    out = tmp_path / "e2e.json"
    rc = e2e_decode.main([*SMALL, "--models", "llama3.1-8b", "--lengths", "48", "--batches", "1", "--warmup", "1",
                          "--steps", "2", "--methods", "leank,dense-dynamic", "--speculative", "3",
                          "--speculative-tokens", "12", "--out", str(out)])
    assert rc == 0
    specs = json.loads(out.read_text())["models"][0]["speculative"]
    assert {s["method"] for s in specs} == {"leank", "dense-dynamic"}
    for s in specs:
        assert s["status"] == "ok" and s["lookup"] == 3 and s["new_tokens"] == 12
        assert s["plain_tokens_per_s"] > 0 and s["speculative_tokens_per_s"] > 0
        assert s["same_tokens"], s
    ids = e2e_decode.repetitive_prompt(1000, 10, 4, seed=0)
    assert ids.shape == (1, 10) and torch.equal(ids[0, :4], ids[0, 4:8])
    with pytest.raises(SystemExit, match="speculative"):
        e2e_decode.main([*SMALL, "--speculative", "-1"])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
@pytest.mark.skipif(not _has_tp_api(), reason="this transformers has no tensor-parallel prepare/maybe_distribute_model")
def test_e2e_decode_tensor_parallel_rows(tmp_path):
    """``torchrun --nproc-per-node 2 eval/e2e_decode.py``: two gloo ranks shard the model with transformers'
    TP plan; rows carry tp=2 and one rank's K/V bytes (dense: half of the single-process bytes) and the floor's
    (per layer the heavier rank's); dense-static
    prefills its chunks eagerly into each rank's StaticCache (``static_prefill``) under TP too."""
    args = [*SMALL, "--models", "llama3.1-8b", "--methods", "dense-dynamic,dense-static,leank", "--lengths", "64",
            "--batches", "1", "--warmup", "1", "--steps", "3", "--no-max-batch"]
    one = tmp_path / "tp1.json"
    assert e2e_decode.main([*args, "--out", str(one)]) == 0
    two = tmp_path / "tp2.json"
    proc = _torchrun2(common.REPO_ROOT / "eval" / "e2e_decode.py", *args, "--out", str(two))
    assert proc.stdout.count("| model") == 1, "rank 0 alone prints the table"
    r1 = {r["method"]: r for r in json.loads(one.read_text())["runs"]}
    res = json.loads(two.read_text())
    r2 = {r["method"]: r for r in res["runs"]}
    assert res["tp"] == 2 and all(r["tp"] == 2 and r["status"] == "ok" for r in r2.values())
    assert all(r["tp"] == 1 for r in r1.values())
    assert r2["dense-dynamic"]["kv_bytes_per_rank"] * 2 == r1["dense-dynamic"]["kv_bytes"]
    assert r2["dense-static"]["status"] == "ok" and r1["dense-static"]["status"] == "ok"
    report = r2["leank"]["report"]
    assert (report["tp_rank"], report["tp_size"], report["kv_heads"]) == (0, 2, [0, 1])
    assert 0 < r2["leank"]["kv_bytes_per_rank"] < r1["leank"]["kv_bytes"]
    # the floor's K/V: per layer the heavier rank's, so at least half the whole and at least rank 0's
    slowest = r2["leank"]["kv_bytes_slowest_rank"]
    assert r2["leank"]["kv_bytes_per_rank"] <= slowest <= r1["leank"]["kv_bytes"] and 2 * slowest >= 0.999 * r1["leank"]["kv_bytes"]
    assert r2["dense-dynamic"]["kv_bytes_slowest_rank"] == r2["dense-dynamic"]["kv_bytes_per_rank"]
    assert all(r["kv_bytes_slowest_rank"] == r["kv_bytes"] for r in r1.values())  # one process
    assert res["models"][0]["weights_gib"] < json.loads(one.read_text())["models"][0]["weights_gib"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_allreduce_latency_two_ranks(tmp_path):
    """``torchrun --nproc-per-node 2 eval/allreduce_latency.py``: each size is summed correctly across the two
    gloo ranks (rank r gives r + 1, 3 expected) before it is timed; rank 0 alone prints and writes one row per
    size; the step column is 2 x layers all-reduces."""
    from eval import allreduce_latency

    out = tmp_path / "ar.json"
    proc = _torchrun2(common.REPO_ROOT / "eval" / "allreduce_latency.py", "--device", "cpu", "--hidden", "24,40",
                      "--batches", "1,3", "--calls", "3", "--repeats", "2", "--layers", "5", "--out", str(out))
    assert proc.stdout.count("| collective") == 1, "rank 0 alone prints the table"
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    rows = res["rows"]
    assert [(r["hidden"], r["batch"]) for r in rows] == [(24, 1), (24, 3), (40, 1), (40, 3)]
    for r in rows:
        assert (r["collective"], r["status"], r["bytes"]) == ("gloo", "ok", 4 * r["hidden"] * r["batch"])
        assert r["us_per_call"] > 0 and r["step_ms"] == pytest.approx(10 * r["us_per_call"] / 1e3)
    assert allreduce_latency.build_parser().parse_args([]).calls == 64  # the 8B step's: 2 per layer x 32


def test_allreduce_latency_refuses_a_collective_that_does_not_sum(tmp_path, monkeypatch):
    """A collective whose result is not the sum is reported, not timed."""
    from eval import allreduce_latency

    monkeypatch.setattr(allreduce_latency, "in_place_body", lambda t: ((lambda: None), (lambda: t * 0)))
    out = tmp_path / "ar.json"
    assert allreduce_latency.main(["--device", "cpu", "--hidden", "8", "--batches", "2", "--calls", "2",
                                   "--repeats", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"].startswith("wrong sum: expected 1.0") and "us_per_call" not in row
    with pytest.raises(SystemExit, match="--calls"):
        allreduce_latency.main(["--device", "cpu", "--calls", "0", "--out", str(out)])


SHARDED_BUILD_CHECK = """
import os
import torch, torch.distributed as dist
from eval import common, e2e_decode
dist.init_process_group("gloo")
cfg = common.model_config("llama3.1-8b", layers=2, tiny=True)
model = e2e_decode.build_sharded_model(cfg, torch.device("cpu"), torch.float32, "sdpa", 2, seed=3)
whole = common.build_model(cfg, torch.device("cpu"), torch.float32, "sdpa")
assert torch.equal(model.model.rotary_emb.inv_freq, whole.model.rotary_emb.inv_freq), "rotary buffers"
k = model.model.layers[0].self_attn.k_proj.weight
assert hasattr(k, "to_local") and k.to_local().shape[0] * 2 == k.shape[0], "k_proj sharded by rows"
for name, p in model.named_parameters():
    local = p.to_local() if hasattr(p, "to_local") else p
    assert torch.isfinite(local).all(), name
    if name.endswith("proj.weight"):
        assert 0.01 < float(local.std()) < 0.04, (name, float(local.std()))  # initializer_range 0.02
ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(input_ids=ids).logits
both = [torch.empty_like(logits) for _ in range(2)]
dist.all_gather(both, logits)
assert torch.isfinite(logits).all() and torch.equal(both[0], both[1]), "every rank computes the same logits"
rank = dist.get_rank()
# a rank that leaves while its peer still finishes the all_gather's gloo traffic aborts that peer at exit
# ("terminate called without an active exception", 2 of 10 runs here, once in CI); a barrier first: 0 of 25
dist.barrier()
dist.destroy_process_group()
os.write(1, f"ok {rank}\\n".encode())  # one write: the ranks share a pipe (print interleaved "okok 1 0")
# and leave without the interpreter's teardown: with the barrier first a rank still aborted at exit
# ("terminate called without an active exception", a gloo thread destroyed late) in 2 of 4 runs on 2 cores
os._exit(0)
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
@pytest.mark.skipif(not _has_tp_api(), reason="this transformers has no tensor-parallel prepare/maybe_distribute_model")
def test_sharded_build_allocates_only_shards_and_initialises_them(tmp_path):
    """``build_sharded_model`` (what ``torchrun ... e2e_decode.py`` builds): on two gloo ranks the k_proj weight
    is a row shard, every parameter is finite with the model's initialiser scale, the rotary frequencies equal a
    normally built model's (``to_empty`` leaves buffers unset), and both ranks compute the same logits."""
    script = tmp_path / "check.py"
    script.write_text(SHARDED_BUILD_CHECK)
    proc = _torchrun2(script)
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("ok ")) == ["ok 0", "ok 1"], proc.stdout


def test_step_weight_bytes_counts_one_embedding_row_per_sequence():
    """The floor's weight bytes: an untied input embedding is read one row per sequence, a tied one whole
    (it is the output head)."""
    cfg = common.model_config("llama3.1-8b", tiny=True)
    model = common.build_model(cfg, torch.device("cpu"), torch.float32, "sdpa")
    every = e2e_decode.local_weight_bytes(model)
    table = cfg.vocab_size * cfg.hidden_size * 4
    assert e2e_decode.step_weight_bytes(model, 3) == every - table + 3 * cfg.hidden_size * 4
    cfg.tie_word_embeddings = True
    tied = common.build_model(cfg, torch.device("cpu"), torch.float32, "sdpa")
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert e2e_decode.step_weight_bytes(tied, 3) == e2e_decode.local_weight_bytes(tied)


_AGREE_WORKER = """
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["REPO"])
from eval import e2e_decode
dist.init_process_group("gloo")
rank = dist.get_rank()
dev = torch.device("cpu")
peaks = [{"decode_peak_gib": 10.0, "peak_gib": 12.0}, {"decode_peak_gib": 11.5, "peak_gib": 11.0}][rank]
both = e2e_decode.ranks_agree({**peaks, "other": rank}, ("decode_peak_gib", "peak_gib"), dev)
one_oom = e2e_decode.ranks_agree(None if rank == 1 else dict(peaks), ("decode_peak_gib", "peak_gib"), dev)
json.dump({"both": both, "one_oom": one_oom}, open(os.path.join(sys.argv[1], f"r{rank}.json"), "w"))
dist.barrier()  # as in SHARDED_BUILD_CHECK: no rank leaves while its peer's last collective is in flight
dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_max_batch_ranks_agree(tmp_path):
    """Under TP the max-batch search takes one verdict on every rank: the largest peak of any rank, and
    out of memory if any rank ran out (ranks that decided apart would wait in different collectives)."""
    assert e2e_decode.ranks_agree({"peak_gib": 3.0}, ("peak_gib",), torch.device("cpu")) == {"peak_gib": 3.0}
    script = tmp_path / "agree.py"
    script.write_text(_AGREE_WORKER)
    _torchrun2(script, str(tmp_path))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"r{rank}.json").read_text())
        assert got["both"] == {"decode_peak_gib": 11.5, "peak_gib": 12.0, "other": rank}
        assert got["one_oom"] is None


def test_e2e_decode_uses_the_mask_it_is_given(tmp_path):
    """--mask is the mask the LeanK rows run (it was parsed, recorded and ignored: the mix ran instead)."""
    out = tmp_path / "e2e.json"
    args = [*SMALL, "--models", "llama3.1-8b", "--lengths", "40", "--batches", "1", "--warmup", "1", "--steps", "2",
            "--methods", "leank", "--no-max-batch"]
    assert e2e_decode.main([*args, "--mask", "rope:0.5", "--out", str(out)]) == 0
    info = json.loads(out.read_text())["models"][0]
    assert info["mask_k_sparsity"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="--mask"):
        e2e_decode.main([*args, "--mask", "rope:lots", "--out", str(out)])
    for bad in (["--models", ""], ["--methods", ""], ["--lengths", "0"], ["--batches", "0"]):
        with pytest.raises(SystemExit, match="expected"):
            e2e_decode.main([*args, *bad, "--out", str(out)])
