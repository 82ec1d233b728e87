"""``leank.defer``: transformers' deferred stop decision for LeanK caches.

transformers' ``DeferredStopCheck`` needs device events, which the CPU backend lacks; these tests stand
in a no-op event (on the CPU every operation has finished when it returns, so waiting on nothing is
exact) and let ``leank.defer`` defer on the CPU, to check what deferring changes in a patched
``generate``: nothing in the tokens, the logits or the returned cache, also when an end-of-sequence
token stops the loop one step late and that step is undone, eagerly and through the emulated capture
runner. On CUDA the same is checked in ``tests/test_gpu_patch.py``.
"""

import pytest
import torch

import leank
from leank import LeanKConfig, defer
from leank.masks import ChannelMask
from leank.patching import cache_kwarg, output_cache
from tests.oracle import sparse_keep, tiny_model

CFG = dict(sink=4, recent=8, flush_every=4, backend="reference", compile_decode=False)


def _has_deferred_stop() -> bool:
    from transformers.generation import utils as gen_utils

    return hasattr(gen_utils, "DeferredStopCheck")


pytestmark = pytest.mark.skipif(not _has_deferred_stop(), reason="this transformers has no DeferredStopCheck")


class _NoEvent:
    """``torch.Event`` for the CPU: every operation has completed when it returns."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def deferring(monkeypatch):
    """Deferral on for LeanK caches on the CPU; returns the list of stop checks generate built."""
    from transformers.generation import utils as gen_utils

    monkeypatch.setattr(torch, "Event", _NoEvent)
    monkeypatch.setattr(defer, "DEVICES", ("cpu",))
    built = []
    real = gen_utils.DeferredStopCheck.__init__

    def init(self, *args, **kwargs):
        built.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(gen_utils.DeferredStopCheck, "__init__", init)
    return built


def _generate(model, ids, am, n, eos=None, cache=None, **kw):
    extra = {} if cache is None else {cache_kwarg(model): cache}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, eos_token_id=eos, **extra, **kw)
    return out.sequences, torch.stack(out.logits, 1), output_cache(out)


def _conversation(model, keep, ids, am, eos, capture):
    """A call stopped by ``eos`` (or by its length), then a second call continuing the returned cache."""
    leank.patch(model, masks=ChannelMask(keep=keep, align=8), config=LeanKConfig(**CFG, capture=capture))
    model._leank.emulate_capture = capture
    try:
        seq1, logits1, cache = _generate(model, ids, am, 12, eos=eos)
        seen = cache.get_seq_length()
        follow = torch.randint(1, 96, (ids.shape[0], 3), generator=torch.Generator().manual_seed(7))
        ids2 = torch.cat([seq1, follow], 1)
        am2 = torch.cat([am, torch.ones(ids.shape[0], ids2.shape[1] - am.shape[1], dtype=am.dtype)], 1)
        seq2, logits2, _ = _generate(model, ids2, am2, 9, cache=cache)
    finally:
        leank.unpatch(model)
    return seq1, logits1, seen, seq2, logits2


@pytest.mark.parametrize("capture", [False, True], ids=["eager", "emulated-capture"])
def test_deferred_stop_changes_nothing_but_when_the_host_waits(deferring, monkeypatch, capture):
    """Stopped by an end-of-sequence token (one step run too many, then undone with ``crop(-1)``) and by the
    length: the same tokens, logits and cache length as without deferral, and a second call continuing the
    returned cache gives the same tokens and logits (the undone step left nothing behind)."""
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32)
    ids = torch.randint(1, 96, (1, 30), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    monkeypatch.setattr(defer, "ENABLED", False)
    free, _, _ = _generate(leank.patch(model, masks=ChannelMask(keep=keep, align=8), config=LeanKConfig(**CFG)),
                           ids, am, 12)
    leank.unpatch(model)
    from leank.cache import LeanKCache

    crops, undone_flushes = [], []
    real_crop = LeanKCache.crop

    def crop(self, n):
        crops.append(n)
        if n == -1:  # did the step being undone move rows to the archive (a flush)?
            undone_flushes.append(any(r.get("moved", 0) > 0 for r in self.layers[0]._rollback.values()))
        return real_crop(self, n)

    monkeypatch.setattr(LeanKCache, "crop", crop)
    # an EOS at the 5th..8th new token stops the loop early; flush_every=4, so one of the steps run too many flushes
    stops = [int(free[0, ids.shape[1] + i]) for i in (4, 5, 6, 7)] + [None]
    for stop in stops:
        monkeypatch.setattr(defer, "ENABLED", False)
        base = _conversation(model, keep, ids, am, stop, capture)
        assert not deferring and not crops
        monkeypatch.setattr(defer, "ENABLED", True)
        got = _conversation(model, keep, ids, am, stop, capture)
        assert len(deferring) == 2, "both calls deferred their stop decision"
        deferring.clear()
        # crop(0) after each step that did not stop; at the end crop(-1) undoes the step an EOS stop ran too many
        assert set(crops) <= {0, -1} and crops.count(-1) == (1 if stop is not None else 0), crops
        crops.clear()
        if stop is not None:
            assert got[0].shape[1] < ids.shape[1] + 12, "the EOS stopped the first call early"
        assert got[2] == base[2], "the cache holds the same tokens (the extra step was undone)"
        for a, b in zip(got[:2] + got[3:], base[:2] + base[3:]):
            if a.dtype == torch.long:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert any(undone_flushes) and not all(undone_flushes), undone_flushes  # an undone flush step, and a plain one


def test_other_caches_and_the_switch(deferring, monkeypatch):
    """A dense cache keeps transformers' answer (not deferred on the CPU), and so does a LeanK cache while
    ``ENABLED`` is off; an assistant never defers."""
    from transformers import DynamicCache
    from transformers.generation.utils import DeferredStopCheck

    from leank.cache import LeanKCache

    assert defer.install()
    model = tiny_model("llama")
    leank.patch(model, masks=ChannelMask(keep=sparse_keep(2, 4, 32), align=8), config=LeanKConfig(**CFG))
    try:
        cache = leank.new_cache(model)
    finally:
        leank.unpatch(model)
    assert isinstance(cache, LeanKCache)
    cpu = torch.device("cpu")
    monkeypatch.setattr(defer, "ENABLED", True)
    assert DeferredStopCheck.is_supported(cpu, cache, True, is_assistant=False)
    assert not DeferredStopCheck.is_supported(cpu, cache, True, is_assistant=True)
    assert not DeferredStopCheck.is_supported(cpu, DynamicCache(), True, is_assistant=False)
    monkeypatch.setattr(defer, "DEVICES", ("cuda",))
    assert not DeferredStopCheck.is_supported(cpu, cache, True, is_assistant=False)
    monkeypatch.setattr(defer, "DEVICES", ("cpu",))
    monkeypatch.setattr(defer, "ENABLED", False)
    assert not DeferredStopCheck.is_supported(cpu, cache, True, is_assistant=False)


def test_on_by_default():
    assert defer.ENABLED is True  # timed on the H200: eval/results/e2e_decode_h200_defer_ab.json
