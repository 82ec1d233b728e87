"""Multi-token steps on a LeanK cache through FlashAttention (issue 13) against the exact reference path.

The CPU runs torch's CPU flash kernel (same math, float32 accumulation); the ``gpu`` cases of the
cached-part, self-part and chunked-generate tests run on CUDA, where the same code calls the CUDA
flash kernel (bf16 and fp16; CUDA flash has no float32). The chunk-size and ragged second-call
tests against ``leank.verify`` are CPU (fp32) only.
"""

import pytest
import torch

import leank
import leank.attention as attn
from leank import LeanKConfig
from leank.cache import LeanKCache
from leank.masks import ChannelMask
from tests.oracle import sparse_keep, tiny_model

CFG = LeanKConfig(sink=4, recent=8, flush_every=4, backend="reference")
_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
# (device, dtype, tolerance)
CASES = [
    pytest.param("cpu", torch.float32, 2e-5, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, 2e-2, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, 2e-2, marks=_CUDA, id="cuda-bf16"),
    pytest.param("cuda", torch.float16, 4e-3, marks=_CUDA, id="cuda-fp16"),
]


def _filled_layer(lens, dtype, keep, seed=0, d=32, kvh=4, device="cpu"):
    """A layer holding ragged prompts of ``lens`` tokens (left padded), window + archive in use."""
    g = torch.Generator().manual_seed(seed)
    width = max(lens)
    k = torch.randn(len(lens), kvh, width, d, generator=g).to(device, dtype)
    v = torch.randn(len(lens), kvh, width, d, generator=g).to(device, dtype)
    valid = torch.zeros(len(lens), width, dtype=torch.bool, device=device)
    for i, n in enumerate(lens):
        valid[i, width - n:] = True
    cache = LeanKCache(ChannelMask(keep=keep, align=8), CFG)
    layer = cache.layers[0]
    layer.lazy_initialization(k, v)
    layer.store_chunk(k, v, valid)
    return layer


@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_cached_part_equals_reference(device, dtype, tol):
    keep = sparse_keep(1, 4, 32, seed=2)
    assert (keep.sum(-1) == 0).any()  # an all-pruned head: it must not see its archive
    layer = _filled_layer([1, 9, 30, 57], dtype, keep, device=device)
    assert layer.arch_len_host == [0, 0, 18, 45] and layer.win_len_host[0] == 1
    q = torch.randn(4, 8, 5, 32, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out, lse = attn.cached_attention_lse_flash(q, layer, 0.2)
    ref_out, ref_lse = attn.cached_attention_lse(q, layer, 0.2)
    assert (lse - ref_lse).abs().max() <= tol * 5
    assert (out - ref_out).abs().max() <= tol


def _chunk_oracle(q, k, v, valid, layer, scale):
    """float64 LeanK function of a chunk, built from the layer's raw storage: per sequence and query head,
    the window at full width, the archive with keys zero outside the head's kept channels plus its
    attention-matching bias (no archive for a head with no kept channel), and the chunk causally."""
    b, h, L, d = q.shape
    rep = h // layer.num_kv_heads
    out = torch.zeros(b, h, L, d, dtype=torch.float64)
    for s in range(b):
        w, a, n = layer.win_len_host[s], layer.arch_len_host[s], int(valid[s].sum())
        for qh in range(h):
            kv = qh // rep
            keys = [layer.win_k[s, kv, :w].double()]
            vals = [layer.win_v[s, kv, :w].double()]
            bias = [torch.zeros(w, dtype=torch.float64)]
            for g in layer.groups:
                for j, head in enumerate(g.heads.tolist()):
                    if head == kv:
                        full = torch.zeros(a, d, dtype=torch.float64)
                        full[:, g.chan[j]] = g.keys[s, j, :a].double()
                        keys.append(full)
                        vals.append(g.values[s, j, :a].double())
                        bias.append(g.bias[s, j, :a].double() if g.bias is not None else torch.zeros(a, dtype=torch.float64))
            K, V, B = torch.cat(keys), torch.cat(vals), torch.cat(bias)
            for i in range(L - n, L):  # the valid (left-padded) query rows
                mine = slice(L - n, i + 1)
                logits = torch.cat([q[s, qh, i].double() @ K.T * scale + B,
                                    q[s, qh, i].double() @ k[s, kv, mine].double().T * scale])
                p = torch.softmax(logits, 0)
                out[s, qh, i] = p @ torch.cat([V, v[s, kv, mine].double()])
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunk_with_attention_matching_bias_equals_the_float64_function(dtype, tol):
    """β on the archive (what ``leank.compact`` leaves): a multi-token chunk (left-padded, an all-pruned
    head, empty and full archives) takes the exact reference path and equals the LeanK function with
    the bias added to the archive logits, computed in float64 from the layer's raw storage."""
    keep = sparse_keep(1, 4, 32, seed=2)
    assert (keep.sum(-1) == 0).any()
    layer = _filled_layer([1, 9, 30, 57], dtype, keep)
    g = torch.Generator().manual_seed(4)
    for grp in layer.groups:
        grp.bias = torch.randn(grp.keys.shape[:3], generator=g) * 2.0  # float32 [batch, heads_d, capacity]
    q = torch.randn(4, 8, 5, 32, generator=g).to(dtype)
    k = torch.randn(4, 4, 5, 32, generator=g).to(dtype)
    v = torch.randn(4, 4, 5, 32, generator=g).to(dtype)
    valid = torch.ones(4, 5, dtype=torch.bool)
    valid[1, :2] = False  # left padding inside the chunk
    assert attn.fast_path_reason(q, layer) is not None  # β: the reference path, never FlashAttention
    out = attn.chunk_attention(q, k, v, valid, layer, 0.3)
    ref = _chunk_oracle(q, k, v, valid, layer, 0.3)
    m = valid[:, None, :, None].expand_as(out)
    assert (out.double()[m] - ref[m]).abs().max() <= tol
    # the bias matters: without it the same chunk gives a different answer
    for grp in layer.groups:
        grp.bias = torch.zeros_like(grp.bias)
    assert (attn.chunk_attention(q, k, v, valid, layer, 0.3).double()[m] - ref[m]).abs().max() > 10 * tol


@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_self_part_equals_reference(device, dtype, tol):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 8, 11, 32, generator=g).to(device, dtype)
    k = torch.randn(3, 2, 11, 32, generator=g).to(device, dtype)  # GQA 4
    v = torch.randn(3, 2, 11, 32, generator=g).to(device, dtype)
    valid = torch.ones(3, 11, dtype=torch.bool, device=device)
    valid[0, :4] = False
    valid[2, :10] = False  # one valid token
    out, lse = attn.chunk_self_attention_lse_flash(q, k, v, valid, 0.3)
    ref_out, ref_lse = attn.chunk_self_attention_lse(q, k, v, valid, 0.3)
    assert (lse[valid[:, None].expand_as(lse)] - ref_lse[valid[:, None].expand_as(lse)]).abs().max() <= tol * 5
    m = valid[:, None, :, None].expand_as(out)
    assert (out[m] - ref_out[m]).abs().max() <= tol


