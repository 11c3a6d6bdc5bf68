"""Lanczos with full reorthogonalization and eigenvalue-accuracy stopping.

Lanczos (1950) builds an orthonormal Krylov basis ``Q (P, m)`` and a tridiagonal ``T (m, m)``
with ``A Q = Q T + beta_m q_{m+1} e_m^T`` (docs/math.md section 3). The Ritz pairs
``(theta_i, Q s_i)`` come from ``scipy.linalg.eigh_tridiagonal(T)``; the residual of pair ``i`` is
``r_i = |beta_m s_i[m]|``.

``tol`` is the relative accuracy of the returned eigenvalues. For a symmetric ``A`` there is an
eigenvalue within ``r_i`` of ``theta_i`` (always), and within ``r_i^2 / gap_i`` when the other
eigenvalues are at least ``gap_i`` away (Kato-Temple; Parlett, *The Symmetric Eigenvalue Problem*,
section 11.7). The gap is estimated from the other Ritz values with a safety margin of their own
residuals, ``gap_i = min_{j != i} (|theta_i - theta_j| - r_j)``; where that estimate is not
larger than ``r_i`` the bound falls back to ``r_i``. For the ends of the spectrum (``which``
"LA" or "SA") the bound is also taken in block form
(:func:`~curvlab.linalg.bounds.cluster_bounds`): the leading ``c`` Ritz values as one block,
``|lambda_i - theta_i| <= sum_{j <= c} r_j^2 / eta_c`` with ``eta_c`` the block's estimated
distance to the rest, so a top cluster costs its distance to the next eigenvalue, not the
square root of its own width. The estimate is used only from ``k + 3``
steps on: in a smaller Krylov space the other Ritz values are averages over much of the spectrum
and sit far below the next eigenvalue (measured on a warm-started MLP Hessian: at 2 steps the
estimated gap was 8 times the true one). Iteration stops as soon as every wanted bound
is at most ``tol * |theta_i|``. This stops long before the residual itself is small (which is what
``scipy.sparse.linalg.eigsh`` waits for) and never on the change between iterations (which can
stop early with a much larger error).

The limit of the gap estimate: an eigenvalue that no Ritz value has resolved yet can sit closer to
``theta_i`` than the estimate says. This happens with a cluster narrower than about
``sqrt(tol * gap)``: Lanczos may then stall on a mixture of the cluster's eigenvectors, whose Ritz
value is off by up to the cluster's width (never more) while ``r_i^2 / gap_i`` looks converged.
Where such clusters matter and ``tol`` is below their width, pass ``bound="residual"``, which stops
on the rigorous ``r_i`` alone (more products, as eigsh).

Memory: the basis and the recurrence's work vectors are in ``basis_dtype`` (float64 by default)
on ``basis_device`` (the operator's by default). While iterating, ``m + 1`` vectors ``(P,)`` are
held after ``m`` steps (the basis and the next residual); the ``k`` eigenvectors are then formed
over the basis in place, so the peak is ``max(m + 1, 2 k)`` vectors (``2 (k + keep)`` with
``keep``; measured in ``benchmarks/lanczos_memory.py``). Each basis vector is allocated
when its step runs, so ``max_iters`` reserves nothing. Besides that: one product's workspace. For
a large model pass ``basis_dtype=torch.float32`` (``4 P`` bytes per vector, half of float64;
measured in ``benchmarks/lanczos_memory.py``) and/or ``basis_device="cpu"`` (the basis in host
memory, one vector copied each way per product). The tridiagonal ``T`` and its eigenproblem stay
in float64 either way, and the inner products and norms over ``P`` are summed in float64 across
slices (:func:`~curvlab.linalg._checks.dots`). What a float32 basis costs: it is orthonormal to
about ``m eps_32`` (``eps_32 = 1.2e-7``) instead of ``m eps_64``, so Ritz values carry a relative
error of about ``eps_32`` and residuals below ``eps_32 ||A||`` are not resolved; no bound below that
is claimed (as for a float32 operator), and tolerances down to ``1e-5`` are met as in float64
(tested on the zoo).

Example:
    >>> import torch
    >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> res = lanczos(A, k=2, tol=1e-10, generator=torch.Generator().manual_seed(0))
    >>> [round(x, 8) for x in res.eigenvalues.tolist()], res.converged
    ([100.0, 99.0], True)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
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
from curvlab.linalg.results import ConvergenceError, EigResult

WHICH = ("LA", "SA", "LM", "BE")


class KrylovBasis:
    """The Lanczos recurrence with full reorthogonalization (classical Gram-Schmidt, repeated
    when it removes much).

    After ``m`` steps: ``rows`` holds ``m`` orthonormal vectors ``(P,)`` in the basis dtype on the
    basis device (each allocated when its step runs, so memory grows with the steps taken, not
    with ``max_iters``), ``alpha (m,)`` and ``beta (m,)`` with ``beta[-1]`` the norm of the next
    residual (0 after a breakdown, i.e. an invariant subspace). The recurrence's work vectors
    are in the basis dtype too; ``alpha`` and ``beta`` are float64.
    """

    def __init__(self, matvec: Matvec, q0: Tensor, *, check_symmetry: bool) -> None:
        self.matvec, self.check_symmetry = matvec, check_symmetry
        self.rows: list[Tensor] = []
        self.alpha: list[float] = []
        self.beta: list[float] = []
        q0 = q0.to(device=matvec.device, dtype=matvec.dtype)  # (P,)
        self.buffer = work_buffer(1, q0)  # (1, slice) for the float32 inner products, or None
        self.next_q: Tensor | None = q0 / norm(q0, self.buffer)  # (P,)
        self.scale = 0.0  # running estimate of ||A||
        # beta below this fraction of ||A|| is a breakdown: 100 eps for float32 and float64;
        # for bfloat16 and float16, whose eps is large (8e-3, 1e-3), 0.5 sqrt(eps) (about 6 and
        # 16 eps), still well above the rounding of one product.
        eps = max(torch.finfo(matvec.A.dtype).eps, torch.finfo(matvec.dtype).eps)
        self.breakdown_tol = min(100 * eps, 0.5 * math.sqrt(eps))

    @property
    def m(self) -> int:
        return len(self.alpha)

    def project_out(self, w: Tensor) -> list[float]:
        """``w -= sum_i (q_i . w) q_i`` in place over the rows; returns the coefficients."""
        c = [float(dots(q, w, self.buffer)) for q in self.rows]  # (m,)
        for q, ci in zip(self.rows, c, strict=True):
            w.add_(q, alpha=-ci)
        return c

    def step(self) -> bool:
        """One Lanczos step; returns False on breakdown (``beta`` below the noise level)."""
        m = self.m
        if self.next_q is None:
            raise RuntimeError("KrylovBasis.step: no next vector (call restart after a breakdown)")
        self.rows.append(self.next_q)
        w = self.matvec(self.next_q, m)  # (P,)
        w_norm = norm(w, self.buffer)
        # The three-term recurrence: w less its parts along q_m and q_{m-1}
        recent = self.rows[-2:]
        c = [float(dots(q, w, self.buffer)) for q in recent]
        for q, ci in zip(recent, c, strict=True):
            w.add_(q, alpha=-ci)
        if self.check_symmetry and m == 1:
            self._check_symmetry(c[0], w_norm)
        # Full reorthogonalization: one classical Gram-Schmidt pass over the whole basis, and a
        # second when the first removed more than 1 - 1/sqrt(2) of the norm (Daniel, Gragg,
        # Kaufman and Stewart 1976): two reads of the basis per step as a rule, not four.
        before = norm(w, self.buffer)
        alpha = c[-1] + self.project_out(w)[m]
        if norm(w, self.buffer) < before / math.sqrt(2):
            alpha += self.project_out(w)[m]
        beta = norm(w, self.buffer)
        self.alpha.append(alpha)
        self.scale = max(self.scale, abs(alpha), beta, w_norm)
        if beta <= self.breakdown_tol * self.scale:
            self.beta.append(0.0)
            self.next_q = None
            return False
        self.beta.append(beta)
        self.next_q = w.div_(beta)
        return True

    def _check_symmetry(self, q0_A_q1: float, scale: float) -> None:
        """``<q0, A q1>`` must equal ``beta_0 = <q1, A q0>``: a free check of symmetry."""
        tol = 10 * math.sqrt(torch.finfo(self.matvec.A.dtype).eps) * max(scale, self.scale)
        if abs(q0_A_q1 - self.beta[0]) > tol:
            raise ValueError(f"{self.matvec.call}: the operator is not symmetric: "
                             f"<q0, A q1> = {q0_A_q1:.6g} but <q1, A q0> = {self.beta[0]:.6g}; "
                             "Lanczos needs a symmetric operator (pass check_symmetry=False to "
                             "skip this check)")

    def restart(self, generator: torch.Generator | None) -> bool:
        """After a breakdown, continue with a random vector orthogonal to the basis."""
        P, m = self.rows[0].shape[0], self.m
        if m >= P:
            return False
        z = random_vectors(P, 1, self.matvec.A, generator)[:, 0]  # (P,)
        z = z.to(device=self.matvec.device, dtype=self.matvec.dtype)
        for _ in range(2):
            self.project_out(z)
        if norm(z, self.buffer) < 1e-8:
            return False
        self.next_q = z / norm(z, self.buffer)
        return True

    def combine(self, S: np.ndarray) -> Tensor:
        """``Q^T S (P, j)`` for ``S (m, j)``: Ritz vectors from eigenvectors of ``T``.

        Consumes the basis. For ``j <= m`` the combination is written over the first ``j``
        basis vectors, a slice of ``P`` at a time (each slice of all ``m`` rows is read before
        any is written), and the other rows are released before the result is assembled: the
        peak is ``max(m + 1, 2 j)`` vectors plus a slice of ``P / 4`` values, not ``m + j``.
        """
        m, j = S.shape
        dtype, device = self.matvec.dtype, self.matvec.device
        rows, self.rows, self.next_q = self.rows, [], None
        S_t = torch.as_tensor(S.T, dtype=dtype, device=device)  # (j, m)
        P = rows[0].shape[0]
        if j > m:  # more vectors wanted than the basis has (a tiny operator): plainly
            return torch.stack(rows, dim=1) @ S_t.T  # (P, j)
        chunk = max(1 << 12, -(-P // (4 * m)))  # (m, chunk): P / 4 values once P >= 16384 m
        for a in range(0, P, chunk):
            block = torch.stack([r[a: a + chunk] for r in rows])  # (m, c)
            out = S_t @ block  # (j, c)
            for i in range(j):
                rows[i][a: a + chunk] = out[i]
        del rows[j:]
        X = torch.empty(P, j, dtype=dtype, device=device)  # (P, j)
        for i in range(j):
            X[:, i] = rows[i]
            rows[i] = X[:0, 0]  # release the row
        return X

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values ``(m,)``, eigenvectors of ``T`` ``(m, m)`` and residuals ``(m,)``."""
        alpha = np.asarray(self.alpha)
        theta, S = eigh_tridiagonal(alpha, np.asarray(self.beta[:-1])) if self.m > 1 else (
            alpha, np.ones((1, 1)))
        return theta, S, np.abs(self.beta[-1] * S[-1, :])


