"""End-to-end LeanK decoding on tiny Llama / Qwen2 models (CPU, fp32)."""

import functools

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import leank
from leank import LeanKConfig
from leank.cache import ROLLBACK_ROWS, LeanKCache
from leank.masks import ChannelMask
from leank.patching import cache_kwarg, output_cache
from tests.oracle import oracle_logits, sparse_keep, tiny_model


@pytest.fixture
def archive_growths(monkeypatch):
    """The ``seen_tokens`` of every archive growth (a storage replacement) while the test runs."""
    from leank.cache import LeanKLayer

    grew = []
    real = LeanKLayer._grow_archive

    def spy(self, needed, *args, **kwargs):
        before = self.capacity
        real(self, needed, *args, **kwargs)
        if self.capacity != before:
            grew.append(self.seen_tokens)
    monkeypatch.setattr(LeanKLayer, "_grow_archive", spy)
    return grew

CFG = LeanKConfig(sink=4, recent=8, flush_every=4, backend="reference")


def _mask(model, keep):
    return ChannelMask(keep=keep, align=8)


def _generate(model, ids, n, attention_mask=None, **kw):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=attention_mask if attention_mask is not None else torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **kw,
        )
    return out.sequences, torch.stack(out.logits, 1), output_cache(out)


def _prompt(n, seed=3, vocab=96):
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_all_channels_kept_equals_unpatched(kind):
    model = tiny_model(kind, init=0.06)
    ids = _prompt(37)[None]
    seq_ref, logits_ref, _ = _generate(model, ids, 24)
    keep = torch.ones(2, 4, 32, dtype=torch.bool)
    leank.patch(model, masks=_mask(model, keep), config=CFG)
    seq, logits, cache = _generate(model, ids, 24)
    leank.unpatch(model)
    assert isinstance(cache, LeanKCache)
    assert cache.layers[0].arch_len_host[0] > 0, "the archive must be used"
    assert torch.equal(seq, seq_ref)
    assert logits_ref.abs().max() > 1.0, "logits must not be trivially small"
    assert (logits - logits_ref).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sparse_mask_matches_oracle_across_flushes(kind):
    model = tiny_model(kind)
    keep = sparse_keep(2, 4, 32)
    assert (keep.sum(-1) == 0).any() and keep.float().mean() < 0.4
    prompt = _prompt(41)
    leank.patch(model, masks=_mask(model, keep), config=CFG)
    seq, logits, cache = _generate(model, prompt[None], 21)  # 21 steps: 5 flushes
    leank.unpatch(model)
    cont = seq[0, len(prompt):]
    ref = oracle_logits(model, keep, CFG.sink, CFG.recent, CFG.flush_every, prompt, cont)
    full = oracle_logits(model, torch.ones_like(keep), CFG.sink, CFG.recent, CFG.flush_every, prompt, cont)
    err = (logits[0] - ref).abs().max().item()
    assert err <= 2e-5, err
    assert (full - ref).abs().max() > 100 * max(err, 1e-6), "pruning must change the logits (non-vacuous test)"


def test_ragged_batch_equals_each_alone():
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32, seed=5)
    leank.patch(model, masks=_mask(model, keep), config=CFG)
    prompts = [_prompt(n, seed=n) for n in (5, 23, 40)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    am = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        am[i, width - len(p):] = 1
    seq, logits, cache = _generate(model, ids, 14, attention_mask=am)
    for i, p in enumerate(prompts):
        s1, l1, c1 = _generate(model, p[None], 14)
        assert torch.equal(seq[i, width:], s1[0, len(p):])
        assert (logits[i] - l1[0]).abs().max() <= 1e-4
        layer, lone = cache.layers[1], c1.layers[1]
        assert layer.win_len_host[i] == lone.win_len_host[0] and layer.arch_len_host[i] == lone.arch_len_host[0]
        assert layer.win_len_host[i] + layer.arch_len_host[i] == len(p) + 13, "pads must not be stored"
    leank.unpatch(model)


@pytest.mark.parametrize("n", [3, 11, 12, 16])
def test_short_prompts_and_flush_boundary(n):
    """Prompts shorter than sink, than sink+recent, exactly sink+recent, and at a flush boundary."""
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32, seed=2)
    prompt = _prompt(n, seed=n)
    leank.patch(model, masks=_mask(model, keep), config=CFG)
    seq, logits, _ = _generate(model, prompt[None], 17)
    leank.unpatch(model)
    ref = oracle_logits(model, keep, CFG.sink, CFG.recent, CFG.flush_every, prompt, seq[0, n:])
    assert (logits[0] - ref).abs().max() <= 2e-5


