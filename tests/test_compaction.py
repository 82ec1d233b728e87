"""Attention matching (leank.compaction): solvers against independent references, exactness at
budget = T, held-out error against a top-attention baseline, and tiny models that generate."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from leank.patching import cache_kwarg
from leank.compaction import (
    attention_targets,
    compact_heads,
    fit_values,
    nnls,
    reconstruction_error,
    top_attention_baseline,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny batched ops on a shared 2-core box: one thread avoids OpenMP barrier stalls."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _structured(G, T, D, n, *, seed, dtype=torch.float64, sharp=2.0):
    """Keys/values at random; queries share a per-head mean direction (attention is uneven)."""
    g = _gen(seed)
    mu = torch.randn(G, 1, D, generator=g, dtype=dtype)
    k = torch.randn(G, T, D, generator=g, dtype=dtype)
    v = torch.randn(G, T, D, generator=g, dtype=dtype)
    q = sharp * (0.8 * mu + 0.6 * torch.randn(G, n, D, generator=g, dtype=dtype))
    return q, k, v


def _dense_attention(q, k, v, bias=None):
    lg = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    if bias is not None:
        lg = lg + bias[:, None, :]
    return torch.softmax(lg, -1) @ v, torch.logsumexp(lg, -1)


# ---------------------------------------------------------------------- solvers
@pytest.mark.parametrize("G,n,t", [(1, 1, 1), (5, 30, 7), (3, 97, 40), (2, 17, 16)])
def test_nnls_matches_scipy(G, n, t):
    so = pytest.importorskip("scipy.optimize")
    g = _gen(G * 1000 + n)
    A = torch.randn(G, n, t, generator=g, dtype=torch.float64)
    b = torch.randn(G, n, generator=g, dtype=torch.float64)
    res = nnls(A, b)
    assert bool(res.converged.all())
    assert bool((res.w >= 0).all())
    for i in range(G):
        ref, _ = so.nnls(A[i].numpy(), b[i].numpy())
        ref = torch.from_numpy(ref)
        assert torch.allclose(res.w[i], ref, atol=1e-8 * max(1.0, float(ref.abs().max())), rtol=0)


def test_nnls_attention_like_float32_and_active_mask():
    so = pytest.importorskip("scipy.optimize")
    g = _gen(3)
    A = torch.rand(4, 200, 33, generator=g, dtype=torch.float64) ** 6  # positive, correlated columns
    b = torch.ones(4, 200, dtype=torch.float64)
    active = torch.ones(4, 33, dtype=torch.bool)
    active[1, 5:] = False
    res = nnls(A.float(), b.float(), active=active)
    assert bool((res.w >= 0).all()) and bool((res.w[1, 5:] == 0).all())
    for i in range(4):
        cols = active[i].nonzero().flatten()
        ref, _ = so.nnls(A[i][:, cols].numpy(), b[i].numpy())
        obj = ((A[i][:, cols] @ res.w[i, cols].double() - b[i]) ** 2).sum()
        obj_ref = ((A[i][:, cols] @ torch.from_numpy(ref) - b[i]) ** 2).sum()
        assert float(obj) <= float(obj_ref) * (1 + 1e-4) + 1e-9


def test_fit_values_matches_lstsq():
    g = _gen(5)
    P = torch.softmax(torch.randn(3, 50, 9, generator=g, dtype=torch.float64), -1)
    Y = torch.randn(3, 50, 6, generator=g, dtype=torch.float64)
    V0 = torch.randn(3, 9, 6, generator=g, dtype=torch.float64)
    C = fit_values(P, Y, V0)
    ref = torch.linalg.lstsq(P, Y).solution
    assert torch.allclose(C, ref, atol=1e-4, rtol=0)
    # a large ridge pulls the fit to the prior
    C_r = fit_values(P, Y, V0, ridge=1e6)
    assert torch.allclose(C_r, V0, atol=1e-3)
    with pytest.raises(ValueError, match="ridge"):
        fit_values(P, Y, V0, ridge=-1.0)


# ---------------------------------------------------------------------- targets
def test_targets_chunked_match_dense_with_bias():
    q, k, v = _structured(3, 97, 16, 17, seed=1)
    bias = torch.randn(3, 97, generator=_gen(2), dtype=torch.float64)
    bias[0, 10:20] = float("-inf")
    tg = attention_targets(q, k, v, bias, chunk=13)
    out, lse = _dense_attention(q, k, v, bias)
    assert torch.allclose(tg.out, out, atol=1e-12) and torch.allclose(tg.lse, lse, atol=1e-12)
    # a bias of log 2 is the same as the key being present twice
    k2, v2 = torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1)
    b1 = torch.zeros(3, 97, dtype=torch.float64)
    b1[:, 0] = math.log(2.0)
    a, b = attention_targets(q, k, v, b1), attention_targets(q, k2, v2)
    assert torch.allclose(a.out, b.out, atol=1e-12) and torch.allclose(a.lse, b.lse, atol=1e-12)


def test_targets_empty_problem_gives_minus_inf():
    q, k, v = _structured(2, 5, 8, 3, seed=4)
    bias = torch.zeros(2, 5, dtype=torch.float64)
    bias[1] = float("-inf")
    tg = attention_targets(q, k, v, bias)
    assert bool(torch.isneginf(tg.lse[1]).all()) and bool((tg.out[1] == 0).all())


# ---------------------------------------------------------------------- compaction math
@pytest.mark.parametrize("method", ["hak", "omp"])
def test_budget_equal_to_context_is_exact(method):
    q, k, v = _structured(3, 41, 16, 30, seed=6)
    bias = torch.randn(3, 41, generator=_gen(7), dtype=torch.float64)
    c = compact_heads(q, k, v, 41, bias=bias, method=method)
    assert torch.equal(c.keys, k) and torch.equal(c.values, v) and torch.equal(c.bias, bias.float())
    assert c.kept.tolist() == [41, 41, 41]
    held = _structured(3, 41, 16, 25, seed=8)[0]
    err = reconstruction_error(held, k, v, c, bias)
    assert err["out_rel"] < 1e-6 and err["lse_max"] < 1e-5


@pytest.mark.parametrize("method,t", [("hak", 12), ("hak", 40), ("omp", 12)])
def test_heldout_error_beats_top_attention_keys(method, t):
    q, k, v = _structured(3, 400, 16, 1500, seed=10)
    train, held = q[:, :1000], q[:, 1000:]
    c = compact_heads(train, k, v, t, method=method)
    base = top_attention_baseline(train, k, v, t)
    e_am, e_base = reconstruction_error(held, k, v, c), reconstruction_error(held, k, v, base)
    assert bool((c.kept <= t).all()) and bool((c.kept >= 1).all())
    assert e_am["out_rel"] < 0.8 * e_base["out_rel"], (e_am, e_base)
    assert e_am["lse_mae"] < 0.5 * e_base["lse_mae"], (e_am, e_base)


def test_float32_matches_float64():
    q, k, v = _structured(2, 300, 16, 600, seed=11)
    c64 = compact_heads(q, k, v, 20)
    c32 = compact_heads(q.float(), k.float(), v.float(), 20)
    e64 = reconstruction_error(q, k, v, c64)
    e32 = reconstruction_error(q.float(), k.float(), v.float(), c32)
    assert abs(e64["out_rel"] - e32["out_rel"]) < 0.02 and abs(e64["lse_mae"] - e32["lse_mae"]) < 0.02


def test_per_head_budgets_and_invalid_keys():
    q, k, v = _structured(4, 60, 8, 200, seed=12)
    bias = torch.zeros(4, 60, dtype=torch.float64)
    bias[2, 25:] = float("-inf")  # only 25 keys exist in problem 2
    bias[3] = float("-inf")  # an empty problem (0-channel head)
    c = compact_heads(q, k, v, torch.tensor([5, 17, 40, 9]), bias=bias)
    assert c.keys.shape[1] == 25
    assert bool((c.kept <= torch.tensor([5, 17, 25, 0])).all()) and int(c.kept[3]) == 0
    assert bool((c.index[2][c.index[2] >= 0] < 25).all())  # never picks a missing key
    assert bool(torch.isneginf(c.bias[0, 5:]).all())
    # problem 2 keeps its 25 keys exactly
    assert torch.equal(c.keys[2], k[2, :25]) and torch.equal(c.bias[2], bias[2, :25].float())


def test_input_errors():
    q, k, v = _structured(2, 10, 8, 5, seed=13)
    with pytest.raises(ValueError, match="method"):
        compact_heads(q, k, v, 3, method="random")
    with pytest.raises(ValueError, match="values"):
        compact_heads(q, k, v[:, :5], 3)
    with pytest.raises(ValueError, match="budget"):
        compact_heads(q, k, v, -1)


# ---------------------------------------------------------------------- models
def _tiny(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    Cfg, M = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    cfg = Cfg(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    return M(cfg).eval().float()


def _patch(model):
    if importlib.util.find_spec("leank.patching") is None:
        pytest.skip("leank.patching is not there yet (lead's patching)")
    import leank
    from leank.config import LeanKConfig
    from leank.masks import ChannelMask

    keep = torch.ones(2, 2, 16, dtype=torch.bool)
    keep[0, 1, 8:] = False  # a pruned head
    keep[1, 0] = False  # a 0-channel head: no archive to compact
    leank.patch(model, masks=ChannelMask(keep, align=8),
                config=LeanKConfig(sink=4, recent=16, flush_every=4, backend="reference"))
    from leank.patching import new_cache

    return new_cache


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_model_generates_after_compaction(kind):
    import leank

    model = _tiny(kind)
    new_cache = _patch(model)
    try:
        ids = torch.randint(0, 97, (1, 150), generator=_gen(14))
        nxt = torch.tensor([[5]])

        def prefilled():
            cache = new_cache(model)
            with torch.no_grad():
                model(ids, **{cache_kwarg(model): cache}, use_cache=True)
            return cache

        ref = model.generate(torch.cat([ids, nxt], 1), **{cache_kwarg(model): prefilled()}, max_new_tokens=6, do_sample=False)
        # budget = archived context: nothing changes, generation is identical
        cache = prefilled()
        arch = int(cache.layers[0].arch_len[0])
        cache = leank.compact(model, cache, budget=arch, input_ids=ids, progress=False)
        same = model.generate(torch.cat([ids, nxt], 1), **{cache_kwarg(model): cache}, max_new_tokens=6, do_sample=False)
        assert torch.equal(same, ref)
        # 10x compaction of the archive, then generation continues at the original positions
        cache = leank.compact(model, prefilled(), ratio=0.1, input_ids=ids, queries="repeat+gaussian", progress=False)
        assert 1 <= int(cache.layers[0].arch_len[0]) <= math.ceil(0.1 * arch)
        out = model.generate(torch.cat([ids, nxt], 1), **{cache_kwarg(model): cache}, max_new_tokens=6, do_sample=False)
        assert out.shape == (1, 157)
        # online: compact again later, carrying beta
        cache = leank.compact(model, cache, ratio=0.5, input_ids=out[:, :-1], method="omp", progress=False)
        bias = cache.layers[0].kernel_args()["arch_bias"]
        assert bias is not None and all(torch.isfinite(b[:, :, :1]).all() for b in bias)
        out2 = model.generate(out, **{cache_kwarg(model): cache}, max_new_tokens=3, do_sample=False)
        assert out2.shape == (1, 160)
    finally:
        leank.unpatch(model)


def test_compaction_matches_archive_attention_on_model_queries():
    """On a tiny Llama's own cache, held-out decode-style queries see a better archive than top-k keys."""
    import leank
    from leank.compaction import collect_queries

    model = _tiny("llama")
    new_cache = _patch(model)
    try:
        ids = torch.randint(0, 97, (1, 300), generator=_gen(15))
        cache = new_cache(model)
        with torch.no_grad():
            model(ids, **{cache_kwarg(model): cache}, use_cache=True)
        held = collect_queries(model, cache, ids, sources=("repeat_only",), max_queries_per_head=256, seed=99)
        k, v, b, al = (x.clone() for x in cache.layers[1].get_archive())
        L1 = int(al[0])
        k, v, b = k[0, :, :L1].double(), v[0, :, :L1].double(), b[0, :, :L1].double()
        qh = held[1][0].double()
        cache = leank.compact(model, cache, ratio=0.1, input_ids=ids, progress=False)
        ck, cv, cb, cl = cache.layers[1].get_archive()
        from leank.compaction import CompactedHeads

        comp = CompactedHeads(ck[0].double(), cv[0].double(), cb[0], torch.zeros(1), torch.zeros(1))
        e_am = reconstruction_error(qh[1:], k[1:], v[1:], CompactedHeads(comp.keys[1:], comp.values[1:], comp.bias[1:], None, None), b[1:])
        base = top_attention_baseline(qh[1:], k[1:], v[1:], int(cl[0]))
        e_base = reconstruction_error(qh[1:], k[1:], v[1:], base, b[1:])
        assert e_am["lse_mae"] < e_base["lse_mae"], (e_am, e_base)
    finally:
        leank.unpatch(model)


