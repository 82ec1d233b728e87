"""``"hak"``: keep the keys with the highest attention mass (RMS over the reference queries)."""

from __future__ import annotations

from .core import _take_top, hak_scores
from .selection import SelectionProblem, register_selection


@register_selection("hak")
def select_highest_attention(p: SelectionProblem):
    scores = hak_scores(p.queries, p.keys, p.bias, p.lse, p.scale, p.chunk)
    return _take_top(scores.masked_fill(~p.valid, float("-inf")), p.budget, p.t)