def test_second_generate_continues_the_cache():
    model = tiny_model("qwen2")
    keep = sparse_keep(2, 4, 32, seed=4)
    prompt = _prompt(30)
    leank.patch(model, masks=_mask(model, keep), config=CFG)
    seq1, logits1, cache = _generate(model, prompt[None], 9)
    follow = _prompt(6, seed=9)
    ids2 = torch.cat([seq1, follow[None]], 1)
    seq2, logits2, cache2 = _generate(model, ids2, 7, past_key_values=cache)
    leank.unpatch(model)
    assert cache2 is cache
    # oracle: prompt, the 9 generated tokens one by one (last one fed with the follow-up chunk), then 7 more
    gen1 = seq1[0, 30:]
    cont = torch.cat([gen1, follow, seq2[0, ids2.shape[1]:]])
    start = len(gen1) - 1  # the last generated token was never fed; generate feeds it with the follow-up
    ref = oracle_logits(model, keep, CFG.sink, CFG.recent, CFG.flush_every, prompt, cont, chunks=[(start, start + 1 + len(follow))])
    n1 = len(gen1)
    assert (logits1[0] - ref[:n1]).abs().max() <= 2e-5
    got2 = logits2[0]
    want2 = ref[n1 + len(follow):]
    assert (got2 - want2).abs().max() <= 2e-5


def test_cache_stores_compacted_k_and_drops_v_of_zero_channel_heads():
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32, seed=6)
    leank.patch(model, masks=_mask(model, keep), config=CFG)
    _, _, cache = _generate(model, _prompt(50)[None], 5)
    leank.unpatch(model)
    es = 4
    for li, layer in enumerate(cache.layers):
        counts = keep[li].sum(-1)
        heads_in_groups = sorted(int(h) for g in layer.groups for h in g.heads)
        assert heads_in_groups == [h for h in range(4) if counts[h] > 0]
        for g in layer.groups:
            assert g.keys.shape[-1] == g.d and all(counts[int(h)] == g.d for h in g.heads)
            assert g.values.shape[1] == len(g.heads)
        cap = layer.capacity
        # the rows kept to undo the last step exactly (crop), at most ROLLBACK_ROWS per sequence
        rollback = sum(r[x].nbytes for r in layer._rollback.values() for x in ("k", "v") if x in r)
        # the last decode step flushed flush_every rows of the one sequence: K and V of 4 heads each
        assert rollback == 2 * min(CFG.flush_every, ROLLBACK_ROWS) * 4 * 32 * es
        expected = 2 * 1 * 4 * CFG.window_capacity * 32 * es + sum(cap * int(c) * es + cap * 32 * es for c in counts if c > 0)
        expected += rollback
        rep = layer.memory_report()
        assert rep["allocated_bytes"] == expected
        a = layer.arch_len_host[0]
        assert rep["k_bytes"] == layer.win_len_host[0] * 4 * 32 * es + a * int(counts.sum()) * es
        assert rep["v_bytes"] == layer.win_len_host[0] * 4 * 32 * es + a * 32 * int((counts > 0).sum()) * es
    total = cache.memory_report()
    assert total["k_bytes"] < total["dense_k_bytes"] and total["v_bytes"] < total["dense_v_bytes"]


