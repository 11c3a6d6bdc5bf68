"""The model zoo as data: which cases run in which test, and their dense references (cached).

Each case is built by ``curvlab.testing.make_case``; the dense references are computed once per
session in float64 by plain double backward.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from curvlab.testing import CASES, MLP, Case, dense_ggn, dense_hessian, make_case

ZOO = CASES  # every case, each in eval mode and float64
SINGLE_BATCH = tuple(c for c in ZOO if c != "multibatch")
LAYERNORM = ("transformer",)

# Tolerances live in one table keyed by dtype: relative to the largest entry of the reference.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@cache
def case(name: str) -> Case:
    return make_case(name)


@cache
def hessian(name: str) -> Tensor:
    c = case(name)
    return dense_hessian(c.model, c.loss_fn, c.data)


@cache
def ggn(name: str) -> Tensor:
    c = case(name)
    return dense_ggn(c.model, c.loss_fn, c.data)


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float | None = None) -> None:
    """``assert_close`` with a tolerance relative to the largest entry of ``expected``."""
    tol = TOL[expected.dtype] if tol is None else tol
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-300))


def vectors(P: int, m: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """A fixed random block ``(P, m)``."""
    return torch.randn(P, m, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def mlp_problem(seed: int = 0) -> tuple[torch.nn.Module, tuple[Tensor, Tensor]]:
    """A float64 MLP (4 -> 8 -> 2) and one batch of 32 examples, for training-loop tests."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = MLP(4, 8, 2).double()
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randn(32, 2, generator=g, dtype=torch.float64)
    return model, (x, y)
