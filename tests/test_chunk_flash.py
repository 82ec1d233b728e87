"""Multi-token steps on a LeanK cache through FlashAttention (issue 13) against the exact reference path.

The CPU runs torch's CPU flash kernel (same math, float32 accumulation); the ``gpu`` cases run
the same checks on CUDA, where the same code calls the CUDA flash kernel (bf16 and fp16; CUDA
flash has no float32).
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
def test_chunked_generate_fast_path_matches_reference_path(monkeypatch, device, dtype):
    """A half-precision model, prompt prefilled in chunks of 16 (later chunks attend to the cache), ragged batch."""
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
                                     do_sample=False, prefill_chunk_size=16, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=0)
        finally:
            leank.unpatch(model)
        assert bool(calls) == fast
        runs[fast] = torch.stack(out.logits, 1).float()
    scale = runs[False].abs().max().item()
    assert scale > 0.5
    assert (runs[True] - runs[False]).abs().max().item() <= 0.03 * scale
