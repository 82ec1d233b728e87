"""``"omp"``: orthogonal matching pursuit on the attention-mass residual (``core.omp_select``).

Option ``keys_per_step``: keys added per step (default ``ceil(t / 32)``).
"""

from __future__ import annotations

from .core import omp_select
from .selection import SelectionProblem, register_selection


@register_selection("omp")
def select_matching_pursuit(p: SelectionProblem):
    return omp_select(p.queries, p.keys, p.bias, p.lse, p.scale, p.budget, p.t, p.chunk,
                      keys_per_step=p.options.get("keys_per_step"))
