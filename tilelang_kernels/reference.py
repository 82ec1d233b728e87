"""PyTorch reference for one LeanK decode step (the CPU backend and the test oracle).

This file imports no TileLang. Every kernel in this package has this exact signature.

Layout (per layer; filled by ``leank.cache``; the README's "What the function is" section
gives the whole picture):

* window: the first ``sink`` tokens, the most recent ``recent`` tokens and up to
  ``flush_every`` pending tokens, at full ``head_dim``;
* archive: every other token, grouped by kept-channel count ``d``. Group ``g`` holds
  the KV heads ``arch_heads[g]``; their K is stored compacted to the kept channels
  ``arch_chan[g]`` (sorted ascending), their V in full. KV heads with 0 kept channels
  belong to no group: they attend to their window only.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .lse import merge_states, softmax_av

Tensor = torch.Tensor


def _check(name: str, t: Tensor, shape: tuple, what: str) -> None:
    if t.dim() != len(shape) or any(s is not None and a != s for a, s in zip(t.shape, shape)):
        raise ValueError(f"{name}: expected shape {what}, got {tuple(t.shape)}")


def validate_decode_inputs(
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
) -> None:
    """Raise ``ValueError`` naming the argument when shapes do not follow the contract."""
    if q.dim() != 3:
        raise ValueError(f"q: expected [batch, num_heads, head_dim], got {tuple(q.shape)}")
    b, h, d = q.shape
    if win_k.dim() != 4:
        raise ValueError(f"win_k: expected [batch, num_kv_heads, window_cap, head_dim], got {tuple(win_k.shape)}")
    kvh = win_k.shape[1]
    if kvh == 0 or h % kvh != 0:
        raise ValueError(f"win_k: num_kv_heads={kvh} must divide num_heads={h}")
    _check("win_k", win_k, (b, kvh, None, d), f"[{b}, {kvh}, window_cap, {d}]")
    _check("win_v", win_v, tuple(win_k.shape), str(list(win_k.shape)))
    _check("win_len", win_len, (b,), f"[{b}]")
    _check("arch_len", arch_len, (b,), f"[{b}]")
    n = len(arch_k)
    for name, seq in (("arch_v", arch_v), ("arch_heads", arch_heads), ("arch_chan", arch_chan)):
        if len(seq) != n:
            raise ValueError(f"{name}: expected {n} groups (one per arch_k), got {len(seq)}")
    if arch_bias is not None and len(arch_bias) != n:
        raise ValueError(f"arch_bias: expected {n} groups (one per arch_k), got {len(arch_bias)}")
    seen: set[int] = set()
    for g in range(n):
        k, v, heads, chan = arch_k[g], arch_v[g], arch_heads[g], arch_chan[g]
        if k.dim() != 4 or k.shape[0] != b:
            raise ValueError(f"arch_k[{g}]: expected [{b}, heads_d, capacity, d], got {tuple(k.shape)}")
        hg, cap, dg = k.shape[1:]
        if dg == 0 or dg > d:
            raise ValueError(f"arch_k[{g}]: kept count d must be in 1..{d}, got {dg}")
        _check(f"arch_v[{g}]", v, (b, hg, cap, d), f"[{b}, {hg}, {cap}, {d}]")
        _check(f"arch_heads[{g}]", heads, (hg,), f"[{hg}]")
        _check(f"arch_chan[{g}]", chan, (hg, dg), f"[{hg}, {dg}]")
        if arch_bias is not None and arch_bias[g] is not None:
            _check(f"arch_bias[{g}]", arch_bias[g], (b, hg, cap), f"[{b}, {hg}, {cap}]")
        if heads.is_cuda:
            continue  # reading the indices would sync the device on every layer and step
        for x in heads.tolist():
            if not 0 <= x < kvh or x in seen:
                raise ValueError(f"arch_heads[{g}]: KV head {x} out of range or in two groups")
            seen.add(x)


def decode_attention_reference(
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
    compute_dtype: torch.dtype = torch.float32,
):
    """One decode step of attention over the full window and the compacted archive.

    Args:
        q: ``[batch, num_heads, head_dim]`` fp16/bf16/fp32, post-RoPE query. Query head
            ``j`` uses KV head ``j // (num_heads // num_kv_heads)`` (GQA).
        win_k, win_v: ``[batch, num_kv_heads, window_cap, head_dim]``; rows
            ``[0, win_len[b])`` of sequence ``b`` are valid.
        win_len: int32 ``[batch]``.
        arch_k: per group ``[batch, heads_d, capacity, d]``, K of archived tokens with
            only the kept channels.
        arch_v: per group ``[batch, heads_d, capacity, head_dim]``.
        arch_heads: per group int64 ``[heads_d]``, the KV head of each group row.
        arch_chan: per group int64 ``[heads_d, d]``, the kept channel indices (sorted).
        arch_len: int32 ``[batch]``; archive rows ``[0, arch_len[b])`` are valid.
        arch_bias: optional, per group float32 ``[batch, heads_d, capacity]`` added to
            the archive logits (attention-matching beta; ``-inf`` disables an entry).
        scale: softmax scale, default ``1/sqrt(head_dim)`` (full width, also for the
            archive).
        return_lse: also return the float32 log-sum-exp (natural log) of the scaled
            logits, ``[batch, num_heads]``.
        compute_dtype: float32 (the backend) or float64 (the test oracle).

    Returns:
        ``out [batch, num_heads, head_dim]`` in ``q.dtype`` (and ``lse`` if asked). A row
        with nothing to attend to returns zeros and ``lse = -inf``.

    The result equals attention where archived keys have their pruned channels zeroed,
    except that a KV head with no kept channel does not see its archive.
    """
    validate_decode_inputs(q, win_k, win_v, win_len, arch_k, arch_v, arch_heads, arch_chan, arch_len, arch_bias)
    b, h, d = q.shape
    kvh = win_k.shape[1]
    rep = h // kvh
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dev = q.device
    qf = q.to(compute_dtype).reshape(b, kvh, rep, d)

    # window part, every KV head: [b, kvh, rep, W]
    wcap = win_k.shape[2]
    logits = torch.einsum("bgrd,bgwd->bgrw", qf, win_k.to(compute_dtype)) * scale
    wvalid = torch.arange(wcap, device=dev)[None, :] < win_len.to(dev).long()[:, None]
    logits = logits.masked_fill(~wvalid[:, None, None, :], float("-inf"))
    out, lse = softmax_av(logits, win_v.to(compute_dtype), "bgrw,bgwd->bgrd")

    # archive groups, merged into their KV heads by log-sum-exp
    for g in range(len(arch_k)):
        heads = arch_heads[g].to(dev).long()
        chan = arch_chan[g].to(dev).long()
        hg, cap, dg = arch_k[g].shape[1:]
        if cap == 0 or hg == 0:
            continue
        qg = torch.gather(qf[:, heads], 3, chan[None, :, None, :].expand(b, hg, rep, dg))
        lg = torch.einsum("bgrd,bgcd->bgrc", qg, arch_k[g].to(compute_dtype)) * scale
        if arch_bias is not None and arch_bias[g] is not None:
            lg = lg + arch_bias[g].to(dev, compute_dtype)[:, :, None, :]
        avalid = torch.arange(cap, device=dev)[None, :] < arch_len.to(dev).long()[:, None]
        lg = lg.masked_fill(~avalid[:, None, None, :], float("-inf"))
        out_a, lse_a = softmax_av(lg, arch_v[g].to(compute_dtype), "bgrc,bgcd->bgrd")
        out_m, lse_m = merge_states(out[:, heads], lse[:, heads], out_a, lse_a)
        out = out.index_copy(1, heads, out_m)
        lse = lse.index_copy(1, heads, lse_m)

    out = out.reshape(b, h, d).to(q.dtype)
    if return_lse:
        return out, lse.reshape(b, h).float()
    return out
