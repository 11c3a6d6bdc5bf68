"""HessianOperator and GGNOperator against dense float64 references on the model zoo."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from cases import LAYERNORM, ZOO, assert_rel_close, case, ggn, hessian, vectors
from scipy.sparse.linalg import eigsh

import curvlab as cl
from curvlab.testing import make_case

ROUTES = [("rev-rev", True), ("rev-rev", False), ("fwd-rev", True), ("fwd-rev", False)]


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize(("method", "reuse"), ROUTES)
def test_hessian_products_match_dense(name: str, method: str, reuse: bool) -> None:
    c, H_dense = case(name), hessian(name)
    H = cl.HessianOperator(c.model, c.loss_fn, c.data, method=method, reuse_graph=reuse)
    V = vectors(H.shape[0], 5)  # (P, 5)
    assert_rel_close(H @ V, H_dense @ V)
    assert_rel_close(H @ V[:, 2], H_dense @ V[:, 2])
    assert H.num_matvecs == 6


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize(("method", "reuse"), ROUTES)
def test_ggn_products_match_dense(name: str, method: str, reuse: bool) -> None:
    c, G_dense = case(name), ggn(name)
    G = cl.GGNOperator(c.model, c.loss_fn, c.data, method=method, reuse_graph=reuse)
    V = vectors(G.shape[0], 4, seed=1)  # (P, 4)
    assert_rel_close(G @ V, G_dense @ V)
    assert_rel_close(G @ V[:, 0], G_dense @ V[:, 0])


@pytest.mark.parametrize("name", ZOO)
def test_fwd_rev_and_rev_rev_agree(name: str) -> None:
    c = case(name)
    V = vectors(sum(p.numel() for p in c.model.parameters()), 3, seed=2)
    fwd = cl.HessianOperator(c.model, c.loss_fn, c.data, method="fwd-rev") @ V
    rev = cl.HessianOperator(c.model, c.loss_fn, c.data, method="rev-rev") @ V
    assert_rel_close(fwd, rev, tol=1e-12)


def test_unequal_batches_give_the_hessian_of_the_concatenated_data() -> None:
    c = case("multibatch")  # batches of 7, 3 and 12 examples
    x = torch.cat([b[0] for b in c.data])
    y = torch.cat([b[1] for b in c.data])
    H_whole = cl.testing.dense_hessian(c.model, c.loss_fn, (x, y))
    V = vectors(H_whole.shape[0], 3)
    for reuse in (False, True):
        H = cl.HessianOperator(c.model, c.loss_fn, c.data, reuse_graph=reuse)
        assert_rel_close(H @ V, H_whole @ V)
    # Equal weighting of batches would differ: the test can fail.
    per_batch = [cl.testing.dense_hessian(c.model, c.loss_fn, b) for b in c.data]
    assert (sum(per_batch) / 3 - H_whole).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["mlp_tanh", "transformer", "shared"])
def test_parameter_subset_gives_the_matching_block(name: str) -> None:
    c, H_dense = case(name), hessian(name)
    names = [n for n, _ in c.model.named_parameters()]
    subset = names[1::2]  # every other tensor, not contiguous in the flat vector
    sizes = {n: p.numel() for n, p in c.model.named_parameters()}
    offsets = np.cumsum([0] + [sizes[n] for n in names])
    index = torch.cat([torch.arange(offsets[i], offsets[i + 1])
                       for i, n in enumerate(names) if n in subset])
    block = H_dense[index][:, index]  # (P_sub, P_sub)
    for method in ("rev-rev", "fwd-rev"):
        H = cl.HessianOperator(c.model, c.loss_fn, c.data, params=subset, method=method)
        assert H.param_names == tuple(subset)
        V = vectors(H.shape[0], 3)
        assert_rel_close(H @ V, block @ V)
    G_block = ggn(name)[index][:, index]
    G = cl.GGNOperator(c.model, c.loss_fn, c.data, params=subset)
    assert_rel_close(G @ V, G_block @ V)


def test_to_scipy_eigsh_returns_the_dense_top_eigenvalue() -> None:
    c, H_dense = case("mlp_tanh"), hessian("mlp_tanh")
    H = cl.HessianOperator(c.model, c.loss_fn, c.data)
    top = eigsh(H.to_scipy(), k=1, which="LA", tol=1e-12, return_eigenvectors=False)[0]
    expected = torch.linalg.eigvalsh(H_dense)[-1].item()
    assert abs(top - expected) <= 1e-10 * abs(expected)


def test_auto_on_attention_model_under_default_sdpa_backend() -> None:
    c, H_dense = case("transformer"), hessian("transformer")
    # The model itself calls F.scaled_dot_product_attention with the default backend selection.
    H = cl.HessianOperator(c.model, c.loss_fn, c.data)
    assert H.method == "rev-rev"
    V = vectors(H.shape[0], 4)
    assert_rel_close(H @ V, H_dense @ V)
    x = c.data[0].float()
    model32 = copy.deepcopy(c.model).float()
    # The trap is real: in float32 the default CPU backend is the fused kernel, which has no
    # double backward, so a plain double backward through this model fails.
    loss = c.loss_fn(model32(x), c.data[1])
    grads = torch.autograd.grad(loss, list(model32.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(grads, list(model32.parameters()),
                            grad_outputs=[torch.ones_like(g) for g in grads])
    for method in ("auto", "fwd-rev"):
        H32 = cl.HessianOperator(model32, c.loss_fn, (x, c.data[1]), method=method)
        assert_rel_close(H32 @ V.float(), (H_dense @ V).float(), tol=1e-4)


@pytest.mark.parametrize("name", LAYERNORM)
def test_block_products_on_layernorm_model(name: str) -> None:
    """vmap over jvp(grad) must stay exact with LayerNorm (torch 2.13 breaks vmapped vjps)."""
    c, H_dense = case(name), hessian(name)
    H = cl.HessianOperator(c.model, c.loss_fn, c.data, method="fwd-rev", reuse_graph=False)
    V = vectors(H.shape[0], 8, seed=3)
    assert_rel_close(H @ V, H_dense @ V)


def test_dense_reference_matches_finite_differences_on_layernorm() -> None:
    """The reference itself is checked independently: central differences of the gradient."""
    c, H_dense = case("transformer"), hessian("transformer")
    theta = torch.cat([p.detach().reshape(-1) for p in c.model.parameters()])
    v = vectors(theta.numel(), 1, seed=4)[:, 0]

    def gradient(t: torch.Tensor) -> torch.Tensor:
        torch.nn.utils.vector_to_parameters(t, c.model.parameters())
        c.model.zero_grad()
        c.loss_fn(c.model(c.data[0]), c.data[1]).backward()
        return torch.cat([p.grad.reshape(-1) for p in c.model.parameters()])

    h = 1e-5
    fd = (gradient(theta + h * v) - gradient(theta - h * v)) / (2 * h)
    torch.nn.utils.vector_to_parameters(theta, c.model.parameters())
    assert_rel_close(fd, H_dense @ v, tol=1e-6)


def _state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize(("name", "module"), [("batchnorm", 1), ("dropout", 2)])
def test_products_leave_model_and_rng_untouched(method: str, kind: str, name: str, module: int
                                                ) -> None:
    c = make_case(name)
    model = c.model
    model[module].train()  # one module in another mode: modes are restored module by module
    before, modes = _state(model), [m.training for m in model.modules()]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    Op = cl.HessianOperator if kind == "hessian" else cl.GGNOperator
    A = Op(model, c.loss_fn, c.data, method=method, allow_train_mode=True)
    for _ in range(3):
        A @ vectors(A.shape[0], 2)
    after = _state(model)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert [m.training for m in model.modules()] == modes
    assert all(m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats"))
    assert torch.equal(torch.get_rng_state(), rng)


def test_train_mode_batchnorm_and_dropout_raise_unless_allowed() -> None:
    for name in ("batchnorm", "dropout"):
        c = make_case(name)
        c.model.train()
        with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\).*allow_train_mode"):
            cl.HessianOperator(c.model, c.loss_fn, c.data)
        with pytest.raises(ValueError, match="training mode"):
            cl.GGNOperator(c.model, c.loss_fn, c.data)
        cl.HessianOperator(c.model, c.loss_fn, c.data, allow_train_mode=True)


@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
@pytest.mark.parametrize("Op", [cl.HessianOperator, cl.GGNOperator])
def test_dropout_in_train_mode_is_one_fixed_symmetric_matrix(method: str, Op: type) -> None:
    c = make_case("dropout")
    c.model.train()
    A = Op(c.model, c.loss_fn, c.data, method=method, allow_train_mode=True, reuse_graph=False)
    eye = torch.eye(A.shape[0], dtype=torch.float64)
    M1, M2 = A @ eye, A @ eye  # (P, P) twice: the same masks are replayed
    torch.testing.assert_close(M1, M2, rtol=0, atol=0)
    assert_rel_close(M1, M1.T, tol=1e-12)
    columns = torch.stack([A @ eye[:, j] for j in range(3)], dim=1)  # one vector at a time
    assert_rel_close(columns, M1[:, :3], tol=1e-12)
    # Dropout is active: the train-mode matrix differs from the eval-mode one.
    eval_model = copy.deepcopy(c.model).eval()
    assert (M1 - Op(eval_model, c.loss_fn, c.data) @ eye).abs().max() > 1e-3
    other = Op(c.model, c.loss_fn, c.data, method=method, allow_train_mode=True, seed=1) @ eye
    assert (other - M1).abs().max() > 1e-6


def test_train_mode_batchnorm_matches_dense_batch_statistics() -> None:
    c = make_case("batchnorm")
    c.model.train()
    ref_model = copy.deepcopy(c.model)
    ref_model[1].track_running_stats = False  # batch statistics, no buffer writes
    ref_model[1].running_mean = ref_model[1].running_var = None
    H_dense = cl.testing.dense_hessian(ref_model, c.loss_fn, c.data)
    for method in ("rev-rev", "fwd-rev"):
        H = cl.HessianOperator(c.model, c.loss_fn, c.data, method=method, allow_train_mode=True)
        V = vectors(H.shape[0], 3)
        assert_rel_close(H @ V, H_dense @ V)


def test_operator_is_a_snapshot_of_the_parameters() -> None:
    c = make_case("mlp_tanh")
    H = cl.HessianOperator(c.model, c.loss_fn, c.data, reuse_graph=False)
    V = vectors(H.shape[0], 2)
    before = H @ V
    with torch.no_grad():
        for p in c.model.parameters():
            p.mul_(1.5)
    torch.testing.assert_close(H @ V, before, rtol=0, atol=0)


def test_float32_products_follow_model_dtype() -> None:
    c = make_case("cnn", dtype=torch.float32)
    H = cl.HessianOperator(c.model, c.loss_fn, c.data)
    assert H.dtype == torch.float32
    V = vectors(H.shape[0], 2)  # (P, 2) float64
    out = H @ V.float()
    assert out.dtype == torch.float32
    H_dense = cl.testing.dense_hessian(copy.deepcopy(c.model).double(), c.loss_fn,
                                       (c.data[0].double(), c.data[1]))
    assert_rel_close(out.double(), H_dense @ V, tol=1e-4)


class _Tied(torch.nn.Module):
    """An autoencoder whose decoder reuses the encoder's weight (one tensor, two names)."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = torch.nn.Linear(5, 3, bias=False), torch.nn.Linear(3, 5, bias=False)
        self.dec.weight = self.enc.weight  # tied: registered as enc.weight and dec.weight

    def forward(self, x):
        return torch.nn.functional.linear(torch.tanh(self.enc(x)), self.dec.weight.T)