def test_generate_reserves_archive_for_new_tokens():
    model = tiny_model("llama")
    cfg = LeanKConfig(sink=4, recent=8, flush_every=4, backend="reference", initial_archive_capacity=16)
    leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=cfg)
    _, _, cache = _generate(model, _prompt(100)[None], 40)
    leank.unpatch(model)
    layer = cache.layers[0]
    assert layer.arch_len_host[0] > 100 - 12  # decode flushed into the archive
    assert layer.capacity == (100 - 12) + 41  # sized once at prefill: no growth, no slack beyond the reservation


@pytest.mark.parametrize("prompt_len,how", [(6, "max_new_tokens"), (6, "max_length"), (100, "max_length"),
                                            (100, "chunked")])
def test_decoding_never_grows_the_archive(prompt_len, how):
    """A growth replaces the archive's storage (on CUDA the captured decode step is then recorded again):
    the archive is sized for the whole call by the first decode step at the latest - a prompt shorter
    than the window (nothing archived at prefill), ``max_length`` instead of ``max_new_tokens``, a
    prompt prefilled in chunks."""
    model = tiny_model("llama")
    cfg = LeanKConfig(sink=4, recent=8, flush_every=4, backend="reference", initial_archive_capacity=16)
    leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=cfg)
    versions = []
    real_step = type(model).forward

    @functools.wraps(real_step)  # keeps forward's signature (LeanK reads the cache argument's name from it)
    def spy(self, *a, **kw):  # the layer's storage version after every forward (prefill chunks, decode steps)
        out = real_step(self, *a, **kw)
        cache = kw.get("cache", kw.get("past_key_values"))
        versions.append(cache.layers[0].version)
        return out

    n = 60  # far more than initial_archive_capacity rows reach the archive while decoding
    kw = {"max_length": prompt_len + n} if how == "max_length" else {"max_new_tokens": n}
    if how == "chunked":
        kw["prefill_chunk_size"] = 32
    try:
        type(model).forward = spy
        with torch.no_grad():
            out = model.generate(input_ids=_prompt(prompt_len)[None], min_new_tokens=n, do_sample=False,
                                 return_dict_in_generate=True, pad_token_id=0, **kw)
    finally:
        type(model).forward = real_step
        leank.unpatch(model)
    layer = leank.patching.output_cache(out).layers[0]
    assert layer.arch_len_host[0] >= prompt_len + n - 12 - 4 > cfg.initial_archive_capacity
    prefill_steps = 4 if how == "chunked" else 1  # 100 tokens in chunks of 32
    assert len(versions) == prefill_steps + n - 1
    # a prompt in one piece is sized at prefill; a chunked one grows once more at the first decode step
    # (before anything is recorded: a captured step is recorded from the second decode step on)
    grown = 1 if how == "chunked" else 0
    assert versions[prefill_steps] == versions[prefill_steps - 1] + grown, versions
    assert len(set(versions[prefill_steps:])) == 1, f"the archive grew while decoding: versions {versions}"
    assert layer.capacity <= max(0, prompt_len - 12) + n + 1 + (32 if how == "chunked" else 0)


@pytest.mark.parametrize("emulate", [False, True])
def test_chunked_prompt_archive_grows_by_the_first_decode_step_at_the_latest(archive_growths, emulate):
    """The same through the capture runner (emulated on the CPU): no archive growth after the first
    decode step, whichever path decodes."""
    grew = archive_growths
    model = tiny_model("qwen2")
    cfg = LeanKConfig(sink=4, recent=8, flush_every=4, backend="reference", initial_archive_capacity=16)
    leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=cfg)
    model._leank.emulate_capture = emulate
    try:
        seq, _, _ = _generate(model, _prompt(90)[None], 50, prefill_chunk_size=20)
        runner = model._leank.runner
    finally:
        leank.unpatch(model)
    assert not emulate or runner.replays > 40
    assert grew and max(grew) <= 90, f"archive growths at seen_tokens {grew} (prompt 90): one at the first decode step"


