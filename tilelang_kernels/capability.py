"""What the TileLang decode kernel supports, answered without importing TileLang.

:func:`supports` is what ``backend="auto"`` consults before choosing the kernel, and what
:func:`tilelang_kernels.decode.decode_attention` checks (once per layout) before it
compiles or runs anything. The constants below are the kernel family's limits; the kernel
module (``decode_kernels``) imports them from here, so the check and the kernel cannot
disagree.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Iterable, Optional

import torch

log = logging.getLogger(__name__)

#: head sizes the kernel family is built for
HEAD_DIMS = (64, 128)
#: element types of q and the K/V caches
DTYPES = (torch.float16, torch.bfloat16)
#: kept counts are compile-time tile widths: multiples of this, up to head_dim
KEPT_ALIGN = 16
#: query heads of one KV head share one query-row tile of at most this many rows
BLOCK_H = 64
#: distinct kept counts (archive slots) one compiled kernel serves
MAX_SLOTS = 8
#: the kernels are built for sm_90a (TMA + wgmma); arch-specific code runs on 9.0 only
SM_ARCH = (9, 0)


@functools.lru_cache(maxsize=None)
def _tilelang_import_error() -> Optional[str]:
    """None when ``import tilelang`` works, else the error (tried once per process)."""
    try:
        importlib.import_module("tilelang")
    except Exception as e:  # ImportError, or a broken CUDA/TVM install raising anything
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return tuple(torch.cuda.get_device_capability(index))


def _as_device(device) -> tuple:
    """``(type, index)`` of a ``torch.device``, a string or any object with ``.type``."""
    if isinstance(device, str):
        device = torch.device(device)
    kind = getattr(device, "type", None)
    if not isinstance(kind, str):
        raise ValueError(f"device: expected a torch.device or a device string, got {device!r}")
    return kind, getattr(device, "index", None)


def _flat_counts(kept_counts) -> list:
    if isinstance(kept_counts, torch.Tensor):
        return [int(x) for x in kept_counts.flatten().tolist()]
    out = []
    for x in kept_counts:
        if isinstance(x, (list, tuple, torch.Tensor)):
            out.extend(_flat_counts(x))
        else:
            out.append(int(x))
    return out


def supports(*, device, dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int,
             kept_counts: Iterable[int]) -> str | None:
    """Whether the TileLang decode kernel can run a call: None if it can, else why not.

    Args:
        device: where q and the caches live: a ``torch.device``, a string such as
            ``"cuda:0"``, or any object with ``.type`` (and ``.index``). The SM version is
            queried only when the type is ``"cuda"`` and CUDA is available.
        dtype: element type of q and the K/V caches (float16 or bfloat16).
        head_dim: channels per head (64 or 128).
        num_heads, num_kv_heads: query and KV heads of the layer (``num_heads //
            num_kv_heads`` query heads per KV head, at most ``BLOCK_H``).
        kept_counts: kept K channels per KV head (0 = the head has no archive), of one layer
            or of every layer (a nested list or a tensor of any shape is flattened). Each is
            a multiple of 16 up to ``head_dim``, at most ``MAX_SLOTS`` distinct nonzero ones.

    Returns:
        None when the kernel supports the call, else a short reason for a log line or an
        error message; several cheap reasons are joined with ``"; "``. TileLang's import
        and the SM version are checked only when everything else is supported.

    ``decode_attention`` itself still runs kept counts that are not multiples of 16, by
    zero-padding that group's K on every call (a copy of the group per step); this check
    reports them so that ``backend="auto"`` does not take that slow path silently.
    """
    dev_type, dev_index = _as_device(device)
    reasons = []
    if dev_type != "cuda":
        reasons.append(f"CUDA device required (got {dev_type})")
    if dtype not in DTYPES:
        name = str(dtype).replace("torch.", "")
        reasons.append(f"dtype {name} not supported (needs float16 or bfloat16)")
    if head_dim not in HEAD_DIMS:
        reasons.append(f"head_dim {head_dim} not supported ({' or '.join(map(str, HEAD_DIMS))})")
    if num_kv_heads < 1 or num_heads < 1 or num_heads % num_kv_heads:
        reasons.append(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    elif num_heads // num_kv_heads > BLOCK_H:
        reasons.append(f"GQA group of {num_heads // num_kv_heads} query heads per KV head exceeds "
                       f"the kernel's block_H {BLOCK_H}")
    counts = _flat_counts(kept_counts)
    bad_range = sorted({c for c in counts if c < 0 or c > head_dim})
    if bad_range:
        reasons.append(f"kept count {bad_range[0]} outside 0..head_dim {head_dim}")
    bad_align = sorted({c for c in counts if c % KEPT_ALIGN and 0 <= c <= head_dim})
    if bad_align:
        reasons.append(f"kept count {bad_align[0]} not a multiple of {KEPT_ALIGN}")
    distinct = {c for c in counts if c > 0}
    if len(distinct) > MAX_SLOTS:
        reasons.append(f"{len(distinct)} distinct kept counts, more than MAX_SLOTS {MAX_SLOTS}")
    if reasons:
        return "; ".join(reasons)
    err = _tilelang_import_error()
    if err is not None:
        return f"tilelang not importable ({err})"
    if torch.cuda.is_available():
        index = dev_index if dev_index is not None else torch.cuda.current_device()
        cap = _capability(index)
        if cap != SM_ARCH:
            return (f"sm_{cap[0]}{cap[1]} not supported (kernels are built for "
                    f"sm_{SM_ARCH[0]}{SM_ARCH[1]}a: H100/H200)")
    return None