def test_plain_model_dynamic_cache_is_converted():
    import leank
    from leank.cache import LeanKCache
    from transformers import DynamicCache

    model = _tiny("qwen2")
    ids = torch.randint(0, 97, (1, 1400), generator=_gen(16))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{cache_kwarg(model): cache}, use_cache=True)
    out = leank.compact(model, cache, ratio=0.25, input_ids=ids, queries="repeat_only", max_queries_per_head=256, progress=False)
    assert isinstance(out, LeanKCache)
    assert 1 <= int(out.layers[0].arch_len[0]) <= math.ceil(0.25 * (1400 - 128 - 1024))
    assert int(out.layers[0].win_len[0]) == 128 + 1024
    assert cache.layers[0].keys.shape[2] == 1400  # the input cache is left as it was


def test_api_errors():
    import leank

    model = _tiny("llama")
    new_cache = _patch(model)
    try:
        ids = torch.randint(0, 97, (1, 60), generator=_gen(17))
        cache = new_cache(model)
        with torch.no_grad():
            model(ids, **{cache_kwarg(model): cache}, use_cache=True)
        arch = int(cache.layers[0].arch_len[0])
        for kw, name in [(dict(ratio=0.0), "ratio"), (dict(ratio=1.5), "ratio"), (dict(budget=arch + 1), "budget"),
                         (dict(queries="nonsense"), "queries"), (dict(method="x"), "method"),
                         (dict(per_head_budget=torch.ones(3, 3)), "per_head_budget")]:
            with pytest.raises(ValueError, match=name):
                leank.compact(model, cache, input_ids=ids, progress=False, **kw)
        with pytest.raises(ValueError, match="input_ids"):
            leank.compact(model, cache, progress=False)
        with pytest.raises(ValueError, match="past_key_values"):
            leank.compact(model, object(), input_ids=ids, progress=False)
        # silent before: the wrong context's queries, an emptied archive, a cache full of NaN
        L, kvh, d = len(cache.layers), cache.layers[0].num_kv_heads, cache.layers[0].head_dim
        for kw, msg in [(dict(input_ids=ids[:, :30]), r"input_ids: expected the integer tokens the cache holds, \[1, 60\]"),
                        (dict(input_ids=ids.float()), "input_ids: expected the integer tokens"),
                        (dict(input_ids=ids, attention_mask=torch.ones(1, 5)), "attention_mask: expected the shape"),
                        (dict(input_ids=ids, ridge=float("nan")), "ridge: expected a finite number"),
                        (dict(input_ids=ids, beta_ridge=float("inf")), "beta_ridge: expected a finite number"),
                        (dict(queries=[torch.zeros(1, kvh, 0, d)] * L), "queries: expected .* n >= 1"),
                        (dict(queries=[torch.full((1, kvh, 3, d), float("nan"))] * L), "queries: expected finite")]:
            with pytest.raises(ValueError, match=msg):
                leank.compact(model, cache, progress=False, **kw)
        short = new_cache(model)
        with torch.no_grad():
            model(ids[:, :8], **{cache_kwarg(model): short}, use_cache=True)
        with pytest.warns(UserWarning, match="the archive is empty"):
            leank.compact(model, short, input_ids=ids[:, :8], progress=False)
    finally:
        leank.unpatch(model)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match="model"):
        leank.compact(gpt, None, input_ids=torch.zeros(1, 3, dtype=torch.long))


