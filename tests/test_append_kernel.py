"""The decode window append (leank.append_kernel): the one-launch CUDA kernel equals the PyTorch reference."""

import pytest
import torch

from leank.append_kernel import append_rows_, append_rows_reference


def _state(b, h, w, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    win_k = torch.randn(b, h, w, d, generator=g).to(device, dtype)
    win_v = torch.randn(b, h, w, d, generator=g).to(device, dtype)
    lens = torch.randint(0, w - 3, (b,), generator=g, dtype=torch.int32).to(device)
    # the step's rows as the model produces them: [b, 1, h, d] transposed (not contiguous)
    key = torch.randn(b, 1, h, d, generator=g).to(device, dtype).transpose(1, 2)
    value = torch.randn(b, 1, h, d, generator=g).to(device, dtype).transpose(1, 2)
    return win_k, win_v, lens, key, value


def test_reference_writes_each_sequence_at_its_length():
    win_k, win_v, lens, key, value = _state(3, 2, 9, 8, torch.float32, "cpu")
    before_k, before_v, before_len = win_k.clone(), win_v.clone(), lens.clone()
    append_rows_reference(win_k, win_v, lens, key, value)
    assert torch.equal(lens, before_len + 1)
    for b in range(3):
        p = int(before_len[b])
        assert torch.equal(win_k[b, :, p], key[b, :, 0]) and torch.equal(win_v[b, :, p], value[b, :, 0])
        others = [t for t in range(9) if t != p]
        assert torch.equal(win_k[b, :, others], before_k[b, :, others])
        assert torch.equal(win_v[b, :, others], before_v[b, :, others])


def test_cpu_falls_back_to_the_reference():
    a = _state(2, 3, 7, 16, torch.float32, "cpu", seed=1)
    b = [t.clone() for t in a]
    append_rows_(*a)
    append_rows_reference(*b)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,h,d", [(1, 8, 128), (5, 4, 128), (3, 7, 64), (2, 1, 64), (9, 28, 128)])
def test_kernel_equals_reference_and_replays_in_a_graph(dtype, b, h, d):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    a = _state(b, h, 40, d, dtype, "cuda", seed=b + h + d)
    r = [t.clone() for t in a]
    from leank.append_kernel import _triton_kernel, _triton_ok

    assert _triton_kernel() is not None and _triton_ok(*a), "the Triton kernel must run here, not the reference"
    append_rows_(*a)
    append_rows_reference(*r)
    assert all(torch.equal(x, y) for x, y in zip(a, r))
    # recorded once, replayed three times: three more rows per sequence, each at the length of its replay
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            append_rows_(*a)
    # (recording executes nothing: `a` still equals `r`)
    for _ in range(3):
        graph.replay()
        append_rows_reference(*r)
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(a, r))
