"""LeanK decode attention on CUDA through TileLang: plan once per layout, two launches per call.

``decode_attention`` has the signature and semantics of
:func:`tilelang_kernels.reference.decode_attention_reference`. TileLang is imported on
first use, never at import time.

How a call runs:

* **plan** (cached per batch size, window capacity, dtype, device and group layout,
  i.e. per layer layout; built on the CPU, once): a work table with one row per
  (KV head, segment, split), where a segment is the head's full window or its row in an
  archive group. Splits per segment are chosen from the SM count and weighted by bytes
  per token (``d + head_dim`` for an archive row), so blocks carry similar loads. Lengths
  are *not* part of the plan: each block reads ``win_len``/``arch_len`` on the device.
* **run**: launch 1 walks the table (one block per row and sequence) and writes float32
  partial outputs and LSEs; launch 2 merges them per query head. Nothing is synchronised
  with the host. (A one-launch variant, where the last block of each (sequence, KV head)
  merged the parts, was measured 1.0-2.6x slower on the H200 and removed:
  ``eval/results/kernel_bench_h200_plan_ab.log``.)

Kernels are compiled once per (num_heads, num_kv_heads, head_dim, dtype, slot set, bias
flag) and kept in TileLang's disk cache (about 25 s cold on the GPU machine, 20-40 s on a
2-core CPU). The slot set is by default every multiple of 32 up to ``head_dim`` when the
layer's kept counts are multiples of 32 (the published masks: one compile serves every
layer), else every multiple of 16; ``slot_dims=`` overrides it. Kept counts that are not
multiples of 16 are zero-padded per call (correct, slower, logged once).

What the kernel supports (CUDA on sm_90a, fp16/bf16, head_dim 64 or 128, kept counts in
steps of 16, at most 64 query heads per KV head) is answered by
:func:`tilelang_kernels.capability.supports` without importing TileLang; this function
raises ``ValueError`` with that reason for anything else (except kept counts that are not
multiples of 16, which it pads as said above).

Requirements beyond the reference: CUDA tensors; ``q``, window and archive tensors
contiguous; rows at and past the lengths must hold finite values (as for the reference,
whose ``0 * NaN`` would also poison the result). ``arch_heads`` are read on the host: keep
them on the CPU to avoid a device sync per call (they are tiny and static per layer);
keep ``arch_chan`` on the device (int64) to avoid a copy per call.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .capability import supports
from .reference import validate_decode_inputs

log = logging.getLogger(__name__)
Tensor = torch.Tensor

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_TARGET = {"kind": "cuda", "arch": "sm_90a"}
_lock = threading.Lock()
_kernels: dict = {}
_combines: dict = {}  # the combine kernel depends on fewer inputs than the split: shared by every slot set
_plans: dict = {}
_dummies: dict = {}
_sms: dict = {}
_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


# ----------------------------------------------------------------------------- compile


def default_slot_dims(head_dim: int, dims: Sequence[int] = ()) -> tuple:
    """Kept counts the kernel is compiled for by default.

    Every multiple of ``align`` up to ``head_dim``, with ``align = 32`` when all ``dims``
    are multiples of 32 (the published masks: one compile serves every layer) and 16
    otherwise. Each slot costs compile time (about 10 s), none at run time.
    """
    align = 32 if all(x % 32 == 0 for x in dims) else 16
    return tuple(range(align, head_dim + 1, align))


def call_slot_dims(head_dim: int, dims: Sequence[int]) -> tuple:
    """Slot set a call compiles for, given its archive groups' kept counts ``dims``
    (after padding to 16): ``default_slot_dims``, or the groups' own counts when two
    groups share a count or a count is not in the default set."""
    slots = default_slot_dims(head_dim, dims)
    if len(set(dims)) != len(dims) or any(x not in slots for x in dims):
        slots = tuple(sorted(dims))
    return slots


def get_kernels(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                slot_dims: tuple, has_bias: bool, target: Optional[dict] = None,
                config: Optional[dict] = None):
    """Compiled ``(split, combine)`` kernels for one layout class (in-process + disk cache).

    ``target`` defaults to SM90 (``{"kind": "cuda", "arch": "sm_90a"}``); compiling needs
    nvcc but no GPU. ``config`` overrides the split kernel's tile config
    (``decode_kernels.default_config(head_dim, num_heads // num_kv_heads)``: ``block_N``,
    ``block_H``, ``num_stages``, ``threads``)
    and may carry ``combine_vector`` (1 or 4), the combine kernel's channels per thread,
    ``combine_chunked`` (default True unless ``combine_vector`` is 4: ``decode_kernels.combine_kernel_chunked``,
    a block per 32 channels; False: ``combine_kernel``, a block per query head), and
    ``pdl=True`` (both kernels launched as programmatic dependents; experiment).
    """
    key = (num_heads, num_kv_heads, head_dim, dtype, tuple(slot_dims), bool(has_bias),
           tuple(sorted((config or {}).items())))
    with _lock:
        hit = _kernels.get(key)
    if hit is not None:
        return hit
    import tilelang

    from . import decode_kernels as dk

    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected float16 or bfloat16, got {dtype}")
    tgt = dict(target or _TARGET)
    cfg = {**dk.default_config(head_dim, num_heads // num_kv_heads), **(config or {})}
    vector = cfg.pop("combine_vector", 1)
    # the chunked combine (a block per 32 channels) unless the per-head kernel's float4 lanes are asked for
    chunked = bool(cfg.pop("combine_chunked", vector == 1))
    pdl = bool(cfg.get("pdl", False))
    name = _DTYPES[dtype]
    split = tilelang.compile(
        dk.split_kernel(num_heads, num_kv_heads, head_dim, tuple(slot_dims), name, bool(has_bias), **cfg),
        target=tgt, pass_configs=dk.PASS_CONFIGS)
    ckey = (num_heads, num_kv_heads, head_dim, name, vector, chunked, pdl, tuple(sorted(tgt.items())))
    with _lock:
        combine = _combines.get(ckey)
    if combine is None:  # compiled once: a second tilelang.compile of it would only log TileLang's cache warning
        if chunked:
            func = dk.combine_kernel_chunked(num_heads, num_kv_heads, head_dim, name, pdl=pdl)
        else:
            func = dk.combine_kernel(num_heads, num_kv_heads, head_dim, name, vector=vector, pdl=pdl)
        combine = tilelang.compile(func, target=tgt, pass_configs=dk.PASS_CONFIGS)
    with _lock:
        combine = _combines.setdefault(ckey, combine)
        _kernels[key] = (split, combine)
    return split, combine


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class DecodePlan:
    """Per-layout launch metadata (device tensors + sizes), reusable across steps.

    table: int32 ``[num_items, 6]`` rows ``(slot, row, kv_head, split, nsplit, part)``.
    nparts: int32 ``[num_kv_heads]``, parts written per KV head; ``num_parts`` their max.
    group_slot: the kernel slot of each archive group (``-1`` for an empty group).
    """

    table: Tensor
    nparts: Tensor
    num_parts: int
    num_items: int
    group_slot: tuple
    slot_dims: tuple


def num_sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sms:
        _sms[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sms[idx]


# measurement knob (eval/kernel_bench.py --blocks-per-sm); None: the rule in choose_splits
BLOCKS_PER_SM: Optional[int] = None
# measurement knob (eval/kernel_bench.py --block-h / --num-stages / --combine-vector): tile config
# override, e.g. {"block_H": 64} (query rows per block: 64 is one wgmma tile, which a 4- or 7-head
# GQA group mostly pads; the default is the smallest of 16/32/64 that holds the group),
# {"num_stages": 3} (K/V tiles in flight per block), {"combine_vector": 4} (the combine's lanes
# over parts), {"combine_chunked": False} (a combine block per query head, not per 32 channels), {"pdl": True}
# (programmatic dependent launch of both kernels); None:
# decode_kernels.default_config
TILE_CONFIG: Optional[dict] = None
# no split shorter than this many K/V tiles of its segment's capacity: fewer, longer splits for short
# contexts (less per-block set-up, fewer parts to merge). 4 was measured on the H200 (Qwen 8K x 1:
# 20.4 -> 16.9 us, nothing slower; eval/results/kernel_bench_h200_plan_ab.log); eval/kernel_bench.py
# --min-split-tiles overrides it, 0 turns it off
DEFAULT_MIN_SPLIT_TILES = 4
MIN_SPLIT_TILES: int = DEFAULT_MIN_SPLIT_TILES


# measurement knob (eval/kernel_bench.py --split-rule): "window" (default) gives the window up to one
# split per 4 tiles of its capacity and the archive rows the rest of the budget; "bytes" gives every
# segment splits in proportion to its bytes at capacity, so all blocks carry about the same load.
# Under "window" the window blocks of a 32K context carry about a quarter of an archive block's bytes,
# and at batch 1 (one wave of blocks) the kernel lasts as long as the heaviest blocks: ncu showed SMs
# idle up to 48% below the average active cycles (eval/results/ncu_split_h200_llama32k_b1.txt)
SPLIT_RULES = ("window", "bytes")
SPLIT_RULE: str = "window"


def default_blocks_per_sm(batch: int) -> int:
    """Thread blocks per SM a plan aims for at ``batch`` sequences (see ``choose_splits``)."""
    return 2 if batch <= 2 else 3 if batch <= 8 else 4


def choose_splits(batch: int, head_dim: int, win_cap: int, kept: Sequence[int], sms: int,
                  block_n: int = 64, max_split: int = 96, blocks_per_sm: Optional[int] = None,
                  arch_caps: Optional[Sequence[int]] = None) -> tuple:
    """Splits per segment: ``(window_splits, [archive splits per KV head])``.

    ``kept[h]`` is the kept count of KV head ``h`` (0 = no archive). At batch <= 2 the plan
    aims for 2 blocks per SM, all blocks of a step in one wave (latency); above that for 3 up
    to batch 8 and 4 beyond (the blocks that finish first take the next ones: load balance).
    Measured on the H200: 3 beat 4 at batch 8 (Qwen 32K x 8 94.8 -> 88.9 us,
    ``kernel_bench_h200_plan_ab.log``) and lost at batch 32 (Qwen 32K x 32 306 -> 354 us,
    ``kernel_bench_h200.json`` before and after). The window
    (short, full width) gets up to one split per 4 tiles of its capacity, the archive rows
    share the rest in proportion to their bytes per token (``d + head_dim``). With
    ``arch_caps`` (archive capacity per KV head, tokens) no split is shorter than
    ``MIN_SPLIT_TILES`` tiles of its segment's capacity. At least one split each; at most
    ``max_split`` (parts per head stay <= 128 for the combine kernel). ``SPLIT_RULE = "bytes"``
    (with ``arch_caps``) replaces the window/archive division by ``_byte_balanced_splits``.
    """
    blocks_per_sm = blocks_per_sm or BLOCKS_PER_SM or default_blocks_per_sm(batch)
    budget = max(1, (blocks_per_sm * sms) // max(1, batch))
    kvh = len(kept)
    weights = [(d + head_dim) / (2 * head_dim) for d in kept if d > 0]
    if not weights:
        win = max(1, min(math.ceil(win_cap / block_n), budget // kvh, max_split))
        return win, [0] * kvh
    if SPLIT_RULE not in SPLIT_RULES:
        raise ValueError(f"SPLIT_RULE: expected one of {SPLIT_RULES}, got {SPLIT_RULE!r}")
    if SPLIT_RULE == "bytes" and arch_caps is not None:
        return _byte_balanced_splits(budget, head_dim, win_cap, kept, arch_caps, block_n, max_split)
    win = max(1, min(math.ceil(win_cap / (4 * block_n)), budget // (4 * kvh), 16))
    per = max(0, budget - win * kvh) / sum(weights)
    arch = [0 if d == 0 else int(min(max_split, max(1, math.floor(per * (d + head_dim) / (2 * head_dim)))))
            for d in kept]
    if MIN_SPLIT_TILES and arch_caps is not None:  # ``arch_caps[h]``: archive capacity of KV head h (tokens)
        span = MIN_SPLIT_TILES * block_n
        win = min(win, max(1, math.ceil(win_cap / span)))
        arch = [a if a == 0 else min(a, max(1, math.ceil(c / span))) for a, c in zip(arch, arch_caps)]
    return win, arch


def _byte_balanced_splits(budget: int, head_dim: int, win_cap: int, kept: Sequence[int],
                          arch_caps: Sequence[int], block_n: int, max_split: int) -> tuple:
    """``SPLIT_RULE = "bytes"``: splits that make the heaviest block as light as the budget allows.

    A window row reads ``2 * head_dim`` elements per token, an archive row ``d + head_dim``, over
    its capacity. For each window split count (one for every KV head), the archive rows share the
    rest of the budget one block at a time, always to the row whose blocks are heaviest; the
    window count whose heaviest block is lightest wins (fewer blocks on a tie). ``MIN_SPLIT_TILES``
    and ``max_split`` cap each segment as in the default rule; at least one split each.
    """
    span = (MIN_SPLIT_TILES or 1) * block_n

    def most(cap: int) -> int:
        return max(1, min(max_split, math.ceil(cap / span)))

    win_load = win_cap * 2 * head_dim
    arch_load = [c * (d + head_dim) if d > 0 and c > 0 else 0 for d, c in zip(kept, arch_caps)]

    def archive(left: int) -> list:
        arch = [1 if load else 0 for load in arch_load]
        left -= sum(arch)
        heap = [(-load, h) for h, load in enumerate(arch_load) if load and most(arch_caps[h]) > 1]
        heapq.heapify(heap)
        while left > 0 and heap:
            _, h = heapq.heappop(heap)
            arch[h] += 1
            left -= 1
            if arch[h] < most(arch_caps[h]):
                heapq.heappush(heap, (-arch_load[h] / arch[h], h))
        return arch

    best = None
    for win in range(1, min(16, most(win_cap)) + 1):
        arch = archive(budget - win * len(kept))
        heaviest = max([win_load / win] + [load / a for load, a in zip(arch_load, arch) if a])
        score = (heaviest, win * len(kept) + sum(arch))
        if best is None or score < best[0]:
            best = (score, win, arch)
    return best[1], best[2]


def build_plan(batch: int, num_kv_heads: int, head_dim: int, win_cap: int, groups: Sequence[tuple],
               slot_dims: tuple, device: torch.device, sms: int) -> DecodePlan:
    """Work table for one layout. ``groups``: per archive group ``(d, heads, capacity)``."""
    kept = [0] * num_kv_heads
    caps = [0] * num_kv_heads
    where = [None] * num_kv_heads  # (slot, row)
    group_slot = []
    used = set()
    for d, heads, cap in groups:
        if not heads or cap == 0:
            group_slot.append(-1)
            continue
        slot = next(s for s, sd in enumerate(slot_dims) if sd == d and s not in used)
        used.add(slot)
        group_slot.append(slot)
        for r, h in enumerate(heads):
            kept[h] = d
            caps[h] = cap
            where[h] = (slot, r)
    win, arch = choose_splits(batch, head_dim, win_cap, kept, sms, arch_caps=caps)
    nslots = len(slot_dims)
    rows, nparts = [], []
    for h in range(num_kv_heads):
        p = 0
        if where[h] is not None:
            slot, r = where[h]
            for s in range(arch[h]):
                rows.append((slot, r, h, s, arch[h], p))
                p += 1
        for s in range(win):
            rows.append((nslots, h, h, s, win, p))
            p += 1
        nparts.append(p)
    if max(nparts) > 128:
        raise ValueError(f"plan: at most 128 parts per KV head, got {max(nparts)}")
    # heavy archive rows first, window rows (short) last: better tail behaviour
    rows.sort(key=lambda r: r[0] == nslots)
    table = torch.tensor(rows, dtype=torch.int32).to(device)
    npt = torch.tensor(nparts, dtype=torch.int32).to(device)
    return DecodePlan(table, npt, max(nparts), len(rows), tuple(group_slot), tuple(slot_dims))


# ----------------------------------------------------------------------------- run


_host_lists: dict = {}


def _host_list(t: Tensor) -> tuple:
    """``tuple(t.tolist())`` without a device sync per call for the same, unmodified tensor.

    Cached per live tensor object (weak reference + version counter), so a device
    ``arch_heads`` costs one sync when first seen and none afterwards.
    """
    if not t.is_cuda:
        return tuple(t.tolist())
    # inference tensors (torch.inference_mode) carry no version counter: key on identity only
    version = -1 if t.is_inference() else t._version
    hit = _host_lists.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == version:
        return hit[2]
    val = tuple(t.tolist())
    if len(_host_lists) > 4096:
        _host_lists.clear()
    _host_lists[id(t)] = (weakref.ref(t), version, val)
    return val


def _dummy(device: torch.device, dtype: torch.dtype, shape: tuple) -> Tensor:
    """Zero tensor standing in for an unused kernel slot (never read: no table row)."""
    key = (device, dtype, shape)
    if key not in _dummies:
        _dummies[key] = torch.zeros(shape, dtype=dtype, device=device)
    return _dummies[key]


def _pad_group(k: Tensor, chan: Tensor, d_to: int):
    """Zero-pad a group's K (and its channel list) to ``d_to`` channels."""
    pad = d_to - k.shape[-1]
    k = torch.nn.functional.pad(k, (0, pad))
    chan = torch.cat([chan, chan[:, :1].expand(-1, pad)], dim=1)
    return k, chan


def decode_attention(
    q: Tensor,
    win_k: Tensor,
    win_v: Tensor,
    win_len: Tensor,
    arch_k: Sequence[Tensor],
    arch_v: Sequence[Tensor],
    arch_heads: Sequence[Tensor],
    arch_chan: Sequence[Tensor],
    arch_len: Tensor,
    arch_bias: Optional[Sequence[Optional[Tensor]]] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    *,
    slot_dims: Optional[tuple] = None,
):
    """One LeanK decode step on CUDA (TileLang). Same contract as the reference.

    Args:
        q: ``[batch, num_heads, head_dim]`` fp16/bf16, CUDA, contiguous.
        win_k, win_v: ``[batch, num_kv_heads, window_cap, head_dim]``, q's dtype.
        win_len, arch_len: int32 ``[batch]`` on q's device (other int dtypes are cast).
        arch_k / arch_v / arch_heads / arch_chan / arch_bias: per archive group, as in
            the reference (``arch_bias`` float32 ``[batch, heads_d, capacity]`` or None).
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        return_lse: also return the float32 natural-log LSE ``[batch, num_heads]``.
        slot_dims: kept counts to compile the kernel for (default ``default_slot_dims``).

    Returns:
        ``out [batch, num_heads, head_dim]`` in q's dtype (and ``lse``). Rows with nothing
        to attend to give zeros and ``lse = -inf``.
    """
    # dtype, device, head_dim, GQA group and kept counts are checked by ``supports`` when a
    # layout is first seen (they are all part of the plan key), not on every call
    if q.dim() != 3 or win_k.dim() != 4:
        validate_decode_inputs(q, win_k, win_v, win_len, arch_k, arch_v, arch_heads, arch_chan, arch_len, arch_bias)
    b, h, d = q.shape
    kvh, wcap = win_k.shape[1], win_k.shape[2]
    dev = q.device
    for name, t in (("win_k", win_k), ("win_v", win_v)):
        if t.dtype != q.dtype or t.device != dev:
            raise ValueError(f"{name}: expected {q.dtype} on {dev}, got {t.dtype} on {t.device}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    has_bias = arch_bias is not None and any(x is not None for x in arch_bias)

    n = len(arch_k)
    ks, vs, cs, bs, dims = [], [], [], [], []
    for g in range(n):
        k, v, chan = arch_k[g], arch_v[g], arch_chan[g]
        dg = k.shape[-1] if k.dim() == 4 else -1
        if dg % 16:
            _warn_once(f"pad{dg}", f"kept count {dg} is not a multiple of 16: padding K per call (slow path)")
            k, chan = _pad_group(k, chan.to(dev), (dg + 15) // 16 * 16)
        if chan.device != dev or chan.dtype != torch.int64:
            _warn_once("chan", "arch_chan is not int64 on the device: copying it every call")
            chan = chan.to(dev, torch.int64)
        bias = None
        if has_bias:
            bias = arch_bias[g] if arch_bias[g] is not None else torch.zeros(k.shape[:3], dtype=torch.float32, device=dev)
            bias = bias.to(dev, torch.float32).contiguous()
        ks.append(k.contiguous())
        vs.append(v.contiguous())
        cs.append(chan.contiguous())
        bs.append(bias)
        dims.append(k.shape[-1])

    heads_key = tuple(_host_list(x) for x in arch_heads)
    slot_dims = call_slot_dims(d, dims) if slot_dims is None else tuple(slot_dims)
    key = (b, h, kvh, d, wcap, dev, q.dtype, slot_dims,
           tuple((dims[g], heads_key[g], ks[g].shape[2]) for g in range(n)), SPLIT_RULE, BLOCKS_PER_SM,
           MIN_SPLIT_TILES)
    plan = _plans.get(key)
    if plan is None:
        validate_decode_inputs(q, win_k, win_v, win_len, arch_k, arch_v, arch_heads, arch_chan, arch_len, arch_bias)
        reason = supports(device=dev, dtype=q.dtype, head_dim=d, num_heads=h, num_kv_heads=kvh, kept_counts=dims)
        if reason is not None:
            raise ValueError(f"decode_attention: the TileLang kernel does not support this call: {reason} "
                             "(the reference backend does)")
        plan = build_plan(b, kvh, d, wcap, [(dims[g], list(heads_key[g]), ks[g].shape[2]) for g in range(n)],
                          slot_dims, dev, num_sms(dev))
        _plans[key] = plan
    split, combine = get_kernels(h, kvh, d, q.dtype, slot_dims, has_bias, config=TILE_CONFIG)

    df = _dummy(dev, torch.float32, (1,))
    slot_args = []
    for s in range(8):
        if s < len(slot_dims):
            sd = slot_dims[s]
            slot_args += [_dummy(dev, q.dtype, (b, 1, 1, sd)), _dummy(dev, q.dtype, (b, 1, 1, d)),
                          _dummy(dev, torch.int64, (1, sd)),
                          _dummy(dev, torch.float32, (b, 1, 1)) if has_bias else df]
        else:
            slot_args += [_dummy(dev, q.dtype, (1,)), _dummy(dev, q.dtype, (1,)), _dummy(dev, torch.int64, (1,)), df]
    for g in range(n):
        s = plan.group_slot[g]
        if s >= 0:
            slot_args[4 * s: 4 * s + 4] = [ks[g], vs[g], cs[g], bs[g] if has_bias else df]

    wl = win_len if win_len.dtype == torch.int32 else win_len.to(torch.int32)
    al = arch_len if arch_len.dtype == torch.int32 else arch_len.to(torch.int32)
    opart = torch.empty(b, h, plan.num_parts, d, dtype=torch.float32, device=dev)
    lpart = torch.empty(b, h, plan.num_parts, dtype=torch.float32, device=dev)
    out = torch.empty(b, h, d, dtype=q.dtype, device=dev)
    lse = torch.empty(b, h, dtype=torch.float32, device=dev)
    if b > 0:
        args = (q.contiguous(), win_k.contiguous(), win_v.contiguous(), wl.to(dev), al.to(dev), *slot_args,
                plan.table, opart, lpart, scale)
        split(*args)
        combine(opart, lpart, plan.nparts, out, lse)
    return (out, lse) if return_lse else out