def start_vector(v0: Tensor | None, P: int, A: Any, generator: torch.Generator | None,
                 call: str) -> Tensor:
    """``(P,)`` float64: ``v0`` (a block of previous eigenvectors is summed) or a random vector."""
    if v0 is None:
        return random_vectors(P, 1, A, generator)[:, 0]
    if not isinstance(v0, Tensor) or v0.ndim not in (1, 2) or v0.shape[0] != P:
        got = tuple(v0.shape) if isinstance(v0, Tensor) else type(v0).__name__
        raise ValueError(f"{call}: v0 must be a vector ({P},) or a block ({P}, j), got {got}")
    q = (v0 if v0.ndim == 1 else v0.sum(dim=1)).to(device=A.device, dtype=torch.float64)  # (P,)
    if not torch.isfinite(q).all() or float(q.norm()) == 0.0:
        raise ValueError(f"{call}: v0 must be finite and nonzero")
    return synced(q, A)


def check_arguments(P: int, k: int, tol: float, call: str, *, which: str = "LA",
                    bound: str = "gap", basis_dtype: torch.dtype = torch.float64) -> None:
    """The checks that :func:`lanczos` and :func:`~curvlab.linalg.subspace_eigs` share."""
    if which not in WHICH:
        raise ValueError(f"{call}: which must be one of {WHICH}, got {which!r}")
    if bound not in ("gap", "residual"):
        raise ValueError(f"{call}: bound must be 'gap' or 'residual', got {bound!r}")
    if basis_dtype not in (torch.float64, torch.float32):
        raise ValueError(f"{call}: basis_dtype must be torch.float64 or torch.float32, got "
                         f"{basis_dtype}")
    if not 1 <= k < P:
        raise ValueError(f"{call}: k must satisfy 1 <= k < P = {P}, got k={k}; for all "
                         "eigenvalues of a small operator use torch.linalg.eigh on a dense matrix")
    if not tol > 0:
        raise ValueError(f"{call}: tol must be positive (a relative eigenvalue accuracy), "
                         f"got {tol}")


