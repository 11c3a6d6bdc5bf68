"""Designed test operators: dense matrices with a chosen spectrum, and a large diagonal one."""

from __future__ import annotations

import torch
from torch import Tensor


def with_spectrum(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """A dense symmetric ``(P, P)`` float64 matrix ``Q diag(eigenvalues) Q^T``, Q random."""
    P = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return (Q * eigenvalues) @ Q.T


class Diagonal:
    """``diag(d)`` as an operator, for sizes where a dense matrix would not fit."""

    def __init__(self, d: Tensor) -> None:
        self.d = d
        self.shape = (d.numel(), d.numel())
        self.dtype, self.device = d.dtype, d.device

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.d * v if v.ndim == 1 else self.d[:, None] * v


class Counting:
    """Wraps an operator and counts the vectors it is applied to."""

    def __init__(self, A) -> None:
        self.A, self.count = A, 0
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def __matmul__(self, v: Tensor) -> Tensor:
        self.count += 1 if v.ndim == 1 else v.shape[1]
        return self.A @ v


def spectra() -> dict[str, Tensor]:
    """Named spectra (float64) for the Lanczos and power-iteration tests."""
    f64 = torch.float64
    bulk = torch.linspace(0.0, 5.0, 190, dtype=f64)
    return {
        "separated": torch.linspace(1.0, 100.0, 200, dtype=f64),
        "cluster": torch.cat([10.0 - 1e-3 * torch.arange(6, dtype=f64), bulk]),
        "gap_1e-6": torch.cat([torch.tensor([1.0, 1.0 - 1e-6], dtype=f64), bulk / 10]),
        "negative": torch.cat([torch.tensor([-50.0], dtype=f64),
                               torch.linspace(1, 10, 99, dtype=f64)]),
    }
