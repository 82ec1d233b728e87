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
from leank.patching import cache_kwarg
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
        cache = first.past_key_values if hasattr(first, "past_key_values") else first.cache
        assert isinstance(cache, LeanKCache)
        seen = cache.get_seq_length()
        ids2 = torch.cat([first.sequences, torch.randint(3, 96, (1, 4))], 1)
        second = _gen(model, input_ids=ids2, attention_mask=torch.ones_like(ids2), max_new_tokens=3,
                      min_new_tokens=3, **{cache_kwarg(model): cache})
        cache2 = second.past_key_values if hasattr(second, "past_key_values") else second.cache
        assert cache2 is cache and cache.get_seq_length() == ids2.shape[1] + 2
    finally:
        leank.unpatch(model)
    assert seen == PROMPT.shape[1] + 11


@pytest.mark.parametrize("kw,feature", [
    (dict(cache_implementation="static"), "cache_implementation"),
    (dict(cache_implementation="offloaded"), "cache_implementation"),
    (dict(output_attentions=True), "output_attentions"),
    (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"),
])
def test_unsupported_features_refused_by_name(kw, feature):
    model = tiny_model("llama", init=0.06)
    leank.patch(model, masks=_all_kept(model), config=CFG)
    try:
        with pytest.raises(ValueError, match=rf"(?s){feature}.*LeanK|LeanK.*{feature}"):
            _gen(model, **kw)
    finally:
        leank.unpatch(model)


def test_assistant_model_refused_by_name():
    model = tiny_model("llama", init=0.06)
    draft = tiny_model("llama", init=0.06, seed=1, layers=1)
    leank.patch(model, masks=_all_kept(model), config=CFG)
    try:
        with pytest.raises(ValueError, match="assistant_model.*LeanK|LeanK.*assistant_model"):
            _gen(model, assistant_model=draft)
    finally:
        leank.unpatch(model)