def lanczos(
    A: Any,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-4,
    max_iters: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    check_symmetry: bool = True,
    throw: bool = False,
    bound: str = "gap",
    basis_dtype: torch.dtype = torch.float64,
    basis_device: torch.device | str | None = None,
    keep: int = 0,
) -> EigResult:
    """``k`` eigenpairs of a symmetric operator ``A (P, P)`` by Lanczos.

    Args:
        A: a dense tensor or an operator with ``shape``, ``dtype``, ``device`` and ``A @ v``.
        k: how many eigenpairs, ``1 <= k < P``.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest, ``"LM"`` largest magnitude,
            ``"BE"`` both ends (``ceil(k/2)`` from the top, the rest from the bottom).
        tol: relative accuracy of every returned eigenvalue (see the module docstring), relative
            to ``max(|theta|, sqrt(eps) * max|theta|)`` so that zero eigenvalues can converge
            (``eps`` of the operator's dtype). Below float64, no bound is claimed under the
            rounding of one product, ``eps * ||A||``.
        max_iters: most Lanczos steps (= products); default ``min(P, max(100, 10 k + 50))``.
        v0: warm start: a vector ``(P,)`` or a block ``(P, j)`` of previous eigenvectors.
        generator: randomness for the start vector and restarts after a breakdown.
        check_symmetry: compare ``<q0, A q1>`` with ``<q1, A q0>`` once (costs no product).
        throw: raise :class:`ConvergenceError` instead of returning ``converged=False``.
        bound: ``"gap"`` stops on ``min(r, r^2 / gap)``; ``"residual"`` on the rigorous ``r``
            alone (for clusters narrower than the tolerance, see the module docstring).
        basis_dtype: dtype of the Krylov basis and the work vectors, float64 (default) or
            float32 (half the memory; accuracy as in the module docstring).
        basis_device: where the basis lives (default the operator's device); ``"cpu"`` keeps it
            in host memory for an operator on a GPU. The eigenvectors are returned there.
        keep: also return the ``keep`` leading Ritz vectors (in ``which`` order) as
            ``ritz_vectors (P, keep)``, the warm block of :func:`~curvlab.linalg.subspace_eigs`.

    Returns:
        :class:`EigResult` with ``eigenvalues (k,)``, ``eigenvectors (P, k)`` and residuals.
    """
    call = "lanczos"
    P = check_operator(A, call)
    check_arguments(P, k, tol, call, which=which, bound=bound, basis_dtype=basis_dtype)
    if not 0 <= keep <= P:
        raise ValueError(f"{call}: keep must satisfy 0 <= keep <= P = {P}, got {keep}")
    max_iters = min(P, max(100, 10 * k + 50)) if max_iters is None else min(int(max_iters), P)
    device = torch.device(A.device if basis_device is None else basis_device)
    matvec = Matvec(A, call, basis_dtype, device)
    basis = KrylovBasis(matvec, start_vector(v0, P, A, generator, call),
                        check_symmetry=check_symmetry)
    # Products (or a basis) in lower precision carry rounding of about eps * ||A||: no residual or
    # eigenvalue error is claimed below that.
    noise = noise_level(A.dtype, basis_dtype)
    while True:
        alive = basis.step()
        theta, S, residuals = basis.ritz()
        residuals = np.maximum(residuals, noise * basis.scale)
        done = False
        if theta.size >= k:
            wanted = select(theta, k, which)
            kind = bound if basis.m >= k + 3 else "residual"
            bounds = np.maximum(error_bounds(theta, residuals, wanted, kind, which),
                                noise * basis.scale)
            floor = math.sqrt(torch.finfo(A.dtype).eps) * np.max(np.abs(theta))
            done = bool(np.all(bounds <= tol * np.maximum(np.abs(theta[wanted]), floor)))
        if done or basis.m >= max_iters or (not alive and not basis.restart(generator)):
            break
    converged = done or basis.m == P
    if theta.size < k:
        wanted = select(theta, theta.size, which)
        bounds = np.maximum(error_bounds(theta, residuals, wanted, bound, which),
                             noise * basis.scale)
    kept = select(theta, min(keep, theta.size), which)
    X = basis.combine(np.concatenate([S[:, wanted], S[:, kept]], axis=1))  # (P, k + keep)
    rel = float(np.max(bounds / np.maximum(np.abs(theta[wanted]), 1e-300)))
    message = (f"converged: {len(wanted)} eigenvalues to relative accuracy {rel:.1e} <= tol "
               f"{tol:g} in {matvec.count} products" if converged else
               f"not converged after {basis.m} iterations ({matvec.count} products): relative "
               f"error bound {rel:.1e} > tol {tol:g}; raise max_iters (now {max_iters}), loosen "
               "tol, or warm-start with v0 = the previous eigenvectors"
               + (f" (float32 products or basis limit the accuracy to about {noise:.0e} "
                  "relative to ||A||; use float64 for more)" if noise and tol < 10 * noise
                  else ""))
    if not converged and throw:
        raise ConvergenceError(f"{call}: {message}")
    return EigResult(
        eigenvalues=torch.as_tensor(theta[wanted].copy()),
        eigenvectors=X[:, : len(wanted)].to(A.dtype),
        residuals=torch.as_tensor(residuals[wanted].copy()),
        error_bounds=torch.as_tensor(bounds),
        num_matvecs=matvec.count,
        converged=converged,
        message=message,
        ritz_vectors=X[:, len(wanted):] if keep else None,
    )
