"""Log-sum-exp attention math shared by the references, the chunk path and compaction.

Pure PyTorch (no TileLang). An attention result over a set of keys is kept as a pair
``(out, lse)``: ``out`` the softmax-normalised sum of values, ``lse`` the log of the
softmax denominator (``-inf`` for an empty set, whose ``out`` is 0). Two such pairs over
disjoint key sets merge exactly into the pair over their union (``merge_states``), which
is how window, archive groups, key chunks and split-K parts are combined everywhere.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def softmax_av(logits: Tensor, v: Tensor, eq: str) -> tuple[Tensor, Tensor]:
    """``(softmax(logits) @ v, logsumexp(logits))`` over the last axis of ``logits``.

    ``eq`` is the ``torch.einsum`` equation of ``probabilities x v`` (e.g.
    ``"bgrw,bgwd->bgrd"``). Rows whose logits are all ``-inf`` give ``out = 0`` and
    ``lse = -inf`` (no NaN).
    """
    m = logits.amax(-1)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits - m_safe[..., None])
    den = p.sum(-1)
    num = torch.einsum(eq, p, v)
    out = num / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    lse = torch.where(den > 0, torch.log(den) + m_safe, torch.full_like(den, float("-inf")))
    return out, lse


def merge_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two normalised partial attention results by log-sum-exp.

    ``out_*`` are ``[..., head_dim]`` and ``lse_*`` are ``[...]``; ``-inf`` LSE marks an
    empty part. Returns ``(out, lse)`` in the inputs' dtype.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.where(torch.isfinite(lse_a), torch.exp(lse_a - safe), torch.zeros_like(lse_a))
    wb = torch.where(torch.isfinite(lse_b), torch.exp(lse_b - safe), torch.zeros_like(lse_b))
    return out_a * wa[..., None] + out_b * wb[..., None], lse
