"""Lanczos on designed spectra and on the zoo Hessians."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import case, hessian

import curvlab as cl
from linalg.designed import Counting, Diagonal, spectra, with_spectrum


def check_result(A, res, expected: torch.Tensor, tol: float, norm: float | None = None) -> None:
    """Eigenvalues within tol, residuals and bounds truthful, eigenvectors orthonormal.

    ``tol`` is relative to ``max(|lambda|, sqrt(eps) ||A||)`` (lanczos' floor for zero eigenvalues).
    """
    scale = expected.abs().max().item() if norm is None else norm
    err = (res.eigenvalues - expected).abs()
    floor = 1.5e-8 * scale
    assert (err <= tol * expected.abs().clamp_min(floor) + 1e-13 * scale).all(), err
    X = res.eigenvectors.double()  # (P, k)
    AX = A @ X  # (P, k)
    true_residuals = (AX - X * res.eigenvalues).norm(dim=0)
    torch.testing.assert_close(res.residuals, true_residuals, rtol=1e-6, atol=1e-11 * scale)
    assert (err <= res.error_bounds + 1e-13 * scale).all()
    torch.testing.assert_close(X.T @ X, torch.eye(X.shape[1], dtype=torch.float64),
                               rtol=0, atol=1e-10)


def top(eigs: torch.Tensor, k: int, which: str) -> torch.Tensor:
    s = eigs.sort(descending=True).values
    if which == "LA":
        return s[:k]
    if which == "SA":
        return s.flip(0)[:k]
    if which == "LM":
        return eigs[eigs.abs().argsort(descending=True)][:k]
    return torch.cat([s[: (k + 1) // 2], s.flip(0)[: k // 2].flip(0)])


@pytest.mark.parametrize("name", list(spectra()))
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-10])
def test_designed_spectra(name: str, k: int, which: str, tol: float) -> None:
    eigs = spectra()[name]
    A = with_spectrum(eigs)
    # A tolerance below a cluster's width needs the rigorous residual bound (module docstring).
    width = {"cluster": 5e-4, "gap_1e-6": 1e-6}.get(name, 0.0)
    bound = "residual" if tol <= width else "gap"
    res = cl.lanczos(A, k, which=which, tol=tol, max_iters=A.shape[0], bound=bound,
                     generator=torch.Generator().manual_seed(1))
    assert res.converged, res.message
    check_result(A, res, top(eigs, k, which), tol, norm=eigs.abs().max().item())


def test_gap_bound_can_stall_inside_a_narrow_cluster() -> None:
    """The documented limit: below the cluster width the gap estimate is not to be trusted."""
    A = with_spectrum(spectra()["gap_1e-6"])
    res = cl.lanczos(A, 1, tol=1e-10, generator=torch.Generator().manual_seed(1))
    assert abs(res.eigenvalues.item() - 1.0) <= 1e-6  # off by at most the cluster's width


def test_which_picks_the_right_end_with_a_dominant_negative_eigenvalue() -> None:
    A = with_spectrum(spectra()["negative"])
    g = torch.Generator().manual_seed(0)
    la = cl.lanczos(A, 1, which="LA", tol=1e-10, generator=g).eigenvalues
    lm = cl.lanczos(A, 1, which="LM", tol=1e-10, generator=g).eigenvalues
    be = cl.lanczos(A, 2, which="BE", tol=1e-10, generator=g).eigenvalues
    torch.testing.assert_close(la, torch.tensor([10.0], dtype=torch.float64))
    torch.testing.assert_close(lm, torch.tensor([-50.0], dtype=torch.float64))
    torch.testing.assert_close(be, torch.tensor([10.0, -50.0], dtype=torch.float64))


def test_rank_deficient_matrix_breaks_down_before_k_and_restarts() -> None:
    eigs = torch.cat([torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), torch.zeros(47).double()])
    A = Counting(with_spectrum(eigs))
    res = cl.lanczos(A, 5, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert res.converged, res.message
    check_result(A.A, res, torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64), 1e-10)
    assert res.num_matvecs == A.count < 12  # an invariant subspace after 4 steps, then restarts


def test_twenty_eigenvalues() -> None:
    eigs = torch.linspace(1.0, 300.0, 300, dtype=torch.float64) ** 1.5
    A = with_spectrum(eigs, seed=3)
    res = cl.lanczos(A, 20, tol=1e-8, max_iters=300, generator=torch.Generator().manual_seed(0))
    assert res.converged, res.message
    check_result(A, res, top(eigs, 20, "LA"), 1e-8)


@pytest.mark.parametrize("k", [1, 5])
def test_large_diagonal_operator(k: int) -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.rand(100_000, generator=g, dtype=torch.float64)
    d[:5] = torch.tensor([3.0, 2.5, 2.0, 1.8, 1.6], dtype=torch.float64)
    A = Diagonal(d)
    res = cl.lanczos(A, k, tol=1e-8, max_iters=300, generator=g)
    assert res.converged, res.message
    check_result(A, res, top(d, k, "LA"), 1e-8)


@pytest.mark.parametrize("name", ["mlp_tanh", "cnn", "transformer", "batchnorm", "multibatch"])
@pytest.mark.parametrize("k", [1, 5])
def test_zoo_hessians(name: str, k: int) -> None:
    c, H_dense = case(name), hessian(name)
    H = cl.HessianOperator(c.model, c.loss_fn, c.data)
    res = cl.lanczos(H, k, tol=1e-10, max_iters=H.shape[0] - 1,
                     generator=torch.Generator().manual_seed(0))
    expected = torch.linalg.eigvalsh(H_dense).flip(0)[:k]
    assert res.converged, res.message
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-8, atol=0)
    assert res.num_matvecs == H.num_matvecs  # every product counted, and only those


def test_warm_start_needs_clearly_fewer_products() -> None:
    c = cl.testing.make_case("mlp_tanh")
    g = torch.Generator().manual_seed(0)
    first = cl.lanczos(cl.HessianOperator(c.model, c.loss_fn, c.data), 1, tol=1e-8, generator=g)
    opt = torch.optim.SGD(c.model.parameters(), lr=0.05)
    c.loss_fn(c.model(c.data[0]), c.data[1]).backward()
    opt.step()  # a small change of the parameters
    H = cl.HessianOperator(c.model, c.loss_fn, c.data)
    cold = cl.lanczos(H, 1, tol=1e-8, generator=g)
    warm = cl.lanczos(H, 1, tol=1e-8, v0=first.eigenvectors)
    assert cold.converged and warm.converged
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-7, atol=0)
    assert warm.num_matvecs <= 0.6 * cold.num_matvecs, (warm.num_matvecs, cold.num_matvecs)


def test_float32_operator_keeps_float64_arithmetic() -> None:
    eigs = torch.linspace(1.0, 2.0, 100, dtype=torch.float64)
    A = with_spectrum(eigs).float()
    res = cl.lanczos(A, 1, tol=1e-5, generator=torch.Generator().manual_seed(0))
    assert res.eigenvectors.dtype == torch.float32 and res.eigenvalues.dtype == torch.float64
    assert abs(res.eigenvalues.item() - 2.0) <= 1e-5 * 2.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfloat16_hessian_products_with_float64_lanczos(seed: int) -> None:
    """bfloat16 HVPs (eps 8e-3) through float64 Lanczos arithmetic: top-3 at tol 1e-2."""
    torch.manual_seed(seed)
    model = cl.testing.MLP(d_in=6, width=32, d_out=3).double().eval()
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
    loss = torch.nn.CrossEntropyLoss()
    H = cl.HessianOperator(model, loss, (x, y))
    low = copy.deepcopy(model).to(torch.bfloat16)
    Hb = cl.HessianOperator(low, loss, (x.to(torch.bfloat16), y))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close((Hb @ v.to(torch.bfloat16)).double(), H @ v, rtol=0,
                               atol=3e-2 * (H @ v).abs().max().item())
    expected = torch.linalg.eigvalsh(cl.testing.dense_hessian(model, loss, (x, y)))
    res = cl.lanczos(Hb, 3, tol=1e-2, generator=torch.Generator().manual_seed(0))
    assert res.converged and res.eigenvalues.dtype == torch.float64
    torch.testing.assert_close(res.eigenvalues, expected.flip(0)[:3], rtol=1e-2, atol=0)


def test_sharpness_matches_dense_top_eigenvalue() -> None:
    c, H_dense = case("cnn"), hessian("cnn")
    value = cl.sharpness(c.model, c.loss_fn, c.data, tol=1e-10, max_iters=200,
                         generator=torch.Generator().manual_seed(0))
    expected = torch.linalg.eigvalsh(H_dense)[-1].item()
    assert abs(value - expected) <= 1e-9 * abs(expected)
    d = torch.full((H_dense.shape[0],), 0.25, dtype=torch.float64)
    scaled = cl.sharpness(c.model, c.loss_fn, c.data, scales=d, tol=1e-10, max_iters=200)
    assert abs(scaled - expected / 4) <= 1e-9 * abs(expected)


def test_float32_operator_does_not_claim_accuracy_below_its_rounding() -> None:
    A = with_spectrum(spectra()["separated"]).float()
    res = cl.lanczos(A, 1, tol=1e-10, max_iters=60, generator=torch.Generator().manual_seed(0))
    assert not res.converged
    assert "float32 products or basis limit the accuracy" in res.message
    assert res.error_bounds.item() >= torch.finfo(torch.float32).eps * 100


def test_warm_started_results_stay_within_tol_along_training() -> None:
    """Small Krylov spaces overestimate the gap; the bound must still hold (module docstring)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    with torch.no_grad():
        y = cl.testing.MLP(8, 16, 2)(x)  # a teacher network (the set-up of `curvlab demo`)
    model = cl.testing.MLP(8, 64, 2).double()
    x, y = x.double(), y.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    v0, tol = None, 1e-4
    for step in range(40):
        if step % 10 == 0:
            H = cl.HessianOperator(model, cl.testing.mse, (x, y))
            res = cl.lanczos(H, 1, tol=tol, v0=v0)
            # P = 4866: the reference is Lanczos on the rigorous residual bound, to 1e-12.
            ref = cl.lanczos(H, 1, tol=1e-12, bound="residual", max_iters=400,
                             generator=torch.Generator().manual_seed(1)).eigenvalues.item()
            err = abs(res.eigenvalues.item() - ref)
            assert err <= tol * ref, (step, err)
            v0 = res.eigenvectors
        opt.zero_grad()
        cl.testing.mse(model(x), y).backward()
        opt.step()