def test_tied_weights_are_detected_and_differentiated_once():
    from curvlab.func import has_tied_tensors
    from curvlab.testing import dense_hessian, mse

    torch.manual_seed(0)
    model = _Tied().double()
    x = torch.randn(7, 5, dtype=torch.float64)
    assert has_tied_tensors(model) and not has_tied_tensors(torch.nn.Linear(2, 2))
    H = cl.HessianOperator(model, mse, (x, x))
    assert H.shape == (15, 15)
    ref = dense_hessian(model, mse, (x, x))
    torch.testing.assert_close(H @ torch.eye(15, dtype=torch.float64), ref, rtol=1e-10,
                               atol=1e-12)


class _Unused(torch.nn.Module):
    """A parameter that the forward never touches: its rows and columns of H are zero."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

    def forward(self, x):
        return torch.tanh(self.used(x))


@pytest.mark.parametrize("reuse", [True, False])
def test_unused_parameters_get_zero_curvature_on_every_route(reuse: bool) -> None:
    from curvlab.testing import dense_hessian, mse

    torch.manual_seed(0)
    model = _Unused().double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    ref = dense_hessian(model, mse, (x, y))  # (16, 16), zero outside the first 8x8 block
    assert ref[:8, :8].abs().max() > 1e-3 and ref[8:].abs().max() == 0
    V = vectors(16, 3)
    for method in ("rev-rev", "fwd-rev"):
        H = cl.HessianOperator(model, mse, (x, y), method=method, reuse_graph=reuse)
        assert_rel_close(H @ V, ref @ V)
        assert_rel_close(H @ V[:, 1], ref @ V[:, 1])


def test_a_gradient_that_does_not_depend_on_the_parameters_gives_zero() -> None:
    # Loss linear in the parameters: the gradient is a constant, the Hessian is exactly zero.
    model = torch.nn.Linear(4, 1).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    H = cl.HessianOperator(model, lambda out, _: out.mean(), (x, x))
    V = vectors(5, 2)
    assert torch.equal(H @ V, torch.zeros(5, 2, dtype=torch.float64))
    assert torch.equal(H @ V[:, 0], torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("reuse", [True, False])
def test_block_layouts_give_the_same_products(reuse: bool) -> None:
    # Row-major blocks, column-major blocks (V = W.T) and strided column slices are all accepted.
    c, H_dense = case("mlp_tanh"), hessian("mlp_tanh")
    H = cl.HessianOperator(c.model, c.loss_fn, c.data, method="rev-rev", reuse_graph=reuse)
    V = vectors(H.shape[0], 6)  # (P, 6), row-major
    for block in (V, V.T.contiguous().T, V[:, ::2]):
        assert_rel_close(H @ block, H_dense @ block)
    assert_rel_close(H @ V[:, 3], H_dense @ V[:, 3])  # a strided single column


def test_layout_pieces_are_the_unravelled_views_at_any_offset() -> None:
    # pieces() views a contiguous vector by as_strided; its offsets must count from the vector,
    # not from the start of its storage (a column of V = W.T starts at j * P).
    layout = cl.func.ParamLayout(("a", "b", "c"), (torch.Size([2, 3]), torch.Size([4]),
                                                   torch.Size([1, 2, 2])))
    W = torch.randn(3, layout.numel, dtype=torch.float64)  # (3, P)
    for v in (W[1], W.T[:, 2]):  # rows of W: contiguous, at storage offsets P and 2 P
        assert v.storage_offset() > 0
        expected = list(layout.unravel(v).values())
        for piece, want in zip(layout.pieces(v), expected, strict=True):
            assert piece.shape == want.shape
            assert torch.equal(piece, want)