@pytest.mark.parametrize("device,dtype", [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, marks=_CUDA, id="cuda-bf16"),
    pytest.param("cuda", torch.float16, marks=_CUDA, id="cuda-fp16"),
])
@pytest.mark.parametrize("chunk", [2, 9, 16])
def test_chunked_generate_fast_path_matches_reference_path(monkeypatch, device, dtype, chunk):
    """A half-precision model, prompt prefilled in chunks (later chunks attend to the cache), ragged batch."""
    model = tiny_model("llama", init=0.05).to(device, dtype)
    keep = sparse_keep(2, 4, 32, seed=5)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 96, (2, 45), generator=g).to(device)
    am = torch.ones_like(ids)
    am[0, :13] = 0
    runs = {}
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(attn, "fast_path_reason", lambda q, layer: "forced for the test")
        calls = []
        real = attn.cached_attention_lse_flash
        monkeypatch.setattr(attn, "cached_attention_lse_flash",
                            lambda *a, _calls=calls, _real=real: _calls.append(1) or _real(*a))
        leank.patch(model, masks=ChannelMask(keep=keep, align=8), config=CFG)
        try:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=5, min_new_tokens=5,
                                     do_sample=False, prefill_chunk_size=chunk, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=0)
        finally:
            leank.unpatch(model)
        assert bool(calls) == fast
        runs[fast] = out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1).float()
    (seq_fast, fast_logits), (seq_ref, ref_logits) = runs[True], runs[False]
    scale = ref_logits.abs().max().item()
    assert scale > 0.5
    # greedy tokens in half precision: a near-tie may flip a token and part the rows; the logits agree
    # while a row's tokens agree, including the step that parts them
    for row in range(ids.shape[0]):
        differ = (seq_fast[row] != seq_ref[row]).nonzero()
        last = int(differ[0]) if len(differ) else seq_ref.shape[1] - 1
        err = (fast_logits[row, :last + 1] - ref_logits[row, :last + 1]).abs().max().item()
        assert err <= 0.03 * scale, (row, last, err, scale)


# ---------------------------------------------------------------- chunk sizes, ragged batches, a second call (issue 13)
SELF_BLOCK = 8  # QUERY_BLOCK forced small, so that "block + 1" is a chunk size worth testing
CHUNKS = [1, 2, 17, SELF_BLOCK + 1]