def test_unpatch_restores_model_exactly():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=CFG)
    assert leank.is_patched(model) and "generate" in model.__dict__
    with pytest.raises(ValueError, match="already patched"):
        leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=CFG)
    leank.unpatch(model)
    assert not leank.is_patched(model) and "generate" not in model.__dict__
    assert model.config._attn_implementation == impl
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="not patched"):
        leank.unpatch(model)


def test_beam_search_all_kept_equals_unpatched():
    model = tiny_model("llama")
    ids = _prompt(33)[None]
    seq_ref, _, _ = _generate(model, ids, 8, num_beams=3)
    leank.patch(model, masks=_mask(model, torch.ones(2, 4, 32, dtype=torch.bool)), config=CFG)
    seq, _, _ = _generate(model, ids, 8, num_beams=3)
    leank.unpatch(model)
    assert torch.equal(seq, seq_ref)


def test_crop_removes_recent_tokens():
    model = tiny_model("llama")
    leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=CFG)
    _, _, cache = _generate(model, _prompt(40)[None], 6)
    leank.unpatch(model)
    layer = cache.layers[0]
    total = layer.win_len_host[0] + layer.arch_len_host[0]
    assert cache.get_seq_length() == 45 == total
    cache.crop(30)
    assert cache.get_seq_length() == 30
    assert layer.win_len_host[0] + layer.arch_len_host[0] == 30 and layer.win_len_host[0] >= CFG.sink


def test_unsupported_architecture_and_bad_config():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        leank.patch(gpt2, masks=ChannelMask(keep=torch.ones(1, 2, 16, dtype=torch.bool), align=16))
    qwen = tiny_model("qwen2")
    qwen.config.use_sliding_window = True
    with pytest.raises(ValueError, match="use_sliding_window"):
        leank.patch(qwen, masks=_mask(qwen, torch.ones(2, 4, 32, dtype=torch.bool)))
    model = tiny_model("llama")
    with pytest.raises(ValueError):
        leank.patch(model, masks=ChannelMask(keep=torch.ones(3, 4, 32, dtype=torch.bool), align=8))
    with pytest.raises(ValueError, match="config"):
        leank.patch(model, masks=_mask(model, torch.ones(2, 4, 32, dtype=torch.bool)), config={"sink": 4})
    assert not leank.is_patched(model)
    with pytest.raises(ValueError, match="flush_every"):
        LeanKConfig(flush_every=0)
    with pytest.raises(ValueError, match="backend"):
        LeanKConfig(backend="cuda")


def test_tilelang_backend_refused_on_cpu():
    model = tiny_model("llama")
    leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=LeanKConfig(sink=4, recent=8, flush_every=4, backend="tilelang"))
    try:
        with pytest.raises(ValueError, match="tilelang"):
            _generate(model, _prompt(30)[None], 3)
    finally:
        leank.unpatch(model)


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = (
        "import sys, leank, tilelang_kernels, patches;"
        "from transformers import AttentionInterface;"
        "assert 'leank' not in AttentionInterface._global_mapping;"
        "assert 'tilelang' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(__import__('pathlib').Path(__file__).parents[1]))
    assert out.stdout.strip() == "ok", out.stderr


def test_chunked_prefill_in_small_blocks_matches_oracle(monkeypatch):
    """generate(prefill_chunk_size=...): later chunks attend to the LeanK cache and to
    themselves; with the score budget forced tiny both run in many small query blocks."""
    import leank.attention

    monkeypatch.setattr(leank.attention, "CHUNK_SCORE_ELEMENTS", 300)
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32, seed=5)
    prompt = _prompt(40, seed=11)
    leank.patch(model, masks=_mask(model, keep), config=CFG)
    try:
        seq, logits, _ = _generate(model, prompt[None], 6, prefill_chunk_size=16)
    finally:
        leank.unpatch(model)
    cont = torch.cat([prompt[16:], seq[0, 40:]])
    ref = oracle_logits(model, keep, CFG.sink, CFG.recent, CFG.flush_every, prompt[:16], cont, chunks=[(0, 16), (16, 24)])
    assert (logits[0] - ref[24:]).abs().max() <= 2e-5


