"""Eigenpairs of an operator that changes a little between calls: Rayleigh-Ritz from a warm block.

During training the Hessian moves slowly, and the previous measurement's leading Ritz vectors
``Y (P, j)`` span nearly the same space as the new leading eigenvectors. ``subspace_eigs``
reuses all of them, not only the top one:

1. ``V = orth(Y)`` and ``W = A V`` (``j`` products, one block product);
2. Rayleigh-Ritz: ``G = V^T W (m, m)``, ``G S = S diag(theta)``; for the wanted pairs the exact
   residuals ``R = W S - V S diag(theta)``, ``r_i = ||R[:, i]||``, for the others (which only
   enter the gap estimate) ``r_i^2 = s_i^T (W^T W) s_i - theta_i^2`` from the Gram matrices;
3. stop when every wanted bound is at most ``tol * |theta_i|``: the bound of
   :func:`~curvlab.linalg.lanczos`, ``min(r_i, r_i^2 / gap_i)`` with ``gap_i`` estimated from
   the other Ritz values less their residuals, or its block form for a cluster at the end of
   the spectrum (:func:`~curvlab.linalg.bounds.cluster_bounds`);
4. else append the residual of the least accurate wanted pair, orthogonalized against ``V``,
   and its product, and go to 2.

From one start vector, step 4 builds the Krylov space, so this is Lanczos in exact arithmetic; from
a block it is the thick-restart idea (Wu & Simon 2000, SIAM J. Matrix Anal. Appl. 22(2)) carried
across a change of the operator. The warm block's other Ritz values resolve the gap to the next
eigenvalue from the first check, where a single warm vector needs ``k + 3`` products before its
gap estimate can be trusted (see :mod:`curvlab.linalg.lanczos`). The same limit holds: an
eigenvalue that no Ritz value has resolved can sit closer than the estimate says. ``r_i`` itself
is always a rigorous bound, and ``bound="residual"`` stops on it alone.

What it cannot do: certify a top eigenvalue inside a cluster while the other members' Ritz
pairs are poor (their residuals enter the gap estimate); the bound then falls back to ``r_i``
and the iteration runs on, as Lanczos would (the top of a cross-entropy Hessian is often such a
cluster). Nor can it see an eigenvalue
outside the span of the block and its expansions, e.g. one that has overtaken the previous top
pair: a block wider than ``k + 1`` guards against that.

Memory: ``V`` and ``W`` in ``basis_dtype`` (float64 by default), ``2 m P`` values for ``m``
products (``m`` is a few when tracking) with room for up to twice as many, plus one product's
workspace. Each product adds two passes over ``V`` and ``W`` (the next residual and its Gram
entries) and two over ``V`` (orthogonalizing the next column; four when a second pass is due).

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

from curvlab.linalg._checks import (
    Matvec,
    check_operator,
    dots,
    norm,
    random_vectors,
    synced,
    work_buffer,
)
from curvlab.linalg.bounds import error_bounds, noise_level, select
from curvlab.linalg.lanczos import check_arguments
from curvlab.linalg.results import ConvergenceError, EigResult


def orthonormal_start(start: Tensor, P: int, want: int, A: Any, generator: torch.Generator | None,
                      call: str, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(j, P)`` orthonormal rows in ``dtype`` spanning the columns of ``start``, padded with
    random directions to at least ``want`` (dependent columns are dropped first).

    A start that is already orthonormal to within 0.1 (the previous call's Ritz vectors, the
    usual case) is made orthonormal by one Cholesky QR, ``R^{-T} Y^T`` with ``R^T R = Y^T Y``
    formed in float64: two passes over ``Y`` in ``dtype``, where a QR in float64 would copy
    the block to float64 first. Any other start goes through a float64 QR.
    """
    if not isinstance(start, Tensor) or start.ndim not in (1, 2) or start.shape[0] != P:
        got = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise ValueError(f"{call}: start must be a vector ({P},) or a block ({P}, j), got {got}")
    Y = synced(start.reshape(P, -1).T.to(device=A.device, dtype=dtype), A)  # (j, P)
    gram = dots(Y, Y.T)  # (j, j) float64; not finite when any entry of Y is not
    if not torch.isfinite(gram).all():
        raise ValueError(f"{call}: start must be finite")
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)  # (j, j)
    if Y.shape[0] >= min(want, P) and float((gram - eye).abs().max()) <= 0.1:
        L = torch.linalg.cholesky(gram)  # (j, j), L L^T = Y Y^T
        return torch.linalg.solve_triangular(L.to(dtype), Y, upper=False)  # (j, P)
    X = Y.double().T  # (P, j)
    while True:
        Q, R = torch.linalg.qr(X)  # (P, j), (j, j)
        diag = R.diagonal().abs()
        largest = float(diag.max()) if diag.numel() else 0.0
        keep = diag > 1e-8 * largest if largest > 0 else diag > 0
        Q = Q[:, keep]  # (P, j') independent directions
        if Q.shape[1] >= min(want, P):
            return Q.T.to(dtype).contiguous()  # (j', P)
        Z = random_vectors(P, min(want, P) - Q.shape[1], A, generator)  # (P, pad)
        X = torch.cat([Q, Z], dim=1)  # (P, want)


