"""Eigenpairs of an operator that changes a little between calls: Rayleigh-Ritz from a warm block.

During training the Hessian moves slowly, and the previous measurement's leading Ritz vectors
``Y (P, j)`` span nearly the same space as the new leading eigenvectors. ``subspace_eigs``
reuses all of them, not only the top one:

1. ``V = orth(Y)`` and ``W = A V`` (``j`` products, one block product);
2. Rayleigh-Ritz: ``G = V^T W (m, m)``, ``G S = S diag(theta)``; Ritz vectors ``X = V S`` and
   exact residuals ``R = W S - X diag(theta)``, ``r_i = ||R[:, i]||``;
3. stop when every wanted ``min(r_i, r_i^2 / gap_i)`` is at most ``tol * |theta_i|`` (the bound
   of :func:`~curvlab.linalg.lanczos`, with ``gap_i`` estimated from the other Ritz values less
   their residuals);
4. else append the residual of the least accurate wanted pair, orthogonalized against ``V``
   (twice), and its product, and go to 2.

From one start vector, step 4 builds the Krylov space, so this is Lanczos in exact arithmetic; from
a block it is the thick-restart idea (Wu & Simon 2000, SIAM J. Matrix Anal. Appl. 22(2)) carried
across a change of the operator. The warm block's other Ritz values resolve the gap to the next
eigenvalue from the first check, where a single warm vector needs ``k + 3`` products before its
gap estimate can be trusted (see :mod:`curvlab.linalg.lanczos`). The same limit holds: an
eigenvalue that no Ritz value has resolved can sit closer than the estimate says. ``r_i`` itself
is always a rigorous bound, and ``bound="residual"`` stops on it alone.

What it cannot do: certify a top eigenvalue inside a cluster narrower than the tolerance allows
for ``r^2 / gap``; the bound then falls back to ``r_i`` and the iteration runs on, as Lanczos
would. The Hessian of a 10-class cross-entropy MLP is such a case (top two eigenvalues 0.7% apart,
``benchmarks/monitor.py``): the true error is below 1e-3 after a few products while the bound
needs several more.

Memory: ``V`` and ``W`` in float64, ``2 m P`` values for ``m`` products (``m`` is a few when
tracking), plus one product's workspace.

Example:
    >>> import torch
    >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> Y = torch.eye(100, 3, dtype=torch.float64).flip(0)   # e_100, e_99, e_98
    >>> res = subspace_eigs(A, 1, start=Y + 1e-4, tol=1e-6)
    >>> round(float(res.eigenvalues[0]), 4), res.converged, res.num_matvecs <= 5
    (100.0, True, True)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh
from torch import Tensor

from curvlab.linalg._checks import Matvec, check_operator, random_vectors, synced
from curvlab.linalg.lanczos import WHICH, check_arguments, error_bounds, select
from curvlab.linalg.results import ConvergenceError, EigResult


def orthonormal_start(start: Tensor, P: int, want: int, A: Any, generator: torch.Generator | None,
                      call: str) -> Tensor:
    """``(P, j)`` float64 orthonormal columns spanning ``start``, padded with random directions to
    at least ``want`` columns (dependent columns are dropped first)."""
    if not isinstance(start, Tensor) or start.ndim not in (1, 2) or start.shape[0] != P:
        got = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise ValueError(f"{call}: start must be a vector ({P},) or a block ({P}, j), got {got}")
    Y = start.reshape(P, -1).to(device=A.device, dtype=torch.float64)  # (P, j)
    if not torch.isfinite(Y).all():
        raise ValueError(f"{call}: start must be finite")
    Y = synced(Y, A)
    while True:
        Q, R = torch.linalg.qr(Y)  # (P, j), (j, j)
        diag = R.diagonal().abs()
        largest = float(diag.max()) if diag.numel() else 0.0
        keep = diag > 1e-8 * largest if largest > 0 else diag > 0
        Q = Q[:, keep]  # (P, j') independent directions
        if Q.shape[1] >= min(want, P):
            return Q
        Z = random_vectors(P, min(want, P) - Q.shape[1], A, generator)  # (P, pad)
        Y = torch.cat([Q, Z], dim=1)  # (P, want)


def subspace_eigs(
    A: Any,
    k: int = 1,
    *,
    start: Tensor,
    which: str = "LA",
    tol: float = 1e-3,
    max_iters: int | None = None,
    keep: int | None = None,
    generator: torch.Generator | None = None,
    throw: bool = False,
    bound: str = "gap",
) -> EigResult:
    """``k`` eigenpairs of a symmetric ``A (P, P)`` from a warm block ``start`` (module doc).

    Args:
        A: a dense tensor or an operator with ``shape``, ``dtype``, ``device`` and ``A @ V``.
        k: how many eigenpairs, ``1 <= k < P``.
        start: ``(P,)`` or ``(P, j)``: the previous measurement's Ritz vectors (``ritz_vectors``
            of an earlier result). Fewer than ``k + 1`` independent columns are padded with
            random directions, so that the gap to the next eigenvalue can be estimated.
        which, tol, generator, throw, bound: as for :func:`~curvlab.linalg.lanczos`.
        max_iters: most products in all, the block's included; default
            ``min(P, max(100, 10 k + 50))``.
        keep: how many leading Ritz vectors to return in ``ritz_vectors`` for the next call
            (default ``k + 1``).

    Returns:
        :class:`EigResult`; ``ritz_vectors (P, keep)`` float64 is the next call's ``start``.
    """
    call = "subspace_eigs"
    P = check_operator(A, call)
    if which not in WHICH:
        raise ValueError(f"{call}: which must be one of {WHICH}, got {which!r}")
    check_arguments(P, k, tol, call)
    if bound not in ("gap", "residual"):
        raise ValueError(f"{call}: bound must be 'gap' or 'residual', got {bound!r}")
    keep = k + 1 if keep is None else int(keep)
    if not k <= keep <= P:
        raise ValueError(f"{call}: keep must satisfy k = {k} <= keep <= P = {P}, got {keep}")
    max_iters = min(P, max(100, 10 * k + 50)) if max_iters is None else min(int(max_iters), P)
    matvec = Matvec(A, call)
    V = orthonormal_start(start, P, k + 1, A, generator, call)  # (P, j)
    if V.shape[1] > max_iters:
        raise ValueError(f"{call}: the start block has {V.shape[1]} columns but max_iters is "
                         f"{max_iters}; pass fewer start vectors or raise max_iters")
    W = matvec(V, 0)  # (P, j)
    noise = 0.0 if A.dtype == torch.float64 else torch.finfo(A.dtype).eps
    scale = float(W.norm(dim=0).max())  # a lower bound on ||A||
    while True:
        G = V.T @ W  # (m, m)
        theta, S = eigh(0.5 * (G + G.T).cpu().numpy())  # (m,), (m, m)
        S_t = torch.as_tensor(S, device=V.device)  # (m, m)
        X = V @ S_t  # (P, m) Ritz vectors
        R = W @ S_t - X * torch.as_tensor(theta, device=V.device)  # (P, m) residuals
        residuals = np.maximum(R.norm(dim=0).cpu().numpy(), noise * scale)  # (m,)
        wanted = select(theta, k, which)
        bounds = np.maximum(error_bounds(theta, residuals, wanted, bound), noise * scale)
        floor = math.sqrt(torch.finfo(A.dtype).eps) * np.max(np.abs(theta))
        relative = bounds / np.maximum(np.abs(theta[wanted]), floor)
        done = bool(np.all(relative <= tol))
        if done or matvec.count >= max_iters or V.shape[1] >= P:
            break
        z = R[:, wanted[int(np.argmax(relative))]]  # (P,) the least accurate pair's residual
        for _ in range(2):
            z = z - V @ (V.T @ z)
        if float(z.norm()) <= 1e-10 * max(scale, 1e-300):  # an invariant subspace: go on at random
            z = random_vectors(P, 1, A, generator)[:, 0]
            for _ in range(2):
                z = z - V @ (V.T @ z)
        z = z / z.norm()
        w = matvec(z, V.shape[1])  # (P,)
        scale = max(scale, float(w.norm()))
        V, W = torch.cat([V, z[:, None]], dim=1), torch.cat([W, w[:, None]], dim=1)  # (P, m + 1)
    converged = done or V.shape[1] >= P
    rel = float(np.max(relative))
    message = (f"converged: {k} eigenvalues to relative accuracy {rel:.1e} <= tol {tol:g} in "
               f"{matvec.count} products" if converged else
               f"not converged after {matvec.count} products: relative error bound {rel:.1e} > "
               f"tol {tol:g}; raise max_iters (now {max_iters}) or loosen tol")
    if not converged and throw:
        raise ConvergenceError(f"{call}: {message}")
    order = select(theta, min(keep, theta.size), which)
    return EigResult(
        eigenvalues=torch.as_tensor(theta[wanted].copy()),
        eigenvectors=X[:, wanted].to(A.dtype),
        residuals=torch.as_tensor(residuals[wanted].copy()),
        error_bounds=torch.as_tensor(bounds),
        num_matvecs=matvec.count,
        converged=converged,
        message=message,
        ritz_vectors=X[:, order],
    )
