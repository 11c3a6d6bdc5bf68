"""Empirical NTK against explicit Jacobian products on the zoo, and the kernel metrics."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from cases import assert_rel_close

import curvlab as cl
from curvlab.testing import dense_jacobian, make_case

NTK_ZOO = ("mlp_tanh", "mlp_relu", "cnn", "transformer", "batchnorm", "shared", "dict_input")
METHODS = ("structured", "jacobian", "ntvp", "auto")


def inputs(name: str):
    c = make_case(name)
    return c.model, c.data[0]


def split(x, n: int):
    """The first ``n`` and the remaining examples of a batch (dicts too)."""
    first = torch.utils._pytree.tree_map(lambda t: t[:n], x)
    rest = torch.utils._pytree.tree_map(lambda t: t[n:], x)
    return first, rest


@cache
def reference(name: str) -> torch.Tensor:
    """``J(x1) J(x2)^T`` as ``(n1, n2, k, k)`` from explicit Jacobians, x1 = first 5 examples."""
    model, x = inputs(name)
    x1, x2 = split(x, 5)
    J1, J2 = dense_jacobian(model, x1), dense_jacobian(model, x2)  # (n, k, P)
    return torch.einsum("iap,jbp->ijab", J1, J2)


@pytest.mark.parametrize("name", NTK_ZOO)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("outputs", ["full", "trace", "diagonal"])
def test_kernel_equals_explicit_jacobian_product(name: str, method: str, outputs: str) -> None:
    model, x = inputs(name)
    x1, x2 = split(x, 5)
    K = cl.empirical_ntk(model, x1, x2, outputs=outputs, method=method)
    full = reference(name)
    expected = {"full": full, "diagonal": torch.diagonal(full, dim1=2, dim2=3),
                "trace": torch.diagonal(full, dim1=2, dim2=3).sum(-1)}[outputs]
    assert_rel_close(K, expected)


@pytest.mark.parametrize("name", ["mlp_tanh", "transformer", "shared"])
def test_symmetric_psd_and_methods_agree(name: str) -> None:
    model, x = inputs(name)
    kernels = {m: cl.empirical_ntk(model, x, method=m) for m in METHODS}
    for m in METHODS[1:]:
        assert_rel_close(kernels[m], kernels["structured"], tol=1e-12)
    n, k = kernels["jacobian"].shape[0], kernels["jacobian"].shape[2]
    M = kernels["structured"].permute(0, 2, 1, 3).reshape(n * k, n * k)
    assert_rel_close(M, M.T, tol=1e-12)
    assert torch.linalg.eigvalsh(M).min() > -1e-10 * M.abs().max()
    J = dense_jacobian(model, x)
    trace = torch.diagonal(M).sum()
    assert_rel_close(trace, J.pow(2).sum())  # tr Theta(X, X) = sum_i ||J_i||_F^2


def test_linear_model_gives_inner_product_plus_one() -> None:
    model = torch.nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for method in METHODS:
        K = cl.empirical_ntk(model, x, method=method)
        expected = (x @ x.T + 1)[:, :, None, None] * torch.eye(3, dtype=torch.float64)
        assert_rel_close(K, expected)


@pytest.mark.parametrize("method", METHODS)
def test_per_layer_kernels_sum_to_the_whole(method: str) -> None:
    model, x = inputs("cnn")
    parts = cl.empirical_ntk_per_layer(model, x, method=method)
    assert set(parts) == {"conv1", "conv2", "head"}
    assert_rel_close(sum(parts.values()), cl.empirical_ntk(model, x, method=method))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("varying", [False, True])
def test_scales_give_j_d_jt(method: str, varying: bool) -> None:
    model, x = inputs("mlp_tanh")
    J = dense_jacobian(model, x)  # (n, k, P)
    g = torch.Generator().manual_seed(0)
    if varying:  # like Adam: varies inside each tensor (structured falls back to Jacobians)
        d = torch.rand(J.shape[2], generator=g, dtype=torch.float64) + 0.5
    else:  # like muP LR multipliers: constant per tensor
        rest = [*model[2].parameters(), *model[4].parameters()]
        opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 3.0}, {"params": rest}],
                              lr=1.0)
        d = cl.lr_scales(opt, model)
    K = cl.empirical_ntk(model, x, method=method, scales=d)
    assert_rel_close(K, torch.einsum("iap,p,jbp->ijab", J, d, J))


def test_ntk_eigenvalues_lanczos_matches_dense_for_n256() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = cl.testing.MLP(16, 32, 10).double().eval()
    x = torch.randn(256, 16, generator=g, dtype=torch.float64)
    dense = cl.ntk_eigenvalues(model, x, 10, solver="dense")
    lanczos = cl.ntk_eigenvalues(model, x, 10, solver="lanczos", tol=1e-10, generator=g)
    torch.testing.assert_close(lanczos, dense, rtol=1e-6, atol=0)
    K = cl.empirical_ntk(model, x[:20])
    M = K.permute(0, 2, 1, 3).reshape(200, 200)
    A = cl.NTKOperator(model, x[:20])
    V = torch.randn(200, 3, generator=g, dtype=torch.float64)
    assert_rel_close(A @ V, M @ V)


def test_metric_properties() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 5, generator=g, dtype=torch.float64)
    K = X @ X.T
    y = torch.randint(0, 3, (20,), generator=g)
    Y = torch.nn.functional.one_hot(y).double()
    for centered in (True, False):
        a = cl.kernel_alignment(K, y, centered=centered)
        assert abs(cl.kernel_alignment(7.0 * K, y, centered=centered) - a) < 1e-12
        assert abs(cl.kernel_alignment(Y @ Y.T, y, centered=False) - 1.0) < 1e-12
        assert a < 0.99
    assert abs(cl.kernel_alignment(Y @ Y.T, y, centered=True) - 1.0) < 1e-12
    assert abs(cl.kernel_distance(K, K)) < 1e-12
    assert abs(cl.kernel_distance(K, 3 * K)) < 1e-12
    assert cl.kernel_distance(K, torch.eye(20, dtype=torch.float64)) > 0.1
    assert abs(cl.effective_rank(torch.eye(20, dtype=torch.float64)) - 20) < 1e-10
    assert abs(cl.effective_rank(torch.outer(X[:, 0], X[:, 0])) - 1) < 1e-8
    assert abs(cl.relative_change(2 * K, K) - 1.0) < 1e-12


def test_ntk_errors() -> None:
    model, x = inputs("mlp_tanh")
    with pytest.raises(ValueError, match=r"cannot be applied to x1 of shape \(12, 5\)"):
        cl.empirical_ntk(model, x[:, :5])
    with pytest.raises(ValueError, match=r"outputs must be one of .*got 'sum'"):
        cl.empirical_ntk(model, x, outputs="sum")
    with pytest.raises(ValueError, match=r"method must be one of .*got 'fast'"):
        cl.empirical_ntk(model, x, method="fast")
    with pytest.raises(ValueError, match=r"scales must be a tensor of shape \(213,\)"):
        cl.empirical_ntk(model, x, scales=torch.ones(3))
    bn, xb = inputs("batchnorm")
    bn.train()
    with pytest.raises(ValueError, match=r"BatchNorm modules \['1'\] are in training mode"):
        cl.empirical_ntk(bn, xb)
    with pytest.raises(ValueError, match="expected a square kernel"):
        cl.kernel_alignment(torch.ones(3, 3, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="needs k"):
        cl.ntk_eigenvalues(model, x, solver="lanczos")
    with pytest.raises(ValueError, match="y must be labels"):
        cl.kernel_alignment(torch.eye(3), torch.zeros(4))


def test_structured_kernel_handles_scaled_and_custom_linear_layers():
    """Linear subclasses: curvlab's ScaledLinear (c W h + b) is factorized with its multiplier;
    a subclass with another forward falls back to per-example Jacobians. Both match the dense
    Jacobian kernel."""

    class Squared(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) ** 2

    torch.manual_seed(0)
    mup = cl.models.MLP(32, 3, cl.MuP(base_width=8), d_in=5, d_out=3).double()
    custom = torch.nn.Sequential(Squared(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    for model in (mup, custom):
        J = cl.testing.dense_jacobian(model, x)  # (n, k, P)
        ref = torch.einsum("iap,jbp->ijab", J, J)  # (n, n, k, k)
        K = cl.empirical_ntk(model, x, method="structured")
        torch.testing.assert_close(K, ref, rtol=1e-10, atol=1e-12)
