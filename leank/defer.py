"""Deferred stop decisions in a patched ``generate()`` on CUDA (``ENABLED``, on by default).

transformers' decoding loop (5.17 and later) decides after every token whether all sequences have
finished. Read directly, that flag makes the host wait for the GPU at every step, so the next step
is queued only after the host has run its own work between steps (input preparation, LeanK's
checks, the graph launch): on the H200 at Llama 32K x 1 the GPU idles about 0.46 ms per step by an
estimate from two runs (5.26 ms of kernels per step in ``eval/results/decode_profile_h200_plan.json``
against the 5.72 ms median step of ``e2e_decode_h200_capture_ab.json``). transformers' ``DeferredStopCheck`` copies
the flag asynchronously and reads it one step later instead, so the host queues step t+1 while
step t runs; when an end-of-sequence token stops the loop, the one step run too many is undone
with ``Cache.crop(-1)``. transformers turns it on for ``"mps"`` devices only.

Timed on the H200 (``eval/results/e2e_decode_h200_defer_ab.json``, Llama 32K, 64-step calls, one
device command): the median step fell from 5.70/5.80 ms to 5.52 ms at batch 1 and from 10.01 to
9.76 ms at batch 8; the GPU test ``test_deferred_stop_equals_synchronous_stop`` passed there.

A LeanK cache undoes its last step exactly (``LeanKLayer.is_croppable``, ``LeanKCache.crop``), so
with ``ENABLED`` (the default; ``False`` gives transformers' own choice back) LeanK lets transformers
defer the decision for LeanK caches on CUDA as well: ``install`` wraps
``DeferredStopCheck.is_supported`` (once per process, at the first patched ``generate``), and the
wrapper answers as transformers does for every other cache. With a transformers that has no
``DeferredStopCheck`` (5.13) nothing changes.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# On since timed on the H200 (e2e_decode_h200_defer_ab.json: -3 to -5% per step at b1, -2.5% at b8); tokens,
# logits and the returned cache are the same either way (tests/test_defer.py, tests/test_gpu_patch.py)
ENABLED = True
# devices LeanK defers on (transformers itself defers on "mps"; the tests add "cpu")
DEVICES = ("cuda",)

_installed: list = []  # [transformers' own is_supported] once installed


def install() -> bool:
    """Wrap ``transformers.generation.utils.DeferredStopCheck.is_supported`` once; returns whether
    this transformers has it (False: nothing to do, decisions are never deferred)."""
    if _installed:
        return True
    from transformers.generation import utils as gen_utils

    cls = getattr(gen_utils, "DeferredStopCheck", None)
    original = getattr(cls, "is_supported", None)
    if original is None:
        logger.debug("leank.defer: this transformers has no DeferredStopCheck; stop decisions are not deferred")
        return False

    from .cache import LeanKCache

    def is_supported(device, cache, cache_is_returned, is_assistant):
        if ENABLED and isinstance(cache, LeanKCache) and device.type in DEVICES and not is_assistant:
            return True  # the extra step at the end is undone exactly by LeanKCache.crop(-1)
        return original(device, cache, cache_is_returned, is_assistant)

    is_supported.__wrapped__ = original
    is_supported.__doc__ = original.__doc__
    cls.is_supported = staticmethod(is_supported)
    _installed.append(original)
    return True
