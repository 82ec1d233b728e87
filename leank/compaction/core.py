"""Attention matching on a batch of KV heads (arXiv 2602.16284), independent of any cache.

One *problem* is one KV head of one sequence (layers may be stacked on the same axis):
reference queries ``Q [n, D]`` (the query heads of a GQA group pooled), keys ``K [T, D]``,
values ``V [T, D]`` and an optional per-key logit bias (``beta`` of an earlier
compaction; ``-inf`` marks an entry that does not exist). For a budget ``t`` it returns
``t`` entries ``(C_k, beta, C_v)`` such that, for the reference queries, attention over
the entries reproduces the output and the log-sum-exp (mass) of attention over all keys:

1. targets ``Y, LSE`` from a FlashAttention call that returns the LSE (no ``n x T`` matrix);
2. ``C_k``: a subset of the keys, by highest attention mass (RMS over queries, ``"hak"``)
   or by orthogonal matching pursuit on the mass residual (``"omp"``), scored in chunks
   of keys so that memory stays bounded for long contexts;
3. ``beta = bias + log w`` with ``w >= 0`` from NNLS: ``sum_j w_j a_ij ~= 1`` where
   ``a_ij = exp(s_ij - LSE_i)`` is query i's attention weight on selected key j;
4. ``C_v`` by (ridge) least squares of the compacted attention weights against ``Y``.

All problems of a call are solved together with batched tensor ops.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from leank.tilelang_kernels.lse import merge_states, softmax_av

from .selection import SelectionProblem, get_selection
from .solvers import fit_values, nnls
from .timing import Stopwatch

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

NEG_LOGIT = -1.0e4  # finite stand-in for -inf in half-precision attention kernels
BETA_RIDGE = 1e-2  # default relative ridge of the NNLS mass weights (see compact_heads)
_AUG = 8  # extra head-dim columns that carry a per-key bias through a bias-free kernel
_AUG_Q = 8.0  # query value in the bias columns (a power of two: exact in bf16/fp16)


# ---------------------------------------------------------------------- targets
@dataclass
class Targets:
    """Attention of the reference queries over the full set of keys.

    Attributes:
        out: float32 ``[G, n, D]``, normalised attention output ``Y``.
        lse: float32 ``[G, n]``, natural-log LSE of the scaled (biased) logits; ``-inf``
            where a problem has no valid key.
    """

    out: Tensor
    lse: Tensor


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"queries, keys: expected [G, n, D] and [G, T, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"values: expected {tuple(k.shape)} (like keys), got {tuple(v.shape)}")
    if bias is not None and bias.shape != k.shape[:2]:
        raise ValueError(f"bias: expected {tuple(k.shape[:2])}, got {tuple(bias.shape)}")


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _augment(q: Tensor, k: Tensor, bias: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Fold a per-key logit bias into extra head-dim columns.

    Returns ``q' [G, n, D+8]``, ``k' [G, T, D+8]`` with ``scale * q'.k' = scale * q.k + bias``
    (``-inf`` bias becomes ``NEG_LOGIT``). The bias is split into a high and a low part so
    that it survives bf16 to about 1e-5 relative.
    """
    G, n, D = q.shape
    T = k.shape[1]
    b = bias.float().clamp_min(NEG_LOGIT) / (scale * _AUG_Q)
    hi = b.to(k.dtype)
    lo = (b - hi.float()).to(k.dtype)
    qa = q.new_zeros(G, n, D + _AUG)
    qa[..., :D] = q
    qa[..., D : D + 2] = _AUG_Q
    ka = k.new_zeros(G, T, D + _AUG)
    ka[..., :D] = k
    ka[..., D] = hi
    ka[..., D + 1] = lo
    return qa, ka


