"""The pieces of the two training stages: schedule, factors → binary mask, STE scale, loss.

Factors are a float32 tensor ``[num_layers, num_kv_heads, head_dim]`` initialised to 1 and
kept in [0, 1] by clamping after every optimizer step (projected gradient descent; no
sigmoid, so a factor can reach exactly 0 or 1).
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, total: int, base: float, warmup_frac: float, decay_frac: float) -> float:
    """Warm-up / flat / decay: linear from ``base/warmup`` to ``base`` over the first
    ``warmup_frac`` of ``total`` steps, flat, then linear to 0 over the last ``decay_frac``."""
    warm = int(math.ceil(warmup_frac * total))
    decay = int(math.ceil(decay_frac * total))
    if step < warm:
        return base * (step + 1) / warm
    if decay and step >= total - decay:
        return base * (total - step) / (decay + 1)
    return base


def _order(values: torch.Tensor, tiebreak: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Indices sorting ``values`` descending along ``dim``; equal values ordered by
    ``tiebreak`` descending, then by index."""
    v = values.detach().float()
    if tiebreak is None:
        return torch.argsort(-v, dim=dim, stable=True)
    first = torch.argsort(-tiebreak.detach().float().to(v.device), dim=dim, stable=True)
    second = torch.argsort(-v.gather(dim, first), dim=dim, stable=True)
    return first.gather(dim, second)


def kept_units(factors: torch.Tensor, ratio: float, align: int, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head kept counts from a global quantile, rounded to multiples of ``align``.

    The ``(1 - ratio) * N`` largest factors overall (ties broken by ``tiebreak``, e.g. the
    accumulated distillation gradient, then by index) give each head a
    raw count; counts are rounded to multiples of ``align`` by largest remainder so that
    their sum is exactly ``round((1 - ratio) * N / align) * align`` (each head within
    ``[0, head_dim]``). Returns int64 ``[num_layers, num_kv_heads]``.
    """
    if factors.dim() != 3:
        raise ValueError(f"factors: expected [num_layers, num_kv_heads, head_dim], got shape {tuple(factors.shape)}")
    L, H, D = factors.shape
    if D % align:
        raise ValueError(f"align: expected a divisor of head_dim={D}, got {align}")
    n = factors.numel()
    keep_total = int(round((1.0 - ratio) * n))
    flat = factors.detach().float().cpu().flatten()
    order = _order(flat, None if tiebreak is None else tiebreak.cpu().flatten(), 0)
    top = torch.zeros(n, dtype=torch.bool)
    top[order[:keep_total]] = True
    raw = top.view(L, H, D).sum(-1).double() / align  # units, fractional
    target = int(round((1.0 - ratio) * n / align))
    units = raw.floor().long().flatten()
    rem = (raw.flatten() - units.double())
    cap = D // align
    while int(units.sum()) < target:  # add to the largest remainders first
        cand = torch.where(units < cap, rem, torch.full_like(rem, -1e9))
        i = int(torch.argmax(cand))
        units[i] += 1
        rem[i] -= 1.0
    while int(units.sum()) > target:  # remove from the smallest remainders first
        cand = torch.where(units > 0, rem, torch.full_like(rem, 1e9))
        i = int(torch.argmin(cand))
        units[i] -= 1
        rem[i] += 1.0
    return (units * align).view(L, H)


def topk_mask(factors: torch.Tensor, counts: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[L, H, D]``: in each head the ``counts[l, h]`` largest factors (ties: larger
    ``tiebreak``, then lower index)."""
    L, H, D = factors.shape
    order = _order(factors, tiebreak, -1)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(D, device=factors.device).expand(L, H, D).contiguous())
    return rank < counts.to(factors.device)[..., None]


def ste_scale(factors: torch.Tensor, counts: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Straight-through scale: forward value is the binary top-k mask (kept = exactly 1),
    gradient flows to ``factors`` as if the scale were the factors themselves."""
    hard = topk_mask(factors, counts, tiebreak).to(factors.dtype)
    return hard + (factors - factors.detach())  # exactly `hard` in the forward (x - x == 0)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 between hidden states ``[B, A, hidden]``."""
    return torch.mean((student.float() - teacher.float()) ** 2)


def soft_sparsity(factors: torch.Tensor, threshold: float = 0.1) -> float:
    """Fraction of factors below ``threshold`` (the stage-1 progress number)."""
    return float((factors.detach() < threshold).float().mean())
