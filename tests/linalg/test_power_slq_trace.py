"""Power iteration, SLQ densities and trace estimators on designed operators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import curvlab as cl
from linalg.designed import Counting, spectra, with_spectrum


def test_power_iteration_with_deflation() -> None:
    eigs = torch.cat([torch.tensor([-8.0, 6.0, 4.0], dtype=torch.float64),
                      torch.linspace(-1, 1, 47, dtype=torch.float64)])
    A = Counting(with_spectrum(eigs))
    res = cl.power_iteration(A, 3, tol=1e-8, max_iters=2000,
                             generator=torch.Generator().manual_seed(0))
    assert res.converged, res.message
    torch.testing.assert_close(res.eigenvalues, torch.tensor([-8.0, 6.0, 4.0]).double(),
                               rtol=1e-8, atol=0)
    assert res.num_matvecs == A.count
    X = res.eigenvectors
    true_residuals = (A.A @ X - X * res.eigenvalues).norm(dim=0)
    torch.testing.assert_close(res.residuals, true_residuals, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(X.T @ X, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)


def test_power_iteration_needs_more_products_than_lanczos() -> None:
    A = with_spectrum(spectra()["separated"])
    g = torch.Generator().manual_seed(0)
    power = cl.power_iteration(A, tol=1e-6, max_iters=5000, generator=g)
    lanczos = cl.lanczos(A, tol=1e-6, generator=g)
    assert power.converged and lanczos.converged
    assert abs(power.eigenvalues.item() - 100.0) <= 1e-6 * 100
    assert lanczos.num_matvecs < power.num_matvecs / 5


def test_power_iteration_not_converged() -> None:
    A = with_spectrum(spectra()["cluster"])
    res = cl.power_iteration(A, tol=1e-12, max_iters=5, generator=torch.Generator().manual_seed(0))
    assert not res.converged and res.num_matvecs == 5
    assert "raise max_iters" in res.message
    with pytest.raises(cl.ConvergenceError, match=r"not converged.*raise max_iters"):
        cl.power_iteration(A, tol=1e-12, max_iters=5, throw=True)


def test_slq_density_integrates_to_one_and_trace() -> None:
    eigs = spectra()["separated"]
    A = with_spectrum(eigs)
    g = torch.Generator().manual_seed(0)
    d = cl.spectral_density(A, num_probes=4, num_iters=30, generator=g)
    assert d.nodes.shape == (4, 30) and d.num_matvecs == 120
    torch.testing.assert_close(d.weights.sum(1), torch.ones(4, dtype=torch.float64))
    grid = np.linspace(-20, 120, 4001)
    integral = np.trapezoid(d.evaluate(grid, sigma=2.0).numpy(), grid)
    assert abs(integral - 1.0) < 1e-6


def test_slq_moments_converge_as_probes_grow() -> None:
    g = torch.Generator().manual_seed(0)
    eigs = torch.rand(400, generator=g, dtype=torch.float64) ** 3 * 10
    A = with_spectrum(eigs, seed=1)
    exact = {p: float((eigs**p).mean()) for p in (1, 2)}
    errors = {}
    for probes in (2, 64):
        errs = {1: [], 2: []}
        for seed in range(6):
            d = cl.spectral_density(A, num_probes=probes, num_iters=20,
                                    generator=torch.Generator().manual_seed(100 + seed))
            for p in (1, 2):
                errs[p].append(abs(d.moment(p) - exact[p]) / exact[p])
        errors[probes] = {p: float(np.mean(e)) for p, e in errs.items()}
    for p in (1, 2):  # expected ratio sqrt(32) ~ 5.7
        assert errors[64][p] < errors[2][p] / 3, errors
        assert errors[64][p] < 0.05


def _decaying(P: int = 1000) -> torch.Tensor:
    return with_spectrum(1.0 / torch.arange(1, P + 1, dtype=torch.float64) ** 2, seed=2)


def _mean_error(estimator, A, m: int, exact: float, seeds: range) -> float:
    return float(np.mean([abs(estimator(A, m, generator=torch.Generator().manual_seed(s)).estimate
                              - exact) / exact for s in seeds]))


def test_hutchinson_and_hutchpp_rates() -> None:
    A = _decaying()
    exact = float(torch.trace(A))
    seeds = range(20)
    h30, h300 = (_mean_error(cl.hutchinson_trace, A, m, exact, seeds) for m in (30, 300))
    p30, p300 = (_mean_error(cl.hutchpp_trace, A, m, exact, seeds) for m in (30, 300))
    assert 2.0 < h30 / h300 < 6.0, (h30, h300)  # 1 / sqrt(m): ratio sqrt(10) ~ 3.2
    assert p30 / p300 > 10.0, (p30, p300)  # at least 1 / m on a decaying spectrum


def test_hutchpp_beats_hutchinson_on_low_rank_plus_noise() -> None:
    P = 800
    g = torch.Generator().manual_seed(3)
    eigs = 0.01 * torch.rand(P, generator=g, dtype=torch.float64)
    eigs[:10] += torch.linspace(10, 20, 10, dtype=torch.float64)
    A = Counting(with_spectrum(eigs, seed=4))
    exact = float(eigs.sum())
    seeds = range(10)
    hutch = _mean_error(cl.hutchinson_trace, A.A, 60, exact, seeds)
    pp = _mean_error(cl.hutchpp_trace, A.A, 60, exact, seeds)
    assert pp < hutch / 5, (pp, hutch)
    res = cl.hutchpp_trace(A, 60)
    assert res.num_matvecs == A.count == 60 and res.stderr > 0


def test_trace_estimators_agree_with_slq_trace_on_a_hessian() -> None:
    c = cl.testing.make_case("mlp_tanh")
    H = cl.HessianOperator(c.model, c.loss_fn, c.data)
    H_dense = cl.testing.dense_hessian(c.model, c.loss_fn, c.data)
    exact = float(torch.trace(H_dense))
    g = torch.Generator().manual_seed(0)
    est = cl.hutchinson_trace(H, 400, generator=g)
    assert abs(est.estimate - exact) < 4 * est.stderr
    d = cl.spectral_density(H, num_probes=16, num_iters=40, generator=g)
    assert abs(d.trace() - exact) < 0.2 * abs(exact)