# ---------------------------------------------------------------- issue 11: paths that used to fail silently
def _fresh_warnings():
    from leank import diagnostics

    diagnostics.warn_once.cache_clear()


def test_use_cache_false_and_foreign_cache_warn():
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = _prompt(12)[None]
    leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=CFG)
    try:
        _fresh_warnings()
        with pytest.warns(UserWarning, match="use_cache=False"):
            model.generate(input_ids=ids, max_new_tokens=2, use_cache=False, pad_token_id=0)
        _fresh_warnings()
        with pytest.warns(UserWarning, match="DynamicCache"):
            model.generate(input_ids=ids, max_new_tokens=2, past_key_values=DynamicCache(config=model.config),
                           pad_token_id=0)
    finally:
        leank.unpatch(model)


def test_leank_cache_on_unpatched_model_raises():
    model = tiny_model("llama")
    cache = LeanKCache(_mask(model, sparse_keep(2, 4, 32)), CFG)
    with pytest.raises(ValueError, match="leank.patch"), torch.no_grad():
        model(_prompt(12)[None], use_cache=True, **{cache_kwarg(model): cache})
    leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=CFG)
    try:
        cache = leank.new_cache(model)
    finally:
        leank.unpatch(model)
    with pytest.raises(ValueError, match="leank.patch"), torch.no_grad():  # bound to a model that is now unpatched
        model(_prompt(12)[None], use_cache=True, **{cache_kwarg(model): cache})


def test_base_model_patch_and_forward():
    from transformers import LlamaModel

    full = tiny_model("llama")
    base = LlamaModel(full.config).eval()
    base.load_state_dict(full.model.state_dict())
    keep = sparse_keep(2, 4, 32)
    leank.patch(base, masks=_mask(base, keep), config=CFG)
    try:
        assert "generate" not in base.__dict__
        with torch.no_grad():
            out = base(_prompt(30)[None], use_cache=True, **{cache_kwarg(base): leank.new_cache(base)})
        assert out.last_hidden_state.shape == (1, 30, full.config.hidden_size)
    finally:
        leank.unpatch(base)
    assert not leank.is_patched(base) and base.config._attn_implementation == "sdpa"


def test_failed_patch_leaves_nothing_behind():
    model = tiny_model("llama")
    bad = ChannelMask(keep=torch.ones(3, 4, 32, dtype=torch.bool), align=8)  # 3 layers for a 2-layer model
    with pytest.raises(ValueError):
        leank.patch(model, masks=bad, config=CFG)
    assert not leank.is_patched(model) and "generate" not in model.__dict__
    assert model.config._attn_implementation == "sdpa"


def test_patched_generate_uses_current_cache_keyword_without_deprecation_warning():
    import warnings

    model = tiny_model("llama")
    leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=CFG)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = model.generate(input_ids=_prompt(20)[None], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                 pad_token_id=0, return_dict_in_generate=True)
        assert not [w for w in seen if issubclass(w.category, FutureWarning | DeprecationWarning)], \
            [str(w.message) for w in seen]
        cache = output_cache(out)
        assert isinstance(cache, LeanKCache)
    finally:
        leank.unpatch(model)


