"""Batched least-squares solvers for attention matching: NNLS for the mass weights, ridge LS for values.

Both work on a batch of independent problems (one per KV head, layers stacked), with no
Python loop over the batch: every step is a batched tensor op, so one call solves all the
heads of many layers on the GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

JITTER = 1e-6  # relative diagonal jitter that keeps the value system positive definite


@dataclass
class NNLSResult:
    """Solution of a batch of NNLS problems.

    Attributes:
        w: ``[G, t]`` non-negative weights (exact zeros off the support), dtype of the input.
        converged: bool ``[G]``, KKT conditions met to tolerance.
        kkt: ``[G]`` final relative KKT violation (max projected gradient / max |A^T b|).
        iterations: projected-gradient iterations run.
    """

    w: Tensor
    converged: Tensor
    kkt: Tensor
    iterations: int


def _bmv(m: Tensor, x: Tensor) -> Tensor:
    return torch.bmm(m, x.unsqueeze(-1)).squeeze(-1)


def _kkt(gram: Tensor, rhs: Tensor, w: Tensor, active: Tensor, scale: Tensor) -> Tensor:
    """Relative KKT violation per problem: projected gradient of ``1/2 w'Mw - c'w`` on w >= 0."""
    g = _bmv(gram, w) - rhs
    pg = torch.where(w > 0, g.abs(), (-g).clamp_min(0))
    pg = torch.where(active, pg, torch.zeros_like(pg))
    return pg.amax(-1) / scale


def _lipschitz(gram: Tensor, iters: int = 40) -> Tensor:
    """Upper estimate of the largest eigenvalue of each PSD ``gram [G, t, t]``.

    Power iteration (a lower bound that converges from below) times 1.05, capped by the
    trace and the max absolute row sum, which are both upper bounds.
    """
    g, t, _ = gram.shape
    x = torch.ones(g, t, dtype=gram.dtype, device=gram.device)
    x = x + 0.01 * torch.linspace(0, 1, t, dtype=gram.dtype, device=gram.device)
    lam = torch.zeros(g, dtype=gram.dtype, device=gram.device)
    for _ in range(iters):
        y = _bmv(gram, x)
        lam = (x * y).sum(-1) / (x * x).sum(-1).clamp_min(torch.finfo(gram.dtype).tiny)
        x = y / y.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
    upper = torch.minimum(torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1), gram.abs().sum(-1).amax(-1))
    lip = torch.minimum(1.05 * lam, upper)
    return torch.where(lip > 0, lip, torch.ones_like(lip))


def _solve_on_support(gram: Tensor, rhs: Tensor, support: Tensor) -> Tensor:
    """Unconstrained minimiser of ``1/2 w'Mw - c'w`` restricted to ``support`` (zeros elsewhere)."""
    s = support.to(gram.dtype)
    m = gram * s.unsqueeze(-1) * s.unsqueeze(-2)
    diag = torch.diagonal(m, dim1=-2, dim2=-1)
    mean_diag = (diag.sum(-1) / s.sum(-1).clamp_min(1)).clamp_min(torch.finfo(gram.dtype).tiny)
    eps = torch.finfo(gram.dtype).eps * 10
    m = m + torch.diag_embed(torch.where(support, eps * mean_diag[:, None], torch.ones_like(diag)))
    chol, info = torch.linalg.cholesky_ex(m)
    bad = info > 0
    if bool(bad.any()):  # nearly singular support: a larger jitter on the failing problems only
        m2 = m + torch.diag_embed(torch.where(support, 1e3 * eps * mean_diag[:, None], torch.zeros_like(diag)))
        chol2, _ = torch.linalg.cholesky_ex(m2)
        chol = torch.where(bad[:, None, None], chol2, chol)
    x = torch.cholesky_solve((rhs * s).unsqueeze(-1), chol).squeeze(-1)
    return torch.where(support, x, torch.zeros_like(x))


def nnls(
    A: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    *,
    gram: Optional[Tensor] = None,
    rhs: Optional[Tensor] = None,
    active: Optional[Tensor] = None,
    w0: Optional[Tensor] = None,
    tol: Optional[float] = None,
    max_iter: int = 2000,
    check_every: int = 25,
    polish: bool = True,
    polish_every: int = 4,
) -> NNLSResult:
    """Batched non-negative least squares ``min_w ||A w - b||^2  s.t.  w >= 0``.

    Projected gradient with Nesterov momentum and adaptive restart on the normal
    equations, alternated with active-set polishing (an exact solve on the current
    support, stepped back to the feasible boundary as in Lawson–Hanson) until the KKT
    conditions hold to ``tol`` for every problem.

    Args:
        A: ``[G, n, t]`` float32/float64 (or give ``gram``/``rhs`` instead).
        b: ``[G, n]``.
        gram: ``[G, t, t]`` = ``A^T A`` (PSD).
        rhs: ``[G, t]`` = ``A^T b``.
        active: bool ``[G, t]``; False columns are fixed at 0 (e.g. padding).
        w0: ``[G, t]`` warm start (clamped to >= 0).
        tol: relative KKT tolerance (max projected gradient / max |A^T b|); default
            1e-10 for float64, 1e-5 for float32.
        max_iter: cap on projected-gradient iterations.
        check_every: iterations between KKT checks.
        polish: run the active-set polishing (on by default).
        polish_every: KKT checks between polishing rounds (each costs a batched Cholesky
            of ``[G, t, t]``); the last round always polishes.

    Returns:
        ``NNLSResult``; problems not converged within ``max_iter`` are logged.
    """
    if gram is None:
        if A is None or b is None:
            raise ValueError("A, b: expected both (or gram and rhs), got None")
        if A.dim() != 3 or b.shape != A.shape[:2]:
            raise ValueError(f"A, b: expected [G, n, t] and [G, n], got {tuple(A.shape)} and {tuple(b.shape)}")
        gram = A.transpose(1, 2) @ A
        rhs = _bmv(A.transpose(1, 2), b)
    if rhs is None or gram.dim() != 3 or gram.shape[1] != gram.shape[2] or rhs.shape != gram.shape[:2]:
        raise ValueError(
            f"gram, rhs: expected [G, t, t] and [G, t], got {tuple(gram.shape)} and "
            f"{None if rhs is None else tuple(rhs.shape)}"
        )
    if not gram.is_floating_point() or gram.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gram: expected float32 or float64, got {gram.dtype}")
    G, t = rhs.shape
    dtype, dev = gram.dtype, gram.device
    if tol is None:
        tol = 1e-10 if dtype == torch.float64 else 1e-5
    if active is None:
        active = torch.ones(G, t, dtype=torch.bool, device=dev)
    if active.shape != (G, t):
        raise ValueError(f"active: expected [{G}, {t}], got {tuple(active.shape)}")
    if G == 0 or t == 0:
        z = rhs.new_zeros(G, t)
        return NNLSResult(z, torch.ones(G, dtype=torch.bool, device=dev), rhs.new_zeros(G), 0)

    act = active.to(dtype)
    gram = gram * act.unsqueeze(-1) * act.unsqueeze(-2)
    rhs = rhs * act
    scale = rhs.abs().amax(-1).clamp_min(torch.finfo(dtype).tiny)
    step = (1.0 / _lipschitz(gram)).unsqueeze(-1)

    w = torch.zeros(G, t, dtype=dtype, device=dev) if w0 is None else w0.to(dtype).clamp_min(0) * act
    y, theta = w.clone(), torch.ones(G, 1, dtype=dtype, device=dev)
    done = torch.zeros(G, dtype=torch.bool, device=dev)
    kkt = _kkt(gram, rhs, w, active, scale)
    it = 0
    while it < max_iter:
        for _ in range(check_every):
            grad = _bmv(gram, y) - rhs
            w_new = ((y - step * grad).clamp_min(0)) * act
            # adaptive restart: drop momentum where it points uphill
            restart = ((grad * (w_new - w)).sum(-1, keepdim=True) > 0)
            theta_new = 0.5 * (1 + torch.sqrt(1 + 4 * theta * theta))
            mom = torch.where(restart, torch.zeros_like(theta), (theta - 1) / theta_new)
            y = w_new + mom * (w_new - w)
            theta = torch.where(restart, torch.ones_like(theta), theta_new)
            w = torch.where(done[:, None], w, w_new)
            y = torch.where(done[:, None], w, y)
        it += check_every
        kkt = _kkt(gram, rhs, w, active, scale)
        done = kkt <= tol
        if bool(done.all()):
            break
        last = it + check_every > max_iter
        if polish and (last or (it // check_every) % polish_every == 0):
            w = _polish(gram, rhs, w, active, done)
            y = w.clone()
            theta = torch.ones_like(theta)
            kkt = _kkt(gram, rhs, w, active, scale)
            done = kkt <= tol
            if bool(done.all()):
                break
    if not bool(done.all()):
        logger.info(
            "nnls: %d of %d problems above tolerance %.1e after %d iterations (worst %.2e)",
            int((~done).sum()), G, tol, it, float(kkt.max()),
        )
    return NNLSResult(w, done, kkt, it)


def _polish(gram: Tensor, rhs: Tensor, w: Tensor, active: Tensor, frozen: Tensor) -> Tensor:
    """Lawson–Hanson inner loop on the support of ``w``: exact solves, stepping back to feasibility."""
    support = (w > 0) & active
    for _ in range(2):
        z = _solve_on_support(gram, rhs, support)
        bad = support & (z <= 0)
        # largest step alpha in [0, 1] from w toward z that stays feasible
        ratio = torch.where(bad, w / (w - z).clamp_min(torch.finfo(w.dtype).tiny), torch.ones_like(w))
        alpha = ratio.amin(-1, keepdim=True).clamp(0, 1)
        w_new = (w + alpha * (z - w)).clamp_min(0)
        w_new = torch.where(bad & (ratio <= alpha), torch.zeros_like(w_new), w_new)
        # keep the polished point only where it does not raise the objective
        obj_old = 0.5 * (w * _bmv(gram, w)).sum(-1) - (rhs * w).sum(-1)
        obj_new = 0.5 * (w_new * _bmv(gram, w_new)).sum(-1) - (rhs * w_new).sum(-1)
        take = (obj_new <= obj_old + 1e-12 * obj_old.abs()) & ~frozen
        w = torch.where(take[:, None], w_new, w)
        support = (w > 0) & active
        if not bool(bad.any()):
            break
    return w


def fit_values(
    probs: Tensor,
    targets: Tensor,
    prior: Tensor,
    *,
    ridge: float = 0.0,
    active: Optional[Tensor] = None,
) -> Tensor:
    """Batched (ridge) least squares for compacted values.

    Solves ``min_C ||P C - Y||^2 + lam ||C - V0||^2`` per problem, with
    ``lam = (ridge + JITTER) * mean(diag(P^T P))``: ``ridge`` shrinks toward the selected
    keys' original values ``V0``; the tiny ``JITTER`` keeps the system positive definite.

    Args:
        probs: ``P [G, n, t]`` float32/64, compacted attention weights (rows sum to 1).
        targets: ``Y [G, n, D]``, attention outputs of the full cache.
        prior: ``V0 [G, t, D]``, original values of the selected keys.
        ridge: relative ridge strength (>= 0).
        active: bool ``[G, t]``; inactive rows of ``C`` are set to ``V0``.

    Returns:
        ``C [G, t, D]`` in ``probs.dtype``.
    """
    if ridge < 0:
        raise ValueError(f"ridge: expected >= 0, got {ridge}")
    if probs.dim() != 3 or targets.shape[:2] != probs.shape[:2] or prior.shape != (probs.shape[0], probs.shape[2], targets.shape[2]):
        raise ValueError(
            f"probs, targets, prior: expected [G, n, t], [G, n, D], [G, t, D], got {tuple(probs.shape)}, "
            f"{tuple(targets.shape)}, {tuple(prior.shape)}"
        )
    dtype = probs.dtype
    G, n, t = probs.shape
    if active is None:
        active = torch.ones(G, t, dtype=torch.bool, device=probs.device)
    a = active.to(dtype)
    p = probs * a.unsqueeze(1)
    v0 = prior.to(dtype)
    gram = p.transpose(1, 2) @ p
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    mean_diag = (diag.sum(-1) / a.sum(-1).clamp_min(1)).clamp_min(torch.finfo(dtype).tiny)
    lam = (ridge + JITTER) * mean_diag
    reg = torch.where(active, lam[:, None], torch.ones_like(diag))
    gram = gram + torch.diag_embed(reg)
    rhs = p.transpose(1, 2) @ targets.to(dtype) + reg.unsqueeze(-1) * v0
    chol, info = torch.linalg.cholesky_ex(gram)
    bad = info > 0
    if bool(bad.any()):
        chol2, _ = torch.linalg.cholesky_ex(gram + torch.diag_embed(1e3 * reg))
        chol = torch.where(bad[:, None, None], chol2, chol)
    return torch.cholesky_solve(rhs, chol)
