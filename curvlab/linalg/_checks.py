"""Operator validation, a counted, checked matvec, and the inner products of a float32 basis,
shared by the estimators."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_operator(A: Any, call: str) -> int:
    """Return ``P`` for a square operator ``A`` (anything with shape, dtype, device and ``@``)."""
    shape = getattr(A, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1] or not hasattr(A, "__matmul__"):
        raise TypeError(f"{call}: A must be a square operator with .shape (P, P), .dtype, .device "
                        f"and A @ v (a dense tensor qualifies), got {type(A).__name__}")
    if not (getattr(A, "dtype", None) is not None and A.dtype.is_floating_point):
        raise TypeError(f"{call}: A must have a real floating dtype, got {A.dtype}")
    return int(shape[0])


def random_vectors(P: int, m: int, A: Any, generator: torch.Generator | None,
                   kind: str = "normal") -> Tensor:
    """``(P, m)`` float64 probe vectors on A's device: standard normal or Rademacher.

    Drawn on the CPU from ``generator`` (or the global generator) so results do not depend on the
    device; a distributed operator's ranks all use rank 0's draw.
    """
    if kind == "normal":
        Z = torch.randn(P, m, generator=generator, dtype=torch.float64)
    else:
        Z = torch.randint(0, 2, (P, m), generator=generator).to(torch.float64) * 2 - 1
    return synced(Z.to(A.device), A)  # (P, m)


def synced(t: Tensor, A: Any) -> Tensor:
    """``t`` as the first rank of ``A``'s process group holds it, when ``A`` is distributed
    (``A.broadcast``), so that every rank starts from the same vectors."""
    broadcast = getattr(A, "broadcast", None)
    return broadcast(t) if callable(broadcast) else t


SLICE = 1 << 17


def dots(X: Tensor, y: Tensor, buffer: Tensor | None = None) -> Tensor:
    """``X @ y`` in float64 for ``X (m, P)`` or ``(P,)`` and ``y (P,)`` or ``(P, q)``.

    In float64 this is ``X @ y``. With a float32 operand, one product over all ``P`` entries
    loses accuracy as ``P`` grows (most where the terms share a sign, ``q . A q`` or ``q . q``,
    or a few entries carry the sum), and Rayleigh-Ritz and Lanczos pass that error on to the
    eigenvalues. Here the products of each slice of ``2^17`` entries go to a float32 buffer,
    are summed by torch's pairwise reduction, and the slices' sums are added in float64: an
    error of a few ``eps_32`` for any ``P`` (``benchmarks/README.md``, "Inner products of a
    float32 basis", has the measurements). ``buffer``: a float32 ``(>= m, >= min(2^17, P))``
    work tensor kept by a caller that iterates over the same ``P``, so that no call allocates.

    Example:
        >>> import torch
        >>> x = torch.full((10**7,), 3.0)
        >>> float(dots(x, x))
        90000000.0
    """
    if X.dtype == torch.float64 and y.dtype == torch.float64:
        return X @ y
    P = y.shape[0]
    if y.ndim == 2:  # a small Gram matrix (j, q): slices in float64
        total = torch.zeros(*X.shape[:-1], y.shape[1], dtype=torch.float64, device=y.device)
        for a in range(0, P, SLICE):
            total += X[..., a: a + SLICE].double() @ y[a: a + SLICE].double()  # (m, q)
        return total
    rows = X if X.ndim == 2 else X[None]  # (m, P)
    m, c = rows.shape[0], min(SLICE, P)
    buf = buffer if buffer is not None and buffer.shape[0] >= m and buffer.shape[1] >= c else \
        torch.empty(m, c, dtype=torch.promote_types(X.dtype, y.dtype), device=y.device)
    total = torch.zeros(rows.shape[0], dtype=torch.float64, device=y.device)  # (m,)
    for a in range(0, P, SLICE):
        part = buf[:m, : min(SLICE, P - a)]  # (m, c)
        torch.mul(rows[:, a: a + SLICE], y[a: a + SLICE], out=part)
        total += part.sum(dim=1)
    return total if X.ndim == 2 else total[0]


def work_buffer(m: int, like: Tensor) -> Tensor | None:
    """The ``buffer`` of :func:`dots` for ``m`` rows of vectors like ``like (P,)``; ``None``
    in float64, which needs none."""
    if like.dtype == torch.float64:
        return None
    return torch.empty(m, min(SLICE, like.shape[-1]), dtype=like.dtype, device=like.device)


def norm(x: Tensor, buffer: Tensor | None = None) -> float:
    """``||x||`` of a vector ``(P,)``, accumulated as :func:`dots`, so that a float32 vector
    divided by it is unit to a few ``eps_32``."""
    return float(dots(x, x, buffer)) ** 0.5


class Matvec:
    """``A @ V`` in A's dtype and on A's device, counted per column and checked finite; results
    in ``dtype`` (default float64) on ``device`` (default A's)."""

    def __init__(self, A: Any, call: str, dtype: torch.dtype = torch.float64,
                 device: torch.device | None = None) -> None:
        self.A, self.call, self.count = A, call, 0
        self.dtype, self.device = dtype, torch.device(A.device) if device is None else device

    def __call__(self, V: Tensor, iteration: int) -> Tensor:
        out = self.A @ V.to(device=self.A.device, dtype=self.A.dtype)  # (P,) or (P, m)
        self.count += 1 if V.ndim == 1 else V.shape[1]
        if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():  # cheap test first
            raise ValueError(f"{self.call}: the product at iteration {iteration} is not finite; "
                             "check the operator (e.g. the loss at these parameters)")
        return out.to(device=self.device, dtype=self.dtype)