# ---------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_targets_match_math_path_bf16():
    q, k, v = _structured(8, 3000, 128, 257, seed=18, dtype=torch.float32)
    bias = torch.randn(8, 3000, generator=_gen(19)) * 2
    bias[0, :100] = float("-inf")
    q, k, v = (x.cuda().bfloat16() for x in (q, k, v))
    for b in (None, bias.cuda()):
        fl = attention_targets(q, k, v, b)
        ref = attention_targets(q.double(), k.double(), v.double(), None if b is None else b.double())
        rel = (fl.out.double() - ref.out).norm() / ref.out.norm()
        assert float(rel) < 1e-2 and float((fl.lse.double() - ref.lse).abs().max()) < 2e-2


def test_cli_parser_and_missing_model_error(tmp_path):
    from leank.cli import build_parser, main

    args = build_parser().parse_args(["compact", "--model", str(tmp_path / "nope"), "--context", "a b c", "--ratio", "0.05"])
    assert args.command == "compact" and args.ratio == 0.05 and args.method == "hak"
    assert main(["compact", "--model", str(tmp_path / "nope"), "--context", "a b c"]) == 1  # logged, exit code 1


def test_half_precision_scores_rank_like_float64():
    from leank.compaction.core import hak_scores

    q, k, v = _structured(2, 500, 32, 300, seed=20)
    bias = torch.randn(2, 500, generator=_gen(21), dtype=torch.float64)
    scale = 1 / math.sqrt(32)
    lse = attention_targets(q, k, v, bias).lse
    ref = hak_scores(q, k, bias, lse, scale, chunk=128)
    half = hak_scores(q.bfloat16(), k.bfloat16(), bias.float(), lse.float(), scale, chunk=77)
    top_ref, top_half = ref.topk(25).indices, half.topk(25).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_ref, top_half)]
    assert min(overlap) >= 22, overlap
    assert torch.allclose(half.double(), ref.double(), rtol=0.1, atol=1e-3 * float(ref.max()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_attention_flash_split_matches_math_path():
    from leank.compaction.queries import _attend

    g = _gen(22)
    H, n, P, D = 8, 300, 1000, 128
    q = torch.randn(1, H, n, D, generator=g)
    k = torch.randn(1, H, P + n, D, generator=g)
    v = torch.randn(1, H, P + n, D, generator=g)
    bias = torch.randn(1, P + n, generator=g)
    bias[:, P:] = 0
    for b in (None, bias):
        ref = _attend(q.double(), k.double(), v.double(), None if b is None else b.double(), D ** -0.5, P)
        out = _attend(*(x.cuda().bfloat16() for x in (q, k, v)), None if b is None else b.cuda(), D ** -0.5, P)
        rel = (out.double().cpu() - ref).norm() / ref.norm()
        assert float(rel) < 1e-2, float(rel)


@pytest.mark.parametrize("patched", [False, True])
def test_record_queries_equal_self_pass_queries(patched):
    import leank
    from leank.compaction import record_queries
    from leank.compaction.queries import run_pass
    from transformers import DynamicCache

    model = _tiny("llama")
    new_cache = _patch(model) if patched else None
    try:
        ids = torch.randint(0, 97, (1, 90), generator=_gen(23))
        cache = new_cache(model) if patched else DynamicCache(config=model.config)
        with record_queries(model, every=3) as rec, torch.no_grad():
            model(ids[:, :50], **{cache_kwarg(model): cache}, use_cache=True)  # two prefill chunks
            model(ids[:, 50:], **{cache_kwarg(model): cache}, use_cache=True)
        assert model.config._attn_implementation == ("leank" if patched else "sdpa")
        got = rec.queries()  # [1, KVH, rep * m, D]
        pos = torch.cat([torch.arange(0, 50, 3), torch.arange(50, 90, 3)])
        ref = run_pass(model, ids[0], 0, pos)
        # the patched model's second chunk sees channel-pruned archived keys, so from layer 1
        # on its queries are its own (not the dense model's); layer 0 is identical either way
        for i in range(1 if patched else 2):
            assert torch.allclose(got[i][0], ref[i].reshape(2, -1, 16), atol=1e-5), i
        from leank.config import LeanKConfig

        out = leank.compact(model, cache, ratio=0.2, input_ids=ids, context_queries=got, progress=False,
                            config=LeanKConfig(sink=4, recent=16))
        assert 1 <= int(out.layers[0].arch_len[0]) <= math.ceil(0.2 * 70)
    finally:
        if patched:
            leank.unpatch(model)


def test_cli_end_to_end_on_a_saved_tiny_model(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from leank.cli import main

    words = [f"w{i}" for i in range(90)]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = _tiny("llama")
    model.save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    g = _gen(24)
    context = " ".join(words[int(i)] for i in torch.randint(0, 90, (300,), generator=g))
    rc = main(["compact", "--model", str(tmp_path), "--context", context, "--question", "w1 w2", "--ratio", "0.1",
               "--sink", "4", "--recent", "16", "--max-new-tokens", "3", "--device", "cpu", "--max-queries", "128"])
    out = capsys.readouterr().out
    assert rc == 0 and "compact:" in out and "MiB" in out, out


def test_ragged_batch_with_left_padding():
    import leank

    model = _tiny("qwen2")
    new_cache = _patch(model)
    try:
        ids = torch.randint(3, 97, (2, 160), generator=_gen(30))
        mask = torch.ones(2, 160, dtype=torch.long)
        mask[1, :40] = 0
        cache = new_cache(model)
        with torch.no_grad():
            model(ids, attention_mask=mask, **{cache_kwarg(model): cache}, use_cache=True)
        arch = cache.layers[0].arch_len.tolist()
        assert arch == [140, 100]
        cache = leank.compact(model, cache, ratio=0.1, input_ids=ids, attention_mask=mask, progress=False)
        after = cache.layers[0].arch_len.tolist()
        assert 1 <= after[0] <= 14 and 1 <= after[1] <= 10
        nxt = torch.tensor([[7], [7]])
        out = model.generate(torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                             **{cache_kwarg(model): cache}, max_new_tokens=3, do_sample=False)
        assert out.shape == (2, 164)
    finally:
        leank.unpatch(model)


def test_selection_registry_pluggable_and_listed():
    """compact_heads dispatches through the selection registry; the CLI lists its choices."""
    import argparse

    from leank import compaction_cli
    from leank.compaction import compact_heads, register_selection, selection_methods
    from leank.compaction import selection as S
    from leank.compaction.core import _take_top

    assert selection_methods()[:2] == ("hak", "omp")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, n, 16, generator=g, dtype=torch.float64) for n in (24, 40, 40))
    seen = []

    @register_selection("first_keys")
    def first(p):
        seen.append(p.t)
        return _take_top(-torch.arange(p.keys.shape[1], dtype=torch.float64).expand(p.keys.shape[0], -1), p.budget, p.t)

    try:
        out = compact_heads(q, k, v, 5, method="first_keys")
        assert seen == [5] and out.index.tolist() == [[0, 1, 2, 3, 4]] * 3
        sub = argparse.ArgumentParser().add_subparsers()
        parser = compaction_cli.add_parser(sub)
        method = next(a for a in parser._actions if a.dest == "method")
        assert "first_keys" in method.choices and {"hak", "omp"} <= set(method.choices)
    finally:
        S._METHODS.pop("first_keys")
    with pytest.raises(ValueError, match=r"method: expected one of \('hak', 'omp'"):
        compact_heads(q, k, v, 5, method="first_keys")


def test_leank_cache_from_dense_is_public():
    from transformers import DynamicCache

    from leank.compaction import leank_cache_from_dense
    from leank.config import LeanKConfig

    g = torch.Generator().manual_seed(0)
    dense = DynamicCache()
    for i in range(2):
        dense.update(torch.randn(1, 2, 50, 16, generator=g), torch.randn(1, 2, 50, 16, generator=g), i)
    lk = leank_cache_from_dense(dense, LeanKConfig(sink=4, recent=8, backend="reference"))
    assert lk.get_seq_length() == 50
    assert int(lk.layers[0].arch_len[0]) == 50 - 4 - 8
