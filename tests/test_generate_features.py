"""generate() features on a patched model: each works like the unpatched model or is refused by name.

With every channel kept, LeanK computes exactly the unpatched model's function, so a feature
that works gives the unpatched tokens and scores (fp32, <= 1e-5).
"""

import pytest
import torch

import leank
from leank import LeanKConfig
from leank.cache import LeanKCache
from leank.masks import ChannelMask
from leank.patching import cache_kwarg, output_cache
from tests.oracle import tiny_model

CFG = LeanKConfig(sink=4, recent=8, flush_every=4, backend="reference")
PROMPT = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(3))


def _all_kept(model):
    c = model.config
    return ChannelMask(keep=torch.ones(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype=torch.bool),
                       align=8)


def _gen(model, **kw):
    base = dict(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=12, min_new_tokens=12,
                do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        return model.generate(**{**base, **kw})


def _compare(kind, **kw):
    model = tiny_model(kind, init=0.06)
    ref = _gen(model, **kw)
    leank.patch(model, masks=_all_kept(model), config=CFG)
    try:
        got = _gen(model, **kw)
    finally:
        leank.unpatch(model)
    assert torch.equal(got.sequences, ref.sequences)
    s_ref, s_got = torch.stack(ref.scores, 1), torch.stack(got.scores, 1)
    finite = torch.isfinite(s_ref)
    assert torch.equal(finite, torch.isfinite(s_got))
    assert (s_ref[finite] - s_got[finite]).abs().max() <= 1e-5
    return got


# Features the README promises; each row runs against the unpatched model.
FEATURES = {
    "greedy": {},
    "sampling (seeded)": dict(do_sample=True, top_k=20, temperature=0.9),
    "repetition_penalty": dict(repetition_penalty=1.3),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "num_beams + num_return_sequences": dict(num_beams=3, num_return_sequences=2),
}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_equals_unpatched(kind, feature):
    kw = FEATURES[feature]
    if kw.get("do_sample"):
        torch.manual_seed(0)
        model = tiny_model(kind, init=0.06)
        torch.manual_seed(1)
        ref = _gen(model, **kw)
        leank.patch(model, masks=_all_kept(model), config=CFG)
        try:
            torch.manual_seed(1)
            got = _gen(model, **kw)
        finally:
            leank.unpatch(model)
        assert torch.equal(got.sequences, ref.sequences)
        return
    _compare(kind, **kw)


def test_continue_with_current_cache_keyword():
    """Passing the returned cache under transformers' current name continues it (no throwaway cache)."""
    model = tiny_model("llama", init=0.06)
    leank.patch(model, masks=_all_kept(model), config=CFG)
    try:
        first = _gen(model)
        cache = output_cache(first)
        assert isinstance(cache, LeanKCache)
        seen = cache.get_seq_length()
        ids2 = torch.cat([first.sequences, torch.randint(3, 96, (1, 4))], 1)
        second = _gen(model, input_ids=ids2, attention_mask=torch.ones_like(ids2), max_new_tokens=3,
                      min_new_tokens=3, **{cache_kwarg(model): cache})
        cache2 = output_cache(second)
        assert cache2 is cache and cache.get_seq_length() == ids2.shape[1] + 2
    finally:
        leank.unpatch(model)
    assert seen == PROMPT.shape[1] + 11


@pytest.mark.parametrize("kw,feature", [
    (dict(cache_implementation="static"), "cache_implementation"),
    (dict(cache_implementation="offloaded"), "cache_implementation"),
    (dict(output_attentions=True), "output_attentions"),
])
def test_unsupported_features_refused_by_name(kw, feature):
    model = tiny_model("llama", init=0.06)
    leank.patch(model, masks=_all_kept(model), config=CFG)
    try:
        with pytest.raises(ValueError, match=rf"(?s){feature}.*LeanK|LeanK.*{feature}"):
            _gen(model, **kw)
    finally:
        leank.unpatch(model)


# ---------------------------------------------------------------- speculative decoding: exact rollback
def _layer_state(layer):
    rows = []
    for b in range(layer.batch_size):
        w, a = layer.win_len_host[b], layer.arch_len_host[b]
        rows.append((layer.win_k[b, :, :w].clone(), layer.win_v[b, :, :w].clone(),
                     [(g.keys[b, :, :a].clone(), g.values[b, :, :a].clone()) for g in layer.groups]))
    return layer.win_len_host[:], layer.arch_len_host[:], rows


def _assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1], (a[:2], b[:2])
    for (wk1, wv1, g1), (wk2, wv2, g2) in zip(a[2], b[2]):
        assert torch.equal(wk1, wk2) and torch.equal(wv1, wv2)
        for (k1, v1), (k2, v2) in zip(g1, g2):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize("drop", [1, 3, 6])
