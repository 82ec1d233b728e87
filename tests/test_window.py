"""WindowPolicy: the window/archive rule the cache, training and eval share."""

import pytest

from leank.config import LeanKConfig
from leank.window import WindowPolicy


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 79, 80, 81, 97, 1000])
def test_split_matches_the_rule(n):
    p = WindowPolicy(sink=16, recent=64, flush_every=8)
    sink, arch, win = p.split(n)
    assert sink == min(16, n)
    assert arch == max(0, n - 16 - 64)
    assert sink + arch <= n and arch + win == n
    lo, hi = p.archive_range(n)
    assert (lo, hi - lo) == (sink, arch)
    idx = p.window_indices(n)
    assert len(idx) == win and not set(idx) & set(range(lo, hi))


def test_flush_and_capacity():
    p = WindowPolicy(sink=4, recent=10, flush_every=3)
    assert p.capacity == 17 and p.full_rows == 14
    assert not p.flush_due(12) and p.flush_due(13)
    assert p.flush_rows(12) == 0 and p.flush_rows(13) == 3


def test_defaults_are_the_config_defaults():
    c = LeanKConfig()
    assert WindowPolicy() == WindowPolicy.of(c) == WindowPolicy(c.sink, c.recent, c.flush_every)
    assert WindowPolicy().capacity == c.window_capacity


def test_cache_bytes():
    p = WindowPolicy(sink=2, recent=2)
    # 10 tokens: 4 in the window, 6 archived; heads keep 0 and 32 of 64 channels
    k, v = p.cache_bytes(10, [0, 32], 64, elem_bytes=2)
    assert k == (2 * 4 * 64 + 32 * 6) * 2
    assert v == (2 * 4 * 64 + 1 * 6 * 64) * 2
    assert WindowPolicy.archive_bytes_per_token([0, 32], 64, 2) == (32 + 64) * 2


@pytest.mark.parametrize("kw", [dict(sink=-1), dict(recent=1.5), dict(flush_every=0), dict(sink=0, recent=0)])
def test_invalid(kw):
    with pytest.raises(ValueError):
        WindowPolicy(**kw)