def test_static_cache_implementation_refused_by_name():
    """Asked for by the caller (argument or their GenerationConfig): refused by name. Set by the checkpoint's
    generation_config: overridden for the call, with a warning, and LeanK decodes as without it."""
    import copy
    import warnings

    from transformers import GenerationConfig

    model = tiny_model("llama")
    ids = _prompt(20)[None]
    leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=CFG)
    try:
        with pytest.raises(ValueError, match="^cache_implementation: a LeanK-patched model .* got 'static'"):
            model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="static", pad_token_id=0)
        with pytest.raises(ValueError, match="^generation_config.cache_implementation: a LeanK-patched .* 'static'"):
            model.generate(input_ids=ids, generation_config=GenerationConfig(cache_implementation="static",
                                                                             max_new_tokens=2, pad_token_id=0))
        plain, _, _ = _generate(model, ids, 6)
        saved = copy.deepcopy(model.generation_config)
        model.generation_config.cache_implementation = "dynamic"  # as a checkpoint's generation_config.json may
        from leank import diagnostics

        diagnostics.warn_once.cache_clear()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            again, _, cache = _generate(model, ids, 6)
        assert any("generation_config sets cache_implementation='dynamic'" in str(w.message) for w in seen)
        assert isinstance(cache, LeanKCache) and torch.equal(again, plain)
        model.generation_config = saved
    finally:
        leank.unpatch(model)


def test_right_padding_is_warned():
    """Right padding (transformers warns about it on decoder-only models too): LeanK does not store padded
    positions, so a row ending in padding generates from a padding position and its logits differ from
    transformers'; LeanK says so. Left padding stays silent."""
    import warnings

    from leank import diagnostics

    model = tiny_model("llama")
    ids = torch.stack([_prompt(12, seed=1), _prompt(12, seed=2)])
    left, right = torch.ones_like(ids), torch.ones_like(ids)
    left[1, :4] = 0
    right[1, 8:] = 0
    leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=CFG)
    try:
        for am, told in ((left, False), (right, True)):
            diagnostics.warn_once.cache_clear()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                _generate(model, ids, 3, attention_mask=am)
            hits = [w for w in seen if "padding that is not left padding" in str(w.message)]
            assert bool(hits) == told, [str(w.message) for w in seen]
    finally:
        leank.unpatch(model)


def test_cache_and_config_inputs_are_checked():
    """Silent or deep-traceback cases found by an API probe: a non-binary raw keep tensor (was read as
    'keep everything'), a config dict, a fractional crop (became a fractional length), a batch other than
    the cache's (a shape error inside the append), sizes past int32, bools for counts."""
    from leank.masks import ChannelMask

    keep = sparse_keep(2, 4, 32)
    with pytest.raises(ValueError, match="keep: expected binary 0/1 values"):
        LeanKCache(torch.rand(2, 4, 32), CFG)
    assert LeanKCache(keep.int(), CFG).layers[0].keep.dtype == torch.bool  # 0/1 integers are fine
    with pytest.raises(ValueError, match="config: expected a LeanKConfig or None, got dict"):
        LeanKCache(keep, {"sink": 4})
    for bad in (2**40, True, 0):
        with pytest.raises(ValueError, match="initial_archive_capacity"):
            LeanKConfig(initial_archive_capacity=bad)
    model = tiny_model("llama")
    leank.patch(model, masks=_mask(model, keep), config=CFG)
    try:
        _, _, cache = _generate(model, _prompt(20)[None], 3)
        for bad in (2.5, True, "5"):
            with pytest.raises(ValueError, match="max_length: expected an int"):
                cache.crop(bad)
        for bad in (2**40, True, -1):
            with pytest.raises(ValueError, match="new_tokens"):
                cache.reserve(bad)
        with pytest.raises(ValueError, match="this cache holds 1 sequence.*the input has 2"):
            with torch.no_grad():
                model(torch.stack([_prompt(4), _prompt(4)]), **{cache_kwarg(model): cache}, use_cache=True)
    finally:
        leank.unpatch(model)
    with pytest.raises(ValueError, match="path: expected a file name ending in .safetensors"):
        ChannelMask(keep=keep, align=8).save("mask.pth")