def _chunked_generate(model, ids, am, n, chunk, cache=None):
    """``chunk=None``: no prefill chunking (the new tokens go in as one step)."""
    from leank.patching import cache_kwarg, output_cache

    kw = {cache_kwarg(model): cache} if cache is not None else {}
    if chunk is not None:
        kw["prefill_chunk_size"] = chunk
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits, 1).float(), output_cache(out)


def _pieces(n, size, start=0):
    """``(start, end)`` ranges of ``size`` covering ``[start, n)``."""
    return [(s, min(s + size, n)) for s in range(start, n, size)]


def _row_oracle(model, keep, tokens, first, chunks):
    """The LeanK function's logits for one row: ``tokens[:first]`` prefilled, then ``chunks`` of the rest."""
    from leank.verify import oracle_logits

    return oracle_logits(model, keep, CFG.sink, CFG.recent, CFG.flush_every, tokens[:first], tokens[first:],
                         chunks=[(s - first, e - first) for s, e in chunks])


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_prefill_sizes_equal_the_leank_function(monkeypatch, chunk):
    """fp32 (exact reference path): a 40-token prompt prefilled in chunks of 1, 2, 17 and block + 1 (the
    chunks cross flushes of a sink 4 / recent 8 / flush_every 4 window), then decoding, equals the LeanK
    function fed the same chunks (``leank.verify``)."""
    monkeypatch.setattr(attn, "QUERY_BLOCK", SELF_BLOCK)
    monkeypatch.setattr(attn, "CHUNK_SCORE_ELEMENTS", 300)  # the cache side in many small blocks too
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32, seed=5)
    prompt = torch.randint(1, 96, (40,), generator=torch.Generator().manual_seed(11))
    leank.patch(model, masks=ChannelMask(keep=keep, align=8), config=CFG)
    try:
        seq, logits, _ = _chunked_generate(model, prompt[None], torch.ones(1, 40, dtype=torch.long), 6, chunk)
    finally:
        leank.unpatch(model)
    tokens = seq[0]
    pieces = _pieces(40, chunk)
    ref = _row_oracle(model, keep, tokens, pieces[0][1], pieces[1:])  # then one token per step
    first = pieces[0][1]
    assert (logits[0] - ref[40 - first:40 - first + 6]).abs().max() <= 2e-5


def test_chunked_ragged_batch_and_second_call_equal_the_leank_function(monkeypatch):
    """fp32: a left-padded batch (40 and 27 tokens) prefilled in chunks of 17, 5 tokens decoded, then a
    second ``generate`` on the returned cache with a 5-token follow-up (its 6 uncached tokens one
    multi-token step; not chunked: transformers 5.13's chunked prefill re-feeds the whole prompt
    even with a cache): every row equals the LeanK function of that row alone, fed the chunks
    transformers formed on the padded batch."""
    monkeypatch.setattr(attn, "QUERY_BLOCK", SELF_BLOCK)
    model = tiny_model("qwen2")
    keep = sparse_keep(2, 4, 32, seed=8)
    g = torch.Generator().manual_seed(12)
    lens, width, chunk, new1, new2 = [40, 27], 40, 17, 5, 4
    ids = torch.zeros(2, width, dtype=torch.long)
    am = torch.zeros_like(ids)
    for r, n in enumerate(lens):
        ids[r, width - n:] = torch.randint(1, 96, (n,), generator=g)
        am[r, width - n:] = 1
    follow = torch.randint(1, 96, (2, 5), generator=g)
    leank.patch(model, masks=ChannelMask(keep=keep, align=8), config=CFG)
    try:
        seq1, logits1, cache = _chunked_generate(model, ids, am, new1, chunk)
        ids2 = torch.cat([seq1, follow], 1)
        am2 = torch.cat([am, torch.ones(2, new1 + 5, dtype=am.dtype)], 1)
        seq2, logits2, cache2 = _chunked_generate(model, ids2, am2, new2, None, cache=cache)
    finally:
        leank.unpatch(model)
    assert cache2 is cache
    for r, n in enumerate(lens):
        pad = width - n
        tokens = seq2[r, pad:]  # the row alone: prompt, 5 generated, follow-up, 4 generated
        # transformers' chunks over the padded prompt, seen from the row (padding dropped)
        pieces = [(max(s, pad) - pad, e - pad) for s, e in _pieces(width, chunk) if e > pad]
        # turn 2 feeds the last generated token and the follow-up as one chunk, then decodes
        t2 = n + new1 - 1
        steps = pieces[1:] + [(i, i + 1) for i in range(n, t2)] + [(t2, t2 + 1 + 5)]
        ref = _row_oracle(model, keep, tokens, pieces[0][1], steps)
        first = pieces[0][1]
        got = torch.cat([logits1[r], logits2[r]])
        want = torch.cat([ref[n - first:n - first + new1], ref[t2 + 6 - first:t2 + 6 - first + new2]])
        assert (got - want).abs().max() <= 2e-5, r
