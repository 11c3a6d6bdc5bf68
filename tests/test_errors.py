"""Every raise of the operators and preconditioners, with the message it must carry."""

from __future__ import annotations

import pytest
import torch
from cases import vectors

import curvlab as cl
from curvlab.testing import make_case


@pytest.fixture
def c() -> cl.testing.Case:
    return make_case("mlp_tanh")


@pytest.mark.parametrize("Op", [cl.HessianOperator, cl.GGNOperator])
@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
def test_loss_that_is_not_a_scalar(c, Op, method) -> None:
    def per_example(f, y):
        return 0.5 * (f - y).pow(2).sum(-1)  # (n,): forgot the mean

    with pytest.raises(ValueError, match=r"scalar tensor, got \(12,\) for batch 0.*reduction"):
        A = Op(c.model, per_example, c.data, method=method)
        A @ vectors(A.shape[0], 1)[:, 0]


def test_no_parameter_requires_grad(c) -> None:
    c.model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        cl.HessianOperator(c.model, c.loss_fn, c.data)


def test_unknown_parameter_names(c) -> None:
    with pytest.raises(ValueError, match=r"unknown parameter names \['9.weight'\].*0.weight"):
        cl.HessianOperator(c.model, c.loss_fn, c.data, params=["0.weight", "9.weight"])
    with pytest.raises(ValueError, match="unknown parameter names"):
        cl.HessianOperator(c.model, c.loss_fn, c.data, params=[])


def test_vectors_of_wrong_shape_dtype_or_device(c) -> None:
    H = cl.HessianOperator(c.model, c.loss_fn, c.data)
    P = H.shape[0]
    with pytest.raises(ValueError, match=rf"\({P},\) or a block \({P}, m\).*got shape \(5,\)"):
        H @ torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"got shape \(213, 2, 2\)"):
        H @ torch.zeros(P, 2, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"expected dtype torch.float64.*got torch.float32"):
        H @ torch.zeros(P)
    with pytest.raises(ValueError, match=r"expected a tensor on cpu.*got one on meta"):
        H @ torch.zeros(P, dtype=torch.float64, device="meta")
    with pytest.raises(TypeError, match=r"expected a torch\.Tensor"):
        H @ ([0.0] * P)


def test_empty_data(c) -> None:
    with pytest.raises(ValueError, match="data holds no batches"):
        cl.HessianOperator(c.model, c.loss_fn, [])
    x, y = c.data
    H = cl.HessianOperator(c.model, c.loss_fn, [(x, y), (x[:0], y[:0])])
    with pytest.raises(ValueError, match="batch 1 is empty"):
        H @ vectors(H.shape[0], 1)


def test_data_of_the_wrong_kind(c) -> None:
    with pytest.raises(TypeError, match="one-shot iterator"):
        cl.HessianOperator(c.model, c.loss_fn, iter([c.data]))
    with pytest.raises(TypeError, match=r"data must be an \(inputs, targets\) tuple"):
        cl.HessianOperator(c.model, c.loss_fn, c.data[0])
    with pytest.raises(TypeError, match=r"batch 0 must be an \(inputs, targets\) pair"):
        cl.HessianOperator(c.model, c.loss_fn, [c.data[0]], reuse_graph=True)


def test_bad_method_model_or_loss(c) -> None:
    with pytest.raises(ValueError, match=r"method must be one of .*got 'fast'"):
        cl.HessianOperator(c.model, c.loss_fn, c.data, method="fast")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        cl.HessianOperator(lambda x: x, c.loss_fn, c.data)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        cl.HessianOperator(c.model, "mse", c.data)


def test_mixed_dtypes(c) -> None:
    c.model[0].float()
    with pytest.raises(TypeError, match="mix dtypes"):
        cl.HessianOperator(c.model, c.loss_fn, c.data)


@pytest.mark.parametrize("reuse", [True, False])
def test_non_finite_loss_names_the_batch(c, reuse) -> None:
    x, y = c.data
    bad = y.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="loss of batch 1 is nan"):
        H = cl.HessianOperator(c.model, c.loss_fn, [(x, y), (x, bad)], reuse_graph=reuse)
        H @ vectors(H.shape[0], 1)


@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
def test_non_finite_product_names_the_batch(c, method) -> None:
    def norm_loss(f, y):
        return (f - y).pow(2).sum().sqrt()  # finite at f = y, its derivatives are not

    x, y = c.data
    with torch.no_grad():
        y_exact = c.model(x)
    H = cl.HessianOperator(c.model, norm_loss, [(x, y), (x, y_exact)], method=method)
    with pytest.raises(ValueError, match="product for batch 1 is not finite"):
        H @ vectors(H.shape[0], 1)


def test_preconditioned_rejects_bad_scales() -> None:
    A = torch.eye(3)
    with pytest.raises(ValueError, match=r"d must be a tensor of shape \(3,\), got \(2,\)"):
        cl.preconditioned(A, torch.ones(2))
    with pytest.raises(ValueError, match="finite and non-negative with a positive entry"):
        cl.preconditioned(A, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match=r"finite and non-negative.*skip the measurement"):
        cl.preconditioned(A, torch.zeros(3))
    with pytest.raises(ValueError, match="finite and non-negative"):
        cl.preconditioned(A, torch.tensor([1.0, float("inf"), 1.0]))
    with pytest.raises(TypeError, match=r"square operator"):
        cl.preconditioned(torch.ones(3, 2), torch.ones(3))


def test_scales_reject_foreign_or_unstepped_parameters(c) -> None:
    opt = torch.optim.Adam(c.model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"parameter '2.weight' is not in the optimizer"):
        cl.lr_scales(opt, dict(c.model.named_parameters()))
    with pytest.raises(ValueError, match=r"'0.weight' has no Adam state yet.*optimizer.step\(\)"):
        cl.adam_scales(opt, dict(c.model[0].named_parameters(prefix="0")))
    sgd = torch.optim.SGD(c.model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"expected torch\.optim\.Adam or AdamW, got SGD"):
        cl.adam_scales(sgd, c.model)
    with pytest.raises(TypeError, match=r"expected torch\.optim\.Adam or AdamW, got NAdam"):
        cl.adam_scales(torch.optim.NAdam(c.model.parameters()), c.model)
    with pytest.raises(ValueError, match="base_lr must be positive"):
        cl.lr_scales(sgd, c.model, base_lr=0.0)
    with pytest.raises(TypeError, match="params must be a dict"):
        cl.lr_scales(sgd, torch.zeros(3))
