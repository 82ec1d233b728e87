"""CI (CPU): every decode-kernel variant the Llama-3.1-8B and Qwen2.5-7B shapes need compiles.

TileLang lowers the kernels and nvcc builds them for ``sm_90a``; no GPU is used. The
variants: (32 q / 8 kv heads) and (28 / 4), head_dim 128, bf16 and fp16, the default slot
set of the published masks (kept counts 32, 64, 96 -> slots 32, 64, 96, 128), with and
without the attention-matching bias. Skipped with a reason when tilelang or nvcc is
missing.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("tilelang") is None, reason="tilelang is not installed"),
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH"),
]

SHAPES = {"llama-3.1-8b": (32, 8), "qwen2.5-7b": (28, 4)}
VARIANTS = [(m, dt, bias) for m in SHAPES for dt in (torch.bfloat16, torch.float16) for bias in (False, True)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh TileLang cache, so that the test really lowers and runs nvcc."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("tilelang-cache")
    mp.setenv("TILELANG_CACHE_DIR", str(path))
    yield path
    mp.undo()


def test_default_slots_of_published_masks():
    from tilelang_kernels.decode import default_slot_dims

    assert default_slot_dims(128, [32, 64, 96]) == (32, 64, 96, 128)
    assert default_slot_dims(128, [16, 32]) == tuple(range(16, 129, 16))


@pytest.mark.parametrize("model,dtype,bias", VARIANTS, ids=[f"{m}-{str(d)[6:]}-{'bias' if b else 'nobias'}" for m, d, b in VARIANTS])
def test_compile_sm90a(cache_dir, model, dtype, bias):
    from tilelang_kernels import decode as dec

    heads, kv = SHAPES[model]
    dec._kernels.clear()
    split, combine = dec.get_kernels(heads, kv, 128, dtype, dec.default_slot_dims(128, [32, 64, 96]), bias)
    src = split.get_kernel_source()
    assert "wgmma" in src and "tma_load" in src, "expected the SM90 path (wgmma + TMA)"
    assert "combine" in combine.get_kernel_source()