def test_crop_after_a_chunk_equals_storing_only_the_kept_tokens(drop):
    """Chunk P+R then crop |R| == chunk P, even when the chunk's flush archived rows that P keeps in the window."""
    from tests.oracle import sparse_keep

    keep = sparse_keep(1, 4, 32, seed=2)
    g = torch.Generator().manual_seed(0)
    prompt_k, prompt_v = torch.randn(2, 4, 19, 32, generator=g), torch.randn(2, 4, 19, 32, generator=g)
    valid = torch.ones(2, 19, dtype=torch.bool)
    valid[0, :7] = False  # ragged
    chunk_k, chunk_v = torch.randn(2, 4, 6, 32, generator=g), torch.randn(2, 4, 6, 32, generator=g)

    def layer_after(n_chunk):
        cache = LeanKCache(ChannelMask(keep=keep, align=8), CFG)
        layer = cache.layers[0]
        layer.reserve = 16
        layer.lazy_initialization(prompt_k, prompt_v)
        layer.store_chunk(prompt_k, prompt_v, valid)
        layer.seen_tokens = 19
        layer.store_chunk(chunk_k[:, :, :n_chunk], chunk_v[:, :, :n_chunk], None)
        layer.seen_tokens += n_chunk
        return layer

    full = layer_after(6)
    assert full._rollback[1]["moved"] == 6, "the chunk's flush must have archived rows"
    full.crop(-drop)
    _assert_same(_layer_state(full), _layer_state(layer_after(6 - drop)))
    assert full.win_len.tolist() == full.win_len_host and full.arch_len.tolist() == full.arch_len_host


def test_crop_deeper_than_the_window_after_a_chunk_is_inexact_not_a_crash():
    """A small window (sink 2, recent 2): cropping more of the last chunk than the window's non-sink rows
    hold cannot be an exact rollback; it drops tokens (warned) instead of failing on a negative slice."""
    from leank.diagnostics import warn_once
    from tests.oracle import sparse_keep

    small = LeanKConfig(sink=2, recent=2, flush_every=2, backend="reference")
    g = torch.Generator().manual_seed(4)
    cache = LeanKCache(ChannelMask(keep=sparse_keep(1, 4, 32, seed=2), align=8), small)
    layer = cache.layers[0]
    k, v = torch.randn(1, 4, 20, 32, generator=g), torch.randn(1, 4, 10, 32, generator=g)
    layer.lazy_initialization(k, k)
    layer.store_chunk(k, k, None)
    layer.seen_tokens = 20
    layer.store_chunk(v, v, None)
    layer.seen_tokens = 30
    warn_once.cache_clear()
    with pytest.warns(UserWarning, match="crop\\(\\) removed more than the last step"):
        layer.crop(-5)
    assert layer.win_len_host[0] + layer.arch_len_host[0] == 25 and layer.seen_tokens == 25
    assert layer.win_len.tolist() == layer.win_len_host and layer.arch_len.tolist() == layer.arch_len_host


def test_crop_after_a_flushing_decode_step_restores_the_window():
    from tests.oracle import sparse_keep

    keep = sparse_keep(1, 4, 32, seed=2)
    g = torch.Generator().manual_seed(1)
    cache = LeanKCache(ChannelMask(keep=keep, align=8), CFG)
    layer = cache.layers[0]
    k, v = torch.randn(1, 4, 15, 32, generator=g), torch.randn(1, 4, 15, 32, generator=g)
    layer.reserve = 16
    layer.lazy_initialization(k, v)
    layer.store_chunk(k, v, None)
    layer.seen_tokens = 15
    for _ in range(4):  # the 4th append reaches recent + flush_every and flushes
        before = _layer_state(layer)
        layer.append_decode(torch.randn(1, 4, 1, 32, generator=g), torch.randn(1, 4, 1, 32, generator=g))
        layer.seen_tokens += 1
        flushed = layer.arch_len_host[0]
        layer.flush_if_due()
    assert layer.arch_len_host[0] > flushed, "the last step must have flushed"
    layer.crop(-1)
    _assert_same(_layer_state(layer), before)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prompt_lookup_decoding_equals_unpatched(kind):
    """Speculative (prompt-lookup) decoding: candidates verified as a chunk, rejected ones cropped."""
    rep = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(5))
    prompt = torch.cat([rep, rep, rep, rep[:, :4]], 1)  # repetitive: lookups propose (and get rejected)
    _compare(kind, input_ids=prompt, attention_mask=torch.ones_like(prompt), prompt_lookup_num_tokens=3,
             max_new_tokens=20, min_new_tokens=20)


def test_speculative_decoding_says_its_verification_steps_are_not_captured():
    """Where decode steps are captured, speculative decoding warns once that its multi-token verification
    steps run eagerly (measured on an H200: slower than LeanK without speculation); plain decoding does not."""
    import warnings

    from leank.diagnostics import warn_once

    model = tiny_model("llama", init=0.06)
    leank.patch(model, masks=_all_kept(model), config=CFG)
    model._leank.emulate_capture = True  # what a CUDA model does, on the CPU
    warn_once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as plain:
            warnings.simplefilter("always")
            _gen(model, max_new_tokens=4, min_new_tokens=4)
        assert not [w for w in plain if "speculative" in str(w.message)]
        with pytest.warns(RuntimeWarning, match="prompt_lookup_num_tokens: speculative decoding is exact on a LeanK"):
            _gen(model, prompt_lookup_num_tokens=3, max_new_tokens=4, min_new_tokens=4)
    finally:
        leank.unpatch(model)


def test_assisted_decoding_with_a_draft_model_equals_unpatched():
    draft = tiny_model("llama", init=0.06, seed=1, layers=1)
    _compare("llama", assistant_model=draft, max_new_tokens=16, min_new_tokens=16)
