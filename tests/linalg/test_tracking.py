"""Tracking options: warm blocks (subspace_eigs, lanczos keep=), a float32 or host basis."""

from __future__ import annotations

import pytest
import torch
from cases import SINGLE_BATCH, case, hessian

import curvlab as cl
from curvlab.linalg._checks import dots
from linalg.designed import Counting, spectra, with_spectrum
from linalg.test_lanczos import check_result, top


def perturbed(A: torch.Tensor, size: float, seed: int = 0) -> torch.Tensor:
    """``A + size ||A|| E`` with a fixed symmetric ``E`` of unit spectral norm."""
    E = torch.randn(A.shape, generator=torch.Generator().manual_seed(seed), dtype=A.dtype)
    E = E + E.T
    return A + size * torch.linalg.matrix_norm(A, 2) * E / torch.linalg.matrix_norm(E, 2)


@pytest.mark.parametrize("name", ["separated", "negative", "gap_1e-6"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_subspace_eigs_from_a_random_block_matches_dense(name: str, k: int, which: str) -> None:
    eigs = spectra()[name]
    A, tol = with_spectrum(eigs), 1e-8
    bound = "residual" if name == "gap_1e-6" else "gap"
    start = torch.randn(A.shape[0], k + 1, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
    res = cl.subspace_eigs(A, k, start=start, which=which, tol=tol, max_iters=A.shape[0],
                           bound=bound)
    assert res.converged, res.message
    check_result(A, res, top(eigs, k, which), tol, norm=eigs.abs().max().item())
    X = res.ritz_vectors  # (P, k + 1), the next warm block
    assert X is not None and X.shape == (A.shape[0], k + 1)
    torch.testing.assert_close(X.T @ X, torch.eye(k + 1, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3])
def test_warm_block_after_a_small_change_needs_few_products(k: int) -> None:
    """The Ritz vectors of ``A`` start ``A'`` (a relative change of 1e-3): the top-k are found to
    tol 1e-6 in a handful of products, no more than Lanczos from the top vector alone."""
    A0 = with_spectrum(spectra()["separated"])
    A1 = Counting(perturbed(A0, 1e-3))
    first = cl.lanczos(A0, k, tol=1e-10, keep=k + 1, generator=torch.Generator().manual_seed(0))
    assert first.ritz_vectors is not None and first.ritz_vectors.shape == (200, k + 1)
    torch.testing.assert_close(first.ritz_vectors[:, :k].abs(), first.eigenvectors.abs(),
                               rtol=0, atol=1e-12)
    res = cl.subspace_eigs(A1, k, start=first.ritz_vectors, tol=1e-6)
    expected = torch.linalg.eigvalsh(A1.A).flip(0)[:k]
    assert res.converged, res.message
    check_result(A1.A, res, expected, 1e-6)
    assert res.num_matvecs == A1.count
    single = cl.lanczos(A1, k, tol=1e-6, v0=first.eigenvectors[:, 0])
    assert res.num_matvecs <= k + 1 + 6 and res.num_matvecs <= single.num_matvecs, (
        res.num_matvecs, single.num_matvecs)


@pytest.mark.parametrize("name", SINGLE_BATCH)
def test_subspace_eigs_on_the_zoo(name: str) -> None:
    c, H_dense = case(name), hessian(name)
    H = cl.HessianOperator(c.model, c.loss_fn, c.data)
    expected = torch.linalg.eigvalsh(H_dense).flip(0)[:2]
    start = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    res = cl.subspace_eigs(H, 2, start=start, tol=1e-8, max_iters=H.shape[0])
    assert res.converged, res.message
    check_result(H_dense, res, expected, 1e-8)


@pytest.mark.parametrize("name", SINGLE_BATCH)
@pytest.mark.parametrize("tol", [1e-4, 1e-5])
def test_float32_basis_meets_the_tolerance_on_the_zoo(name: str, tol: float) -> None:
    c, H_dense = case(name), hessian(name)
    H = cl.HessianOperator(c.model, c.loss_fn, c.data)
    expected = torch.linalg.eigvalsh(H_dense).flip(0)[:2]
    res = cl.lanczos(H, 2, tol=tol, basis_dtype=torch.float32, max_iters=H.shape[0],
                     generator=torch.Generator().manual_seed(0))
    assert res.converged, res.message
    assert res.eigenvectors.dtype == torch.float64  # returned in the operator's dtype
    err = (res.eigenvalues - expected).abs()
    assert (err <= tol * expected.abs()).all(), (err, expected)
    X = res.eigenvectors  # (P, 2)
    torch.testing.assert_close(X.T @ X, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-5)


def test_float32_basis_does_not_claim_accuracy_below_its_rounding() -> None:
    A = with_spectrum(spectra()["separated"])
    res = cl.lanczos(A, 1, tol=1e-12, max_iters=80, basis_dtype=torch.float32,
                     generator=torch.Generator().manual_seed(0))
    assert not res.converged
    assert "float32 products or basis limit the accuracy" in res.message
    # No bound below eps_32 times the running estimate of ||A|| (100; at least half of it).
    assert res.error_bounds.item() >= torch.finfo(torch.float32).eps * 50


class LocalizedDiagonal:
    """A float32 diagonal operator of ``P = 2^20`` whose top eigenvectors are ``e_0`` and
    ``e_1`` (eigenvalues 2.0 and 1.9, the rest in [0, 1)): vectors near them are localized, the
    case where one float32 sum over all ``P`` entries loses the most."""

    P = 1 << 20
    shape, dtype, device = (P, P), torch.float32, torch.device("cpu")

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.d = torch.rand(self.P, generator=g)  # (P,)
        self.d[0], self.d[1] = 2.0, 1.9
        start = torch.zeros(self.P, 2, dtype=torch.float64)  # (P, 2)
        start[0, 0] = start[1, 1] = 1.0
        self.start = start + 1e-3 * torch.randn(self.P, 2, generator=g, dtype=torch.float64)

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        return self.d[:, None] * V if V.ndim == 2 else self.d * V


def test_float32_inner_products_are_accumulated_in_float64() -> None:
    x = torch.full((1 << 20,), 2.0**-13)  # squares exact in float32: only the sums round
    x[0] = 1.0  # one entry carries the sum; each term of the tail is below its rounding
    exact = x.double() @ x.double()  # (), 1 + 2^-6
    assert abs(float(x @ x) - float(exact)) > 1e-5  # what a float32 product of 2^20 loses
    torch.testing.assert_close(dots(x, x), exact, rtol=1e-6, atol=0)  # a few eps_32
    X = torch.stack([x, x.flip(0), -x])  # (3, P)
    torch.testing.assert_close(dots(X, x), X.double() @ x.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(dots(X, X.T), X.double() @ X.double().T, rtol=1e-12, atol=0)


@pytest.mark.parametrize("call", ["subspace_eigs", "lanczos"])
def test_float32_basis_meets_a_tight_tolerance_at_a_million_parameters(call: str) -> None:
    """Before float64 accumulation both claimed convergence to 1e-6 while 8e-5 (subspace_eigs)
    and 3e-6 (lanczos) off the top eigenvalue 2."""
    A = LocalizedDiagonal()
    if call == "subspace_eigs":
        res = cl.subspace_eigs(A, 1, start=A.start, tol=1e-6, basis_dtype=torch.float32,
                               max_iters=40)
    else:
        res = cl.lanczos(A, 1, tol=1e-6, basis_dtype=torch.float32, v0=A.start[:, 0],
                         max_iters=60)
    assert res.converged, res.message
    torch.testing.assert_close(res.eigenvalues, torch.tensor([2.0], dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_host_basis_and_keep_match_the_default() -> None:
    eigs = spectra()["separated"]
    A = with_spectrum(eigs)
    g = torch.Generator
    ref = cl.lanczos(A, 2, tol=1e-10, generator=g().manual_seed(0))
    host = cl.lanczos(A, 2, tol=1e-10, basis_device="cpu", keep=4, generator=g().manual_seed(0))
    torch.testing.assert_close(host.eigenvalues, ref.eigenvalues, rtol=1e-14, atol=0)
    assert host.eigenvectors.device.type == "cpu" and ref.ritz_vectors is None
    assert host.ritz_vectors is not None and host.ritz_vectors.shape == (200, 4)
    torch.testing.assert_close(host.ritz_vectors.T @ host.ritz_vectors,
                               torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)


def test_slq_and_lanczos_unchanged_by_the_row_basis() -> None:
    """The basis grows row by row; a Krylov space that exhausts ``P`` gives the exact spectrum."""
    eigs = torch.linspace(-1.0, 3.0, 30, dtype=torch.float64)
    A = with_spectrum(eigs)
    res = cl.lanczos(A, 29, which="LA", tol=1e-12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.eigenvalues, eigs.flip(0)[:29], rtol=0, atol=1e-10)


def test_tracking_errors() -> None:
    A = with_spectrum(spectra()["separated"][:50])
    start = torch.ones(50, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"subspace_eigs: start must be a vector \(50,\) or a "
                                         r"block \(50, j\), got \(49,\)"):
        cl.subspace_eigs(A, start=torch.ones(49))
    with pytest.raises(ValueError, match="subspace_eigs: start must be finite"):
        cl.subspace_eigs(A, start=torch.full((50,), float("nan")))
    with pytest.raises(ValueError, match=r"keep must satisfy k = 2 <= keep <= P = 50, got 1"):
        cl.subspace_eigs(A, 2, start=start, keep=1)
    with pytest.raises(ValueError, match="subspace_eigs: bound must be 'gap' or 'residual'"):
        cl.subspace_eigs(A, start=start, bound="tight")
    with pytest.raises(ValueError, match=r"subspace_eigs: which must be one of"):
        cl.subspace_eigs(A, start=start, which="XX")
    with pytest.raises(ValueError, match="start block has 4 columns but max_iters is 3"):
        cl.subspace_eigs(A, start=torch.randn(50, 4, dtype=torch.float64), max_iters=3)
    with pytest.raises(cl.ConvergenceError, match="subspace_eigs: not converged after 3 products"):
        cl.subspace_eigs(A, start=torch.randn(50, 2, dtype=torch.float64), tol=1e-12,
                         max_iters=3, throw=True)
    with pytest.raises(ValueError, match=r"lanczos: basis_dtype must be torch\.float64 or "
                                         r"torch\.float32, got torch\.float16"):
        cl.lanczos(A, basis_dtype=torch.float16)
    with pytest.raises(ValueError, match="lanczos: keep must satisfy 0 <= keep <= P = 50, got 51"):
        cl.lanczos(A, keep=51)