def _targets_flash(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> Targets:
    """FlashAttention (flash_attn, else aten's flash kernel) with the LSE; bias via extra columns."""
    D = q.shape[-1]
    if bias is not None:
        q, k = _augment(q, k, bias, scale)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], _AUG)], -1)  # same head dim for the kernel
    if _flash_attn_available():
        from flash_attn import flash_attn_func

        out, lse, _ = flash_attn_func(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            softmax_scale=scale, causal=False, return_attn_probs=True,
        )
        out, lse = out[0].transpose(0, 1), lse[0]
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention(q[None], k[None], v[None], 0.0, False, False, scale=scale)
        out, lse = res[0][0], res[1][0]
    return Targets(out[..., :D].float(), lse.float())


def _targets_chunked(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float, chunk: int) -> Targets:
    """Attention over key chunks merged by LSE; never holds more than ``G x n x chunk`` logits."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    G, n, D = q.shape
    qc = q.to(cdt)
    out = torch.zeros(G, n, v.shape[-1], dtype=cdt, device=q.device)
    lse = torch.full((G, n), float("-inf"), dtype=cdt, device=q.device)
    for s in range(0, k.shape[1], chunk):
        lg = torch.bmm(qc, k[:, s : s + chunk].to(cdt).transpose(1, 2)) * scale
        if bias is not None:
            lg = lg + bias[:, None, s : s + chunk].to(cdt)
        out, lse = merge_states(out, lse, *softmax_av(lg, v[:, s : s + chunk].to(cdt), "gnt,gtd->gnd"))
    return Targets(out, lse)


def attention_targets(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
    chunk: int = 4096,
) -> Targets:
    """Attention output and LSE of each problem's queries over all its keys.

    Args:
        queries: ``[G, n, D]`` post-RoPE queries (fp16/bf16/fp32/fp64).
        keys, values: ``[G, T, D]`` (same dtype as queries).
        bias: optional float32 ``[G, T]`` added to the logits (``-inf`` = no entry).
        scale: softmax scale, default ``1/sqrt(D)``.
        chunk: keys per chunk on the math path.

    Uses ``flash_attn`` when importable, else ``aten._scaled_dot_product_flash_attention``,
    for fp16/bf16 CUDA tensors with ``D + 8 <= 256``; otherwise a chunked online-softmax
    math path (float32, float64 for float64 input). Never materialises ``n x T`` logits.
    """
    _check_qkv(queries, keys, values, bias)
    scale = 1.0 / math.sqrt(queries.shape[-1]) if scale is None else float(scale)
    if bias is not None and not bool(torch.isfinite(bias).any(-1).all()):
        # a problem without any valid key: keep -inf semantics exactly on the math path
        return _targets_chunked(queries, keys, values, bias, scale, chunk)
    half = queries.dtype in (torch.float16, torch.bfloat16)
    if queries.is_cuda and half and queries.shape[-1] + _AUG <= 256 and queries.shape[-1] % 8 == 0:
        return _targets_flash(queries, keys, values, bias, scale)
    return _targets_chunked(queries, keys, values, bias, scale, chunk)


# ---------------------------------------------------------------------- key scoring
def _weight_chunks(q: Tensor, k: Tensor, bias: Optional[Tensor], lse: Tensor, scale: float, chunk: int, square: bool = False):
    """Yield ``(start, a)``: attention weights ``exp(s - LSE)`` (or their squares) per key chunk, ``[G, n, c]``.

    fp16/bf16 inputs: ``s - LSE`` comes out of one ``baddbmm`` (fp32 accumulation, one
    rounding of a value near 0 for the keys that matter) and the weights stay in half
    precision (scoring only). fp32/fp64 inputs: computed in fp32/fp64.
    """
    if q.dtype in (torch.float16, torch.bfloat16):
        neg_lse = (-lse).to(q.dtype)[..., None]
        for s in range(0, k.shape[1], chunk):
            x = torch.baddbmm(neg_lse, q, k[:, s : s + chunk].transpose(1, 2), alpha=scale)
            if bias is not None:
                x.add_(bias[:, None, s : s + chunk].to(q.dtype))
            if square:
                x.mul_(2)
            yield s, x.exp_()
        return
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_c = lse.to(cdt)
    for s in range(0, k.shape[1], chunk):
        lg = torch.bmm(q, k[:, s : s + chunk].transpose(1, 2)).to(cdt).mul_(scale)
        if bias is not None:
            lg.add_(bias[:, None, s : s + chunk].to(cdt))
        lg.sub_(lse_c[..., None])
        if square:
            lg.mul_(2)
        yield s, lg.exp_()


def _chunk_for(G: int, n: int, T: int, workspace_bytes: int) -> int:
    return int(max(64, min(T, workspace_bytes // max(1, G * n * 8))))


def hak_scores(q: Tensor, k: Tensor, bias: Optional[Tensor], lse: Tensor, scale: float, chunk: int) -> Tensor:
    """RMS over queries of the attention weights, ``[G, T]`` float32 (0 for invalid keys)."""
    scores = torch.empty(k.shape[:2], dtype=torch.float32, device=k.device)
    n = q.shape[1]
    for s, a2 in _weight_chunks(q, k, bias, lse, scale, chunk, square=True):
        scores[:, s : s + a2.shape[-1]] = a2.sum(1, dtype=torch.float32).div_(n).sqrt_()
    return scores


def _take_top(scores: Tensor, budget: Tensor, t: int) -> tuple[Tensor, Tensor]:
    """Top-``budget[g]`` keys of each problem, returned in token order.

    Returns ``index [G, t]`` (clamped, valid everywhere) and bool ``active [G, t]``.
    """
    G, T = scores.shape
    top = torch.topk(scores, t, dim=-1).indices  # [G, t], best first
    active = torch.arange(t, device=scores.device)[None, :] < budget[:, None]
    order = torch.where(active, top, torch.full_like(top, T))
    order, perm = torch.sort(order, dim=-1)
    active = torch.gather(active, 1, perm)
    return order.clamp_max(T - 1), active


def _selected_weights(q: Tensor, k_sel: Tensor, bias_sel: Optional[Tensor], lse: Tensor, scale: float, active: Tensor) -> Tensor:
    """Exact ``a [G, n, t]`` (float32/64) attention weights of the selected keys."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lg = torch.bmm(q.to(cdt), k_sel.to(cdt).transpose(1, 2)) * scale
    if bias_sel is not None:
        lg = lg + bias_sel.to(cdt)[:, None, :]
    lg = lg - lse.to(cdt)[..., None]
    lg = lg.masked_fill(~active[:, None, :], float("-inf"))
    return torch.exp(lg)


