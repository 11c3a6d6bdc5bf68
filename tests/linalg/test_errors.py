"""Clear errors or honest results from the spectral estimators."""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from linalg.designed import spectra, with_spectrum


@pytest.fixture
def A() -> torch.Tensor:
    return with_spectrum(spectra()["separated"][:50])


def test_k_out_of_range(A) -> None:
    for estimator in (cl.lanczos, cl.power_iteration):
        with pytest.raises(ValueError, match=r"1 <= k < P = 50, got k=50"):
            estimator(A, 50)
        with pytest.raises(ValueError, match="got k=0"):
            estimator(A, 0)


def test_unknown_which_bound_and_tol(A) -> None:
    with pytest.raises(ValueError, match=r"which must be one of \('LA', .*'BE'\), got 'XX'"):
        cl.lanczos(A, which="XX")
    with pytest.raises(ValueError, match="bound must be 'gap' or 'residual'"):
        cl.lanczos(A, bound="tight")
    with pytest.raises(ValueError, match="tol must be positive"):
        cl.lanczos(A, tol=0.0)


class Failing:
    """A symmetric operator whose product turns non-finite at a given call."""

    def __init__(self, A: torch.Tensor, fail_at: int) -> None:
        self.A, self.fail_at, self.calls = A, fail_at, 0
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.A @ v
        return out * float("nan") if self.calls > self.fail_at else out


def test_non_finite_product_names_the_iteration(A) -> None:
    with pytest.raises(ValueError, match="lanczos: the product at iteration 3 is not finite"):
        cl.lanczos(Failing(A, 3), tol=1e-12)
    with pytest.raises(ValueError, match="power_iteration: the product at iteration 2"):
        cl.power_iteration(Failing(A, 2), tol=1e-12)
    with pytest.raises(ValueError, match="spectral_density: the product at iteration 0"):
        cl.spectral_density(Failing(A, 0))
    with pytest.raises(ValueError, match="hutchinson_trace: the product at iteration 0"):
        cl.hutchinson_trace(Failing(A, 0), 4)


def test_non_symmetric_operator(A) -> None:
    B = A + 0.1 * torch.triu(torch.ones_like(A))
    with pytest.raises(ValueError, match=r"not symmetric.*check_symmetry=False"):
        cl.lanczos(B)
    with pytest.raises(ValueError, match="not symmetric"):
        cl.spectral_density(B)
    cl.lanczos(B, check_symmetry=False)  # the check can be turned off


def test_not_converged_is_reported_or_raised(A) -> None:
    res = cl.lanczos(A, 5, tol=1e-12, max_iters=6, generator=torch.Generator().manual_seed(0))
    assert not res.converged and res.num_matvecs == 6
    assert "not converged after 6 iterations" in res.message and "raise max_iters" in res.message
    with pytest.raises(cl.ConvergenceError, match="not converged after 6 iterations"):
        cl.lanczos(A, 5, tol=1e-12, max_iters=6, throw=True)


def test_bad_operators_and_start_vectors(A) -> None:
    with pytest.raises(TypeError, match=r"square operator with \.shape \(P, P\)"):
        cl.lanczos(torch.ones(3, 4))
    with pytest.raises(TypeError, match="real floating dtype"):
        cl.lanczos(torch.eye(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"v0 must be a vector \(50,\) or a block \(50, j\)"):
        cl.lanczos(A, v0=torch.ones(49, dtype=torch.float64))
    with pytest.raises(ValueError, match="v0 must be finite and nonzero"):
        cl.lanczos(A, v0=torch.zeros(50, dtype=torch.float64))


def test_bad_budgets(A) -> None:
    with pytest.raises(ValueError, match="num_probes and num_iters must be >= 1"):
        cl.spectral_density(A, num_probes=0)
    with pytest.raises(ValueError, match="num_matvecs must be >= 1"):
        cl.hutchinson_trace(A, 0)
    with pytest.raises(ValueError, match="num_matvecs must be >= 3"):
        cl.hutchpp_trace(A, 2)
    d = cl.spectral_density(A, num_probes=1, num_iters=4)
    with pytest.raises(ValueError, match="sigma must be positive"):
        d.evaluate([0.0], sigma=0.0)


def test_sharpness_raises_when_lanczos_does_not_converge() -> None:
    c = cl.testing.make_case("mlp_tanh")
    with pytest.raises(cl.ConvergenceError, match="raise max_iters"):
        cl.sharpness(c.model, c.loss_fn, c.data, tol=1e-14, max_iters=3)