class Subspace:
    """Orthonormal vectors ``V`` and their products ``W = A V``, stored as rows ``(m, P)``, with
    the Gram matrices ``G = V W^T`` and ``M = W W^T`` (float64, ``(m, m)``), grown one vector
    at a time.

    The rows live in buffers ``(cap, P)`` with room to spare (doubled when full, at most
    ``max_cols``), so that a new vector costs one contiguous pass over ``V`` and one over ``W``
    for its Gram entries, not a copy of both.
    """

    def __init__(self, V: Tensor, W: Tensor, max_cols: int) -> None:
        j, P = V.shape
        self.max_cols = max(max_cols, j)
        self.cap = min(self.max_cols, max(2 * j, j + 8))  # pages are touched only when written
        self._V = V.new_empty(self.cap, P)  # (cap, P)
        self._W = V.new_empty(self.cap, P)  # (cap, P)
        self._V[:j], self._W[:j] = V, W
        self.m = j
        self.buffer = work_buffer(self.cap, V[0])  # (cap, slice) for float32 inner products
        G = dots(self.V, self.W.T).cpu().numpy()  # (j, j)
        self.G = 0.5 * (G + G.T)
        self.M = dots(self.W, self.W.T).cpu().numpy()  # (j, j)
        self.scale = float(np.sqrt(np.max(np.diag(self.M))))  # a lower bound on ||A||

    @property
    def V(self) -> Tensor:
        return self._V[: self.m]  # (m, P)

    @property
    def W(self) -> Tensor:
        return self._W[: self.m]  # (m, P)

    def combine(self, S: np.ndarray, products: bool = False) -> Tensor:
        """``S^T V`` ``(j, P)`` for ``S (m, j)``: Ritz vectors as rows; ``S^T W``, their
        products, with ``products``."""
        S_t = torch.as_tensor(S.T, dtype=self._V.dtype, device=self._V.device)  # (j, m)
        return S_t @ (self.W if products else self.V)

    def orthogonalize(self, z: Tensor) -> Tensor:
        """``z`` less its projection on ``V``: classical Gram-Schmidt, repeated only when the
        first pass removed more than ``1 - 1/sqrt(2)`` of the norm (the criterion of Daniel,
        Gragg, Kaufman and Stewart 1976). A Ritz residual is orthogonal to ``V`` up to
        rounding, so one pass (two reads of ``V``) is the rule. Works in place on ``z``."""
        rows = self.V  # (m, P)
        before = norm(z, self.buffer)
        z.addmv_(rows.T, dots(rows, z, self.buffer).to(rows.dtype), alpha=-1.0)
        if norm(z, self.buffer) < before / math.sqrt(2):
            z.addmv_(rows.T, dots(rows, z, self.buffer).to(rows.dtype), alpha=-1.0)
        return z

    def append(self, z: Tensor, w: Tensor) -> None:
        """Add the unit vector ``z``, orthogonal to ``V``, with its product ``w = A z``."""
        if self.m == self.cap:
            self.cap = min(2 * self.cap, self.max_cols)
            for name in ("_V", "_W"):
                old = getattr(self, name)
                new = old.new_empty(self.cap, old.shape[1])  # (cap, P)
                new[: self.m] = old[: self.m]
                setattr(self, name, new)
            self.buffer = work_buffer(self.cap, z)
        m = self.m
        self._V[m], self._W[m] = z, w
        self.m += 1
        g = dots(self.V, w, self.buffer).cpu().numpy()  # (m + 1,) = V A z, a new column of G
        h = dots(self.W, w, self.buffer).cpu().numpy()  # (m + 1,)
        self.G = np.block([[self.G, g[:m, None]], [g[None, :m], g[m:]]])
        self.M = np.block([[self.M, h[:m, None]], [h[None, :m], h[m:]]])
        self.scale = max(self.scale, math.sqrt(h[m]))


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
    basis_dtype: torch.dtype = torch.float64,
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
        basis_dtype: dtype of ``V`` and ``W``, float64 (default) or float32 (half the memory
            and traffic; accuracy as for :func:`~curvlab.linalg.lanczos`'s float32 basis).

    Returns:
        :class:`EigResult`; ``ritz_vectors (P, keep)`` float64 is the next call's ``start``.
    """
    call = "subspace_eigs"
    P = check_operator(A, call)
    check_arguments(P, k, tol, call, which=which, bound=bound, basis_dtype=basis_dtype)
    keep = k + 1 if keep is None else int(keep)
    if not k <= keep <= P:
        raise ValueError(f"{call}: keep must satisfy k = {k} <= keep <= P = {P}, got {keep}")
    max_iters = min(P, max(100, 10 * k + 50)) if max_iters is None else min(int(max_iters), P)
    matvec = Matvec(A, call, basis_dtype)
    Y = orthonormal_start(start, P, k + 1, A, generator, call, basis_dtype)  # (j, P)
    if Y.shape[0] > max_iters:
        raise ValueError(f"{call}: the start block has {Y.shape[0]} columns but max_iters is "
                         f"{max_iters}; pass fewer start vectors or raise max_iters")
    space = Subspace(Y, matvec(Y.T, 0).T, max_iters)
    noise = noise_level(A.dtype, basis_dtype)
    while True:
        theta, S = eigh(space.G)  # (m,), (m, m)
        wanted = select(theta, k, which)
        X_w = space.combine(S[:, wanted])  # (k, P) the wanted Ritz vectors
        theta_w = torch.as_tensor(theta[wanted], dtype=basis_dtype, device=X_w.device)  # (k,)
        R_w = space.combine(S[:, wanted], products=True).sub_(X_w * theta_w[:, None])  # (k, P)
        # Exact residuals for the wanted pairs; the others, which only enter the gap estimate,
        # from the Gram matrices: ||W s - theta V s||^2 = s^T (W W^T) s - theta^2.
        residuals = np.sqrt(np.maximum(np.einsum("ij,ik,kj->j", S, space.M, S) - theta**2, 0))
        residuals[wanted] = R_w.norm(dim=1).cpu().numpy()
        residuals = np.maximum(residuals, noise * space.scale)  # (m,)
        bounds = np.maximum(error_bounds(theta, residuals, wanted, bound, which),
                            noise * space.scale)
        floor = math.sqrt(torch.finfo(A.dtype).eps) * np.max(np.abs(theta))
        relative = bounds / np.maximum(np.abs(theta[wanted]), floor)
        done = bool(np.all(relative <= tol))
        if done or matvec.count >= max_iters or space.m >= P:
            break
        z = space.orthogonalize(R_w[int(np.argmax(relative))])  # (P,) the worst pair's
        if norm(z, space.buffer) <= 1e-10 * max(space.scale, 1e-300):  # invariant: go on at random
            z = space.orthogonalize(random_vectors(P, 1, A, generator)[:, 0].to(basis_dtype))
        z = z / norm(z, space.buffer)
        space.append(z, matvec(z, space.m))
    converged = done or space.m >= P
    rel = float(np.max(relative))
    message = (f"converged: {k} eigenvalues to relative accuracy {rel:.1e} <= tol {tol:g} in "
               f"{matvec.count} products" if converged else
               f"not converged after {matvec.count} products: relative error bound {rel:.1e} > "
               f"tol {tol:g}; raise max_iters (now {max_iters}) or loosen tol")
    if not converged and throw:
        raise ConvergenceError(f"{call}: {message}")
    order = select(theta, min(keep, theta.size), which)
    X = space.combine(S[:, order])  # (keep, P), the next call's start as rows
    return EigResult(
        eigenvalues=torch.as_tensor(theta[wanted].copy()),
        eigenvectors=X_w.T.to(A.dtype),  # (P, k)
        residuals=torch.as_tensor(residuals[wanted].copy()),
        error_bounds=torch.as_tensor(bounds),
        num_matvecs=matvec.count,
        converged=converged,
        message=message,
        ritz_vectors=X.T,  # (P, keep), a view of the rows
    )