def omp_select(
    q: Tensor,
    k: Tensor,
    bias: Optional[Tensor],
    lse: Tensor,
    scale: float,
    budget: Tensor,
    t: int,
    chunk: int,
    keys_per_step: Optional[int] = None,
    inner_iter: int = 100,
    materialize_bytes: int = 2 << 30,
) -> tuple[Tensor, Tensor]:
    """Orthogonal matching pursuit on the mass residual ``1 - A_S w`` (w >= 0 by NNLS).

    Each step adds the ``keys_per_step`` keys whose normalised attention-weight columns
    correlate most with the residual, then refits ``w`` (warm-started NNLS). The weight
    matrix is kept (in the key dtype) when it fits in ``materialize_bytes``, else it is
    recomputed in chunks of keys every step.

    Returns ``index [G, t]`` (token order) and bool ``active [G, t]`` like ``_take_top``.
    """
    G, T = k.shape[:2]
    n = q.shape[1]
    dev = k.device
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys_per_step = keys_per_step or max(1, -(-t // 32))
    valid = torch.ones(G, T, dtype=torch.bool, device=dev) if bias is None else torch.isfinite(bias)
    keep_a = G * n * T * k.element_size() <= materialize_bytes
    store = torch.empty(G, n, T, dtype=k.dtype if k.dtype != torch.float64 else cdt, device=dev) if keep_a else None
    norms = torch.zeros(G, T, dtype=cdt, device=dev)
    for s, a in _weight_chunks(q, k, bias, lse, scale, chunk):
        norms[:, s : s + a.shape[-1]] = a.to(cdt).square().sum(1).sqrt()
        if keep_a:
            store[:, :, s : s + a.shape[-1]] = a.to(store.dtype)
    norms = norms.clamp_min(torch.finfo(cdt).tiny)

    sel = torch.zeros(G, 0, dtype=torch.long, device=dev)
    chosen = ~valid
    w = torch.zeros(G, 0, dtype=cdt, device=dev)
    resid = torch.ones(G, n, dtype=cdt, device=dev)
    a_sel = torch.zeros(G, n, 0, dtype=cdt, device=dev)
    while sel.shape[1] < t:
        step = min(keys_per_step, t - sel.shape[1])
        if keep_a:
            corr = torch.bmm(resid.to(store.dtype)[:, None, :], store)[:, 0].to(cdt)
        else:
            corr = torch.empty(G, T, dtype=cdt, device=dev)
            for s, a in _weight_chunks(q, k, bias, lse, scale, chunk):
                corr[:, s : s + a.shape[-1]] = torch.bmm(resid[:, None, :].to(a.dtype), a)[:, 0].to(cdt)
        corr = (corr / norms).masked_fill(chosen, float("-inf"))
        new = torch.topk(corr, step, dim=-1).indices
        new_ok = torch.isfinite(torch.gather(corr, 1, new))
        chosen = chosen.scatter(1, new, True)
        sel = torch.cat([sel, new], 1)
        active = (torch.arange(sel.shape[1], device=dev)[None, :] < budget[:, None]) & torch.cat(
            [torch.ones(G, sel.shape[1] - step, dtype=torch.bool, device=dev), new_ok], 1
        )
        k_new = torch.gather(k, 1, new[..., None].expand(-1, -1, k.shape[-1]))
        b_new = None if bias is None else torch.gather(bias, 1, new)
        a_sel = torch.cat([a_sel, _selected_weights(q, k_new, b_new, lse, scale, active[:, -step:])], 2)
        a_sel = a_sel * active[:, None, :].to(cdt)
        w0 = torch.cat([w, torch.zeros(G, step, dtype=cdt, device=dev)], 1)
        w = nnls(a_sel, torch.ones(G, n, dtype=cdt, device=dev), active=active, w0=w0, max_iter=inner_iter).w
        resid = 1.0 - torch.bmm(a_sel, w[..., None])[..., 0]
    order = torch.where(active, sel, torch.full_like(sel, T))
    order, perm = torch.sort(order, dim=-1)
    return order.clamp_max(T - 1), torch.gather(active, 1, perm)


# ---------------------------------------------------------------------- compaction
@dataclass
class CompactedHeads:
    """``t`` entries per problem that replace ``T`` keys.

    Attributes:
        keys: ``[G, t, D]`` selected original keys (input dtype).
        values: ``[G, t, D]`` fitted values ``C_v`` (input dtype).
        bias: float32 ``[G, t]`` logit bias ``beta``; ``-inf`` marks an unused entry.
        index: int64 ``[G, t]`` position of each entry in the input keys (-1 if unused).
        kept: int64 ``[G]`` number of used entries.
    """

    keys: Tensor
    values: Tensor
    bias: Tensor
    index: Tensor
    kept: Tensor


def _budget_tensor(budget: Union[int, Tensor], G: int, device) -> Tensor:
    if isinstance(budget, int):
        if budget < 0:
            raise ValueError(f"budget: expected >= 0, got {budget}")
        return torch.full((G,), budget, dtype=torch.long, device=device)
    b = torch.as_tensor(budget, device=device).long()
    if b.shape != (G,) or bool((b < 0).any()):
        raise ValueError(f"budget: expected an int or a [{G}] tensor of non-negative ints, got shape {tuple(b.shape)}")
    return b


def compact_heads(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    budget: Union[int, Tensor],
    *,
    bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
    method: str = "hak",
    ridge: float = 0.0,
    targets: Optional[Targets] = None,
    workspace_bytes: int = 512 << 20,
    omp_keys_per_step: Optional[int] = None,
    nnls_tol: Optional[float] = None,
    beta_ridge: float = BETA_RIDGE,
    timings: Optional[dict] = None,
) -> CompactedHeads:
    """Compact each problem's keys/values to at most ``budget`` entries by attention matching.

    Args:
        queries: ``[G, n, D]`` reference queries (post-RoPE; GQA groups pooled).
        keys, values: ``[G, T, D]``.
        budget: int or int64 ``[G]``: entries to keep per problem. A problem whose budget
            is at least its number of valid keys keeps them all unchanged
            (``beta = bias``, ``C_v = V``).
        bias: optional float32 ``[G, T]`` existing logit bias; ``-inf`` = no entry.
        scale: softmax scale, default ``1/sqrt(D)``.
        method: a registered selection method (``leank.compaction.selection``): ``"hak"``
            (highest attention mass), ``"omp"`` (matching pursuit), or one added with
            ``register_selection``.
        ridge: relative ridge of the value fit toward the original values (>= 0).
        targets: precomputed ``attention_targets`` (computed here when None).
        workspace_bytes: bound on the scoring workspace (chunks of keys).
        omp_keys_per_step: keys added per OMP step (default ``ceil(t / 32)``).
        nnls_tol: relative KKT tolerance of the NNLS (see ``nnls``).
        beta_ridge: relative ridge of the mass weights toward the uniform weight that
            matches the mean mass (0 = plain NNLS; a small value keeps diffuse heads
            from spending their budget on zero weights).
        timings: optional dict that receives seconds per phase (synchronised on CUDA).

    Returns:
        ``CompactedHeads`` with ``t = max_g min(budget_g, valid_g)`` rows.
    """
    _check_qkv(queries, keys, values, bias)
    select = get_selection(method)  # ValueError listing the registered methods
    if ridge < 0:
        raise ValueError(f"ridge: expected >= 0, got {ridge}")
    G, T, D = keys.shape
    n = queries.shape[1]
    dev = keys.device
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    clock = Stopwatch(dev, sink=timings)
    valid = torch.ones(G, T, dtype=torch.bool, device=dev) if bias is None else torch.isfinite(bias)
    n_valid = valid.sum(-1)
    budget = torch.minimum(_budget_tensor(budget, G, dev), n_valid)
    t = int(budget.max()) if G else 0
    identity = budget >= n_valid  # nothing to compact: keep the entries as they are
    if t == 0:
        z = keys.new_zeros(G, 0, D)
        return CompactedHeads(z, z.clone(), torch.zeros(G, 0, device=dev), torch.zeros(G, 0, dtype=torch.long, device=dev), budget)

    if targets is None and not bool(identity.all()):
        targets = attention_targets(queries, keys, values, bias, scale)
    clock("targets")
    chunk = _chunk_for(G, n, T, workspace_bytes)
    # identity problems keep every valid key, in token order
    index, active = _take_top(valid.float().masked_fill(~valid, float("-inf")), budget, t)
    if not bool(identity.all()):
        problem = SelectionProblem(queries, keys, bias, valid, targets.lse, scale, budget, t, chunk,
                                   options={"keys_per_step": omp_keys_per_step})
        sel_index, sel_active = select(problem)
        index = torch.where(identity[:, None], index, sel_index)
        active = torch.where(identity[:, None], active, sel_active)
    clock("selection")

    k_sel = torch.gather(keys, 1, index[..., None].expand(-1, -1, D))
    v_sel = torch.gather(values, 1, index[..., None].expand(-1, -1, D))
    b_sel = torch.zeros(G, t, device=dev) if bias is None else torch.gather(bias, 1, index).float()
    if bool(identity.all()):
        beta, c_v = b_sel, v_sel
    else:
        beta, c_v = _solve(queries, k_sel, v_sel, b_sel if bias is not None else None, targets, scale, active, ridge, nnls_tol, beta_ridge)
        beta = torch.where(identity[:, None], b_sel, beta)
        c_v = torch.where(identity[:, None, None], v_sel, c_v.to(values.dtype))
    clock("solves")
    beta = beta.masked_fill(~active, float("-inf"))
    kept = torch.isfinite(beta).sum(-1)
    index = index.masked_fill(~torch.isfinite(beta), -1)
    return CompactedHeads(k_sel, c_v.to(values.dtype), beta.float(), index, kept)


def _solve(q, k_sel, v_sel, b_sel, targets: Targets, scale, active, ridge, nnls_tol, beta_ridge):
    """beta by NNLS on the mass, C_v by ridge LS on the outputs, for all problems at once."""
    a = _selected_weights(q, k_sel, b_sel, targets.lse, scale, active)  # [G, n, t]
    gram = a.transpose(1, 2) @ a
    rhs = a.sum(1)
    if beta_ridge > 0:
        # pull w toward the uniform weight that matches the mean mass: resolves the
        # near-collinear columns of diffuse heads without dropping keys
        act = active.to(a.dtype)
        w_ref = 1.0 / (a.sum(-1).mean(-1, keepdim=True)).clamp_min(torch.finfo(a.dtype).tiny) * act
        diag = torch.diagonal(gram, dim1=-2, dim2=-1)
        lam = beta_ridge * (diag.sum(-1) / act.sum(-1).clamp_min(1))
        gram = gram + torch.diag_embed(lam[:, None] * act)
        rhs = rhs + lam[:, None] * w_ref
    w = nnls(gram=gram, rhs=rhs, active=active, tol=nnls_tol, max_iter=600, check_every=50, polish_every=4).w
    used = active & (w > 0)
    base = torch.zeros_like(w) if b_sel is None else b_sel.to(w.dtype)
    beta = torch.where(used, base + torch.log(torch.where(used, w, torch.ones_like(w))), torch.full_like(w, float("-inf")))
    p = a * w[:, None, :]
    den = p.sum(-1, keepdim=True)
    p = p / torch.where(den > 0, den, torch.ones_like(den))
    c_v = fit_values(p, targets.out.to(a.dtype), v_sel, ridge=ridge, active=used)
    return beta, c_v


def reconstruction_error(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    compacted: CompactedHeads,
    bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> dict:
    """Errors of the compacted entries against the full keys for (held-out) queries.

    Returns a dict of floats: ``out_rel`` (``||Y_c - Y|| / ||Y||`` over all problems),
    ``lse_mae`` (mean ``|LSE_c - LSE|``) and ``lse_max``; problems without any valid key
    are skipped.
    """
    full = attention_targets(queries, keys, values, bias, scale)
    comp = attention_targets(queries, compacted.keys, compacted.values, compacted.bias, scale)
    ok = torch.isfinite(full.lse).all(-1) & torch.isfinite(comp.lse).all(-1)
    y, yc = full.out[ok].double(), comp.out[ok].double()
    d = (comp.lse[ok] - full.lse[ok]).double().abs()
    return dict(
        out_rel=float((yc - y).norm() / y.norm().clamp_min(1e-30)),
        lse_mae=float(d.mean()) if d.numel() else 0.0,
        lse_max=float(d.max()) if d.numel() else 0.0,
    )


def top_attention_baseline(queries: Tensor, keys: Tensor, values: Tensor, budget: int, bias: Optional[Tensor] = None, scale: Optional[float] = None) -> CompactedHeads:
    """Keep the ``budget`` highest-attention keys (same score as ``"hak"``) with no beta and no refit."""
    G, T, D = keys.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    tg = attention_targets(queries, keys, values, bias, scale)
    valid = torch.ones(G, T, dtype=torch.bool, device=keys.device) if bias is None else torch.isfinite(bias)
    scores = hak_scores(queries, keys, bias, tg.lse, scale, _chunk_for(G, queries.shape[1], T, 512 << 20))
    b = torch.minimum(_budget_tensor(budget, G, keys.device), valid.sum(-1))
    index, active = _take_top(scores.masked_fill(~valid, float("-inf")), b, int(b.max()))
    k_sel = torch.gather(keys, 1, index[..., None].expand(-1, -1, D))
    v_sel = torch.gather(values, 1, index[..., None].expand(-1, -1, D))
    base = torch.zeros(index.shape, device=keys.device) if bias is None else torch.gather(bias, 1, index).float()
    beta = base.masked_fill(~active, float("-inf"))
    return CompactedHeads(k_sel, v_sel, beta, index.masked_fill(~active, -1), active.sum(-1))
