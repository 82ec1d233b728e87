"""The shared LSE math (leank.tilelang_kernels.lse): parts merged by LSE equal attention over the union."""

import torch

from leank.tilelang_kernels.lse import merge_states, softmax_av


def test_parts_merge_to_the_whole_in_float64_with_empty_parts_and_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 37, generator=g, dtype=torch.float64) * 4
    v = torch.randn(3, 37, 11, generator=g, dtype=torch.float64)
    logits[1, :, 10:20] = float("-inf")  # an empty part for one problem
    logits[2, 4] = float("-inf")  # a row with no key at all
    whole_out, whole_lse = softmax_av(logits, v, "gnt,gtd->gnd")
    out = torch.zeros(3, 5, 11, dtype=torch.float64)
    lse = torch.full((3, 5), float("-inf"), dtype=torch.float64)
    for a, b in [(0, 10), (10, 20), (20, 36), (36, 37)]:  # awkward sizes, one part of one key
        out, lse = merge_states(out, lse, *softmax_av(logits[..., a:b], v[:, a:b], "gnt,gtd->gnd"))
    torch.testing.assert_close(out, whole_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, whole_lse, rtol=0, atol=1e-12)
    assert torch.isneginf(whole_lse[2, 4]) and torch.equal(whole_out[2, 4], torch.zeros(11, dtype=torch.float64))
    ref = torch.softmax(logits[0], -1) @ v[0]  # and the ordinary softmax where every key is there
    torch.testing.assert_close(whole_out[0], ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(whole_lse[0], torch.logsumexp(logits[0], -1), rtol=0, atol=1e-12)
