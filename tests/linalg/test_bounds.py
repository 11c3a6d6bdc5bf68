"""The eigenvalue error bounds behind the stopping rules of lanczos and subspace_eigs: the
single-pair Kato-Temple bound and its block form for a cluster at the end of the spectrum."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import curvlab as cl
from curvlab.linalg.bounds import cluster_bounds, error_bounds, select
from linalg.designed import with_spectrum

lanczos_module = importlib.import_module("curvlab.linalg.lanczos")
tracking_module = importlib.import_module("curvlab.linalg.tracking")


def test_cluster_bound_by_hand() -> None:
    """theta (10, 9.999, 5), residuals 1e-3: the single-pair gap of the top value is
    0.001 - 0.001 = 0, so its bound is r = 1e-3; the block of the top two is 4.998 from the
    rest, so (1e-6 + 1e-6) / 4.998."""
    theta, r = np.array([9.999, 5.0, 10.0]), np.full(3, 1e-3)  # any order
    wanted = np.array([2, 0])  # the top two, as select() orders them
    single = error_bounds(theta, r, wanted, "gap")
    torch.testing.assert_close(torch.tensor(single),
                               torch.tensor([1e-3, 1e-3], dtype=torch.float64))
    block = 2e-6 / (9.999 - (5.0 + 1e-3))
    torch.testing.assert_close(torch.tensor(error_bounds(theta, r, wanted, "gap", "LA")),
                               torch.tensor([block, block], dtype=torch.float64), rtol=1e-12,
                               atol=0)
    # the smallest end, mirrored
    torch.testing.assert_close(torch.tensor(error_bounds(-theta, r, wanted, "gap", "SA")),
                               torch.tensor([block, block], dtype=torch.float64), rtol=1e-12,
                               atol=0)
    # "LM" and the residual bound are unchanged
    assert error_bounds(theta, r, wanted, "gap", "LM").tolist() == single.tolist()
    assert error_bounds(theta, r, wanted, "residual", "LA").tolist() == [1e-3, 1e-3]


def test_cluster_bound_without_a_separated_block_is_infinite() -> None:
    theta, r = np.array([1.0, 0.999]), np.array([0.1, 0.1])
    assert cluster_bounds(theta, r, np.array([0]), "LA").tolist() == [np.inf]
    assert error_bounds(theta, r, np.array([0]), "gap", "LA").tolist() == [0.1]  # r itself


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_cluster_bound_holds_on_random_ritz_pairs_and_is_tighter(which: str) -> None:
    """Rayleigh-Ritz on 300 perturbed top subspaces of matrices whose two extreme eigenvalues
    are 1e-6 to 1e-1 apart: the true error of both extreme Ritz values never exceeds the bound,
    and the median bound is far below the single-pair one."""
    rng = np.random.default_rng(0)
    P, ratios = 80, []
    for _ in range(300):
        eigs = np.sort(rng.uniform(0.0, 1.0, P))[::-1].copy()
        eigs[:3] = 2.0, 2.0 - 10 ** rng.uniform(-6, -1), 1.0 + rng.uniform(0.0, 0.8)
        eigs = eigs if which == "LA" else -eigs
        A = with_spectrum(torch.tensor(eigs), seed=int(rng.integers(1 << 30))).numpy()
        vecs = np.linalg.eigh(A)[1][:, ::-1] if which == "LA" else np.linalg.eigh(A)[1]
        m = int(rng.integers(2, 8))
        V = np.linalg.qr(vecs[:, :m] + 10 ** rng.uniform(-4, -1)
                         * rng.standard_normal((P, m)) / np.sqrt(P))[0]  # (P, m)
        theta, S = np.linalg.eigh(V.T @ A @ V)
        X = V @ S  # (P, m) Ritz vectors
        residuals = np.linalg.norm(A @ X - X * theta, axis=0)
        wanted = select(theta, 2, which)
        true = np.abs(eigs[:2] - theta[wanted])
        bounds = error_bounds(theta, residuals, wanted, "gap", which)
        assert np.all(true <= bounds * (1 + 1e-9) + 1e-13), (true, bounds)
        ratios.append(np.max(error_bounds(theta, residuals, wanted, "gap") / bounds))
    assert np.median(ratios) >= 5, np.median(ratios)


def test_lanczos_stops_sooner_on_a_clustered_top_and_stays_within_tol(monkeypatch) -> None:
    """Top pair 1e-3 apart, then a gap of 5: the block bound certifies tol 1e-6 with fewer
    products than the single-pair bound, and the values are right."""
    eigs = torch.cat([torch.tensor([10.0, 10.0 - 1e-3], dtype=torch.float64),
                      torch.linspace(0.0, 5.0, 198, dtype=torch.float64)])
    A = with_spectrum(eigs)

    def run():
        return cl.lanczos(A, 2, tol=1e-6, max_iters=200, generator=torch.Generator().manual_seed(3))

    block = run()
    monkeypatch.setattr(lanczos_module, "error_bounds",
                        lambda t, r, w, b="gap", which=None: error_bounds(t, r, w, b))
    single = run()
    assert block.converged and single.converged
    assert block.num_matvecs < single.num_matvecs, (block.num_matvecs, single.num_matvecs)
    torch.testing.assert_close(block.eigenvalues, eigs[:2], rtol=1e-6, atol=0)


def test_warm_start_from_ritz_vectors_is_orthonormal_in_the_basis_dtype() -> None:
    """A start that is nearly orthonormal takes the Cholesky QR path: orthonormal rows in the
    requested dtype spanning the start's columns; a dependent start the QR path, padded."""
    A = torch.eye(50, dtype=torch.float64)
    Y = torch.linalg.qr(torch.randn(50, 4, generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64))[0] + 1e-3  # (50, 4)
    for start in (Y, torch.cat([Y[:, :2], Y[:, :2]], dim=1)):  # independent, dependent
        for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            Q = tracking_module.orthonormal_start(start, 50, 4, A, None, "test", dtype)
            assert Q.dtype == dtype and Q.shape == (4, 50)
            Q = Q.double()
            torch.testing.assert_close(Q @ Q.T, torch.eye(4, dtype=torch.float64), rtol=0,
                                       atol=atol)
            coef = torch.linalg.lstsq(Q.T, start).solution  # (4, 4)
            torch.testing.assert_close(Q.T @ coef, start, rtol=0, atol=10 * atol)