def test_more_inputs_are_checked():
    """The rest of the API probe's silent cases: an unvalidated oracle (it described another function), an
    all-zero attention_mask row, bools taken as flags, a cache built for another layer count."""
    import warnings

    from leank import diagnostics
    from leank.verify import oracle_logits

    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32)
    p, c = _prompt(10), _prompt(5, seed=4)
    for bad_keep, msg in ((torch.rand(2, 4, 32), "keep: expected binary 0/1 values"),
                          (sparse_keep(3, 4, 32), r"keep: expected \[layers, kv_heads, head_dim\] = \[2, 4, 32\]")):
        with pytest.raises(ValueError, match=msg):
            oracle_logits(model, bad_keep, 4, 8, 4, p, c)
    for sizes, msg in (((-1, 8, 4), "sink"), ((4, 8, 0), "flush_every")):
        with pytest.raises(ValueError, match=msg):
            oracle_logits(model, keep, *sizes, p, c)
    for args, msg in (((p.float(), c), "prompt_ids"), ((p, c[:0]), "continuation_ids")):
        with pytest.raises(ValueError, match=msg):
            oracle_logits(model, keep, 4, 8, 4, *args)
    assert oracle_logits(model, _mask(model, keep), 4, 8, 4, p, c).shape == (5, 96)  # a ChannelMask is fine
    with pytest.raises(ValueError, match="allow_fallback: expected True or False"):
        leank.patch(model, masks=_mask(model, keep), config=CFG, allow_fallback="no")
    leank.patch(model, masks=_mask(model, keep), config=CFG)
    try:
        diagnostics.warn_once.cache_clear()
        ids = torch.stack([_prompt(8), _prompt(8, seed=5)])
        am = torch.ones_like(ids)
        am[1] = 0
        with pytest.warns(UserWarning, match="a row of attention_mask is all zeros"):
            _generate(model, ids, 2, attention_mask=am)
        _, _, cache = _generate(model, _prompt(12)[None], 2)
        with pytest.raises(ValueError, match="all_ranks: expected True or False"):
            cache.memory_report(all_ranks="x")
        other = LeanKCache(_mask(model, sparse_keep(5, 4, 32)), CFG)
        with pytest.raises(ValueError, match="this model's 2 layers .* got one of 5"):
            model.generate(input_ids=_prompt(6)[None], max_new_tokens=2, pad_token_id=0,
                           **{cache_kwarg(model): other})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for kw, msg in ((dict(max_queries_per_head=True), "max_queries_per_head"),
                            (dict(workspace_bytes=-5), "workspace_bytes"),
                            (dict(per_head_budget=torch.ones(2, 4, dtype=torch.bool)), "per_head_budget: .* bool")):
                with pytest.raises(ValueError, match=msg):
                    leank.compact(model, cache, input_ids=torch.ones(1, cache.layers[0].seen_tokens, dtype=torch.long),
                                  progress=False, **kw)
    finally:
        leank.unpatch(model)


@pytest.mark.parametrize("emulate", [False, True])  # True: the second call's steps go through the capture runner
def test_continuation_archive_sized_for_the_window_rows_past_recent(archive_growths, emulate):
    """A second generate whose only new token is one decode step: the window may hold up to flush_every - 1
    rows past sink + recent, which this call's flushes move too; the first decode step's sizing counts them
    (it grew again mid-decode when it counted the archive alone)."""
    grew = archive_growths
    model = tiny_model("llama")
    cfg = LeanKConfig(sink=4, recent=8, flush_every=8, backend="reference", initial_archive_capacity=1)
    leank.patch(model, masks=_mask(model, sparse_keep(2, 4, 32)), config=cfg)
    model._leank.emulate_capture = emulate
    try:
        seq, _, cache = _generate(model, _prompt(30)[None], 11)
        assert cache.layers[0].win_len_host[0] - 4 > 8, "the window must hold rows past recent"
        grew.clear()
        start = cache.layers[0].seen_tokens
        _generate(model, seq, 38, **{cache_kwarg(model): cache})  # its last step flushes: the archive is fullest
        runner = model._leank.runner
    finally:
        leank.unpatch(model)
    assert set(grew) <= {start}, f"archive growths at seen_tokens {grew}: only at the first step ({start})"
    assert not emulate or runner.replays > 30
