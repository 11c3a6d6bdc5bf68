"""Feature speed and one-step feature change against explicit float64 references."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl
from curvlab import layers as L
from curvlab.models import ResNet
from curvlab.testing import MLP, SmallCNN, TinyTransformer, make_case, mse

TOL = 1e-10


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels(n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


def _model_case(name: str):
    """(model, loss, batch, expected default layers), float64, eval mode."""
    torch.manual_seed(0)
    if name == "mlp":
        model, loss, batch = MLP(act=nn.ReLU), mse, (_rand(12, 6), _rand(12, 3, seed=1))
        expected = ("0", "2", "4")
    elif name == "resnet":
        model = ResNet(10, 3, cl.SP(), branch_scale=0.5, d_in=6, d_out=3)
        loss, batch = mse, (_rand(12, 6), _rand(12, 3, seed=1))
        expected = ("stem", "blocks.0", "blocks.1", "blocks.2", "head")
    elif name == "cnn":
        model, loss, batch = SmallCNN(), F.cross_entropy, (_rand(10, 1, 8, 8), _labels(10, 3))
        expected = ("conv1", "conv2", "head")
    else:
        model = TinyTransformer(depth=2)
        loss, batch = F.cross_entropy, (_rand(6, 5, 4), _labels(6, 3))
        expected = ("embed", "blocks.0", "blocks.1", "head")
    return model.double().eval(), loss, batch, expected


def _layer_rates(model: nn.Module) -> dict[str, float]:
    """Different rates per module, as muP's per-layer multipliers would give."""
    names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(False))]
    return {n: 0.05 * (1 + i % 3) for i, n in enumerate(names)}


MODELS = ("mlp", "resnet", "cnn", "transformer")


@pytest.mark.parametrize("name", MODELS)
def test_identity_holds_at_every_default_layer(name):
    model, loss, batch, expected = _model_case(name)
    r = cl.feature_speed(model, loss, batch, lrs=_layer_rates(model))
    assert r.layers == expected
    # <-b_l, df_l> = dL_l  <=>  predicted ||df_l|| = measured ||df_l||
    np.testing.assert_allclose(r.predicted_update_norm, r.feature_update_norm, rtol=TOL, atol=0)
    assert np.all(r.loss_decay > 0) and np.all(np.diff(r.loss_decay) >= 0)
    assert np.all((r.cos_theta > 0) & (r.cos_theta <= 1))


def _reference(model, loss_fn, batch, layers, rates):
    """Explicit quantities: b_l by reverse mode, df_l = J_l dw with J_l the dense Jacobian."""
    x, y = batch
    params = dict(model.named_parameters())
    names = list(params)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    sizes = [p.numel() for p in params.values()]

    def unflat(t):
        return {n: c.view_as(params[n]) for n, c in zip(names, t.split(sizes), strict=True)}

    def features(t):
        with L.recording(model, layers) as rec:
            torch.func.functional_call(model, unflat(t), (x,))
        return torch.cat([f.reshape(-1) for f in rec.features(layers, "ref")])

    w = flat.clone().requires_grad_(True)
    with L.recording(model, layers) as rec:
        out = torch.func.functional_call(model, unflat(w), (x,))
    loss = loss_fn(out, y)
    feats = rec.features(layers, "ref")
    g, *bs = torch.autograd.grad(loss, [w, *feats])
    eta = torch.cat([torch.full((p.numel(),), rates[n], dtype=torch.float64)
                     for n, p in params.items()])
    J = torch.autograd.functional.jacobian(features, flat)  # (sum_l numel(f_l), P)
    dfs = (J @ (-eta * g)).split([f.numel() for f in feats])
    cos = [float(-(b.reshape(-1) @ d) / (b.norm() * d.norm()))
           for b, d in zip(bs, dfs, strict=True)]
    return np.array(cos), np.array([float(d.norm()) for d in dfs]), \
        np.array([float(b.norm()) for b in bs])


@pytest.mark.parametrize("name", ["mlp", "resnet", "transformer"])
def test_matches_dense_jacobian_reference(name):
    model, loss, batch, expected = _model_case(name)
    rates = {n: 0.05 * (1 + i % 3) for i, (n, _) in enumerate(model.named_parameters())}
    r = cl.feature_speed(model, loss, batch, lrs=rates)
    cos, d_norm, b_norm = _reference(model, loss, batch, list(expected), rates)
    np.testing.assert_allclose(r.cos_theta, cos, rtol=TOL, atol=0)
    np.testing.assert_allclose(r.feature_update_norm, d_norm, rtol=TOL, atol=0)
    np.testing.assert_allclose(r.backward_norm, b_norm, rtol=TOL, atol=0)


def test_loss_decay_sums_the_upstream_parameters():
    model, loss, batch, _ = _model_case("mlp")
    r = cl.feature_speed(model, loss, batch, lrs=0.1)
    grads = torch.autograd.grad(loss(model(batch[0]), batch[1]), list(model.parameters()))
    per_layer = [0.1 * sum(float(g.pow(2).sum()) for g in grads[2 * i:2 * i + 2]) for i in range(3)]
    np.testing.assert_allclose(r.loss_decay, np.cumsum(per_layer), rtol=TOL, atol=0)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_finite_difference_converges_linearly_to_the_jvp(name):
    model, loss, batch, _ = _model_case(name)
    errors = []
    for eta in (1e-2, 1e-3, 1e-4):
        jvp = cl.feature_speed(model, loss, batch, lrs=eta)
        fd = cl.feature_speed(model, loss, batch, lrs=eta, method="finite-difference")
        errors.append(np.abs(fd.feature_update_norm / jvp.feature_update_norm - 1).max())
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert np.all((ratios > 5) & (ratios < 20)), (errors, ratios)


def test_rates_from_optimizer_groups_match_lrs_and_frozen_params_do_not_move():
    model, loss, batch, _ = _model_case("mlp")
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.3},
                           {"params": model[2].parameters()},
                           {"params": model[4].parameters(), "lr": 0.01}], lr=0.1)
    by_opt = cl.feature_speed(model, loss, batch, optimizer=opt)
    by_lrs = cl.feature_speed(model, loss, batch, lrs={"0": 0.3, "2": 0.1, "4": 0.01})
    np.testing.assert_allclose(by_opt.cos_theta, by_lrs.cos_theta, rtol=TOL, atol=0)
    np.testing.assert_allclose(by_opt.loss_decay, by_lrs.loss_decay, rtol=TOL, atol=0)
    # The first layer is outside this optimizer: eta = 0, its features do not move.
    opt2 = torch.optim.SGD(list(model[2].parameters()) + list(model[4].parameters()), lr=0.1)
    r = cl.feature_speed(model, loss, batch, optimizer=opt2)
    assert r.loss_decay[0] == 0 and r.feature_update_norm[0] == 0 and np.isnan(r.cos_theta[0])
    np.testing.assert_allclose(r.predicted_update_norm[1:], r.feature_update_norm[1:], rtol=TOL)


def test_train_mode_dropout_and_eval_batchnorm_keep_the_identity():
    case = make_case("dropout")
    case.model.train()
    r = cl.feature_speed(case.model, case.loss_fn, case.data, lrs=0.1, allow_train_mode=True)
    np.testing.assert_allclose(r.predicted_update_norm, r.feature_update_norm, rtol=TOL, atol=0)
    assert case.model.training
    bn = make_case("batchnorm")
    r = cl.feature_speed(bn.model, bn.loss_fn, bn.data, lrs=0.1)
    assert r.layers == ("0", "1", "3")
    np.testing.assert_allclose(r.predicted_update_norm, r.feature_update_norm, rtol=TOL, atol=0)


def test_explicit_non_cut_layer_breaks_only_the_formula():
    """Inside a residual branch the identity does not hold; the angle is still computed."""
    model, loss, batch, _ = _model_case("resnet")
    r = cl.feature_speed(model, loss, batch, layers=["blocks.1.linear", "blocks.1"], lrs=0.1)
    assert abs(r.predicted_update_norm[0] / r.feature_update_norm[0] - 1) > 1e-3
    np.testing.assert_allclose(r.predicted_update_norm[1], r.feature_update_norm[1], rtol=TOL)


# ---------------------------------------------------------------- the paper's depth claims


def _depth_model(kind: str, depth: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        model: nn.Module = MLP(64, 512, 10, nn.ReLU, depth=depth, bias=False)
    else:
        scale = 1 / math.sqrt(depth) if kind == "resnet_scaled" else 1.0
        model = ResNet(512, depth, cl.SP(), branch_scale=scale, d_in=64, d_out=10, bias=False)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model.double()


def _last_hidden(kind: str, depth: int) -> str:
    return str(2 * (depth - 1)) if kind == "mlp" else f"blocks.{depth - 1}"


def _cos_last_hidden(kind: str, depth: int) -> float:
    values = []
    for seed in range(3):
        model = _depth_model(kind, depth, seed)
        g = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(32, 64, generator=g, dtype=torch.float64)
        y = torch.randn(32, 10, generator=g, dtype=torch.float64)
        r = cl.feature_speed(model, mse, (x, y), layers=[_last_hidden(kind, depth)], lrs=1.0)
        values.append(r.cos_theta[0])
    return float(np.mean(values))


DEPTHS = (2, 4, 8, 16, 32, 64)


def test_depth_claims_of_chizat_netrapalli():
    """ReLU MLP: cos theta_L ~ c / sqrt(L); ResNet with 1/sqrt(L) branches: cos theta_L = Theta(1);
    branch scale 1: cos theta_L degrades with depth (arXiv:2311.18718; docs/math.md section 5)."""
    mlp = np.array([_cos_last_hidden("mlp", d) * math.sqrt(d) for d in DEPTHS])
    scaled = np.array([_cos_last_hidden("resnet_scaled", d) for d in DEPTHS])
    unscaled = np.array([_cos_last_hidden("resnet_unscaled", d) for d in DEPTHS])
    assert mlp.max() / mlp.min() < 2, mlp
    assert scaled.max() / scaled.min() < 1.6, scaled
    assert unscaled[0] / unscaled[-1] > 2, unscaled


# ---------------------------------------------------------------- feature_change


def _snapshot(model, opt):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [m.training for m in model.modules()], torch.get_rng_state())


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_feature_change_leaves_model_optimizer_and_rng_untouched():
    case = make_case("dropout")
    model = case.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        case.loss_fn(model(case.data[0]), case.data[1]).backward()
        opt.step()
    before = _snapshot(model, opt)
    r = cl.feature_change(model, case.loss_fn, case.data, opt)
    _assert_same(before, _snapshot(model, opt))
    assert r.layers == ("0", "3")
    # Reference: the same step taken by hand on a copy, features in eval mode.
    work, work_opt = copy.deepcopy((model, opt))
    x, y = case.data
    with torch.no_grad():
        f0 = [work.eval()[0](x), work(x)]
    work.train()
    torch.manual_seed(0)
    work_opt.zero_grad()
    case.loss_fn(work(x), y).backward()
    work_opt.step()
    with torch.no_grad():
        f1 = [work.eval()[0](x), work(x)]
    rms = [float((b - a).pow(2).mean().sqrt()) for a, b in zip(f0, f1, strict=True)]
    np.testing.assert_allclose(r.change_rms, rms, rtol=1e-12, atol=0)
    np.testing.assert_allclose(r.feature_rms, [float(f.pow(2).mean().sqrt()) for f in f0],
                               rtol=1e-12)


def test_feature_change_explicit_layers_and_scheduler():
    model, loss, batch, _ = _model_case("resnet")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    r = cl.feature_change(model, loss, batch, opt, layers="blocks.2")
    assert r.layers == ("blocks.2",) and r.relative_change[0] > 0
    assert set(r.as_dict()) == {"feature_rms", "change_rms", "relative_change"}


# ---------------------------------------------------------------- errors


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.aux, self.b = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        self.aux(h)  # computed and dropped
        return self.b(torch.tanh(h))


def test_errors():
    model, loss, batch, _ = _model_case("mlp")
    fs = cl.feature_speed
    with pytest.raises(ValueError, match=r"feature_speed: unknown layer names \['nope'\]"):
        fs(model, loss, batch, layers=["nope"])
    shared = make_case("shared")
    with pytest.raises(ValueError, match="layer 'hidden' ran 2 times in one forward"):
        fs(shared.model, shared.loss_fn, shared.data, layers=["hidden"])
    unused = _Unused().double()
    data = (_rand(5, 3), _rand(5, 2))
    with pytest.raises(ValueError, match="layer 'aux' does not influence the loss"):
        fs(unused, loss, data, layers=["aux"])
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match="layer '0' does not depend on any trained parameter"):
        fs(model, loss, batch, layers=["0"])
    model[0].requires_grad_(True)
    with pytest.raises(ValueError, match="pass lrs or optimizer, not both"):
        fs(model, loss, batch, lrs=0.1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"lrs gives no rate for parameters \['4.weight'"):
        fs(model, loss, batch, lrs={"0": 0.1, "2": 0.1})
    with pytest.raises(ValueError, match=r"lrs has unknown names \['5'\]"):
        fs(model, loss, batch, lrs={"5": 0.1})
    with pytest.raises(TypeError, match="lrs must be a float or a dict"):
        fs(model, loss, batch, lrs=[0.1])
    with pytest.raises(ValueError, match="method must be one of"):
        fs(model, loss, batch, method="exact")
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        fs(model, lambda o, t: (o - t) ** 2, batch)
    with pytest.raises(TypeError, match=r"batch must be an \(inputs, targets\) pair"):
        fs(model, loss, batch[0])
    with pytest.raises(ValueError, match="layers is empty"):
        fs(model, loss, batch, layers=[])
    drop = make_case("dropout")
    drop.model.train()
    with pytest.raises(ValueError, match=r"modules \['2'\] are in training mode"):
        fs(drop.model, drop.loss_fn, drop.data)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        fs(frozen, loss, batch)


def test_feature_change_errors():
    model, loss, batch, _ = _model_case("mlp")
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="feature_change: the optimizer updates 2 tensors that"):
        cl.feature_change(model, loss, batch, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        cl.feature_change(model, loss, batch, "sgd")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"feature_change: unknown layer names \['x'\]"):
        cl.feature_change(model, loss, batch, opt, layers="x")


def test_tuple_output_layer_gives_its_first_tensor_and_a_dict_output_is_refused():
    class Pair(nn.Module):  # returns a dict: no tensor to take
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return {"h": self.lin(x)}

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha, self.head = nn.MultiheadAttention(4, 1, batch_first=True), nn.Linear(4, 2)
            self.pair = Pair()

        def forward(self, x):
            return self.head(self.mha(x, x, x)[0].mean(1) + self.pair(x)["h"].mean(1))

    model = Attn().double().eval()
    data = (_rand(3, 5, 4), _rand(3, 2))
    r = cl.feature_speed(model, mse, data, layers=["mha"], lrs=0.1)
    assert r.layers == ("mha",) and np.isfinite(r.cos_theta[0]) and r.feature_update_norm[0] > 0
    with pytest.raises(TypeError, match="layer 'pair' returns dict, not a tensor"):
        cl.feature_speed(model, mse, data, layers=["pair"])


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.9, 0.99)),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)],
    ids=["adam", "adamw", "sgd-nesterov"])
def test_feature_speed_follows_the_optimizers_own_update(make_opt):
    """With an optimizer, df_l is the change the optimizer's real step makes (its moments, bias
    corrections, decay), not the GD step; the formula stays exact on cuts."""
    torch.manual_seed(0)
    model = MLP(d_in=5, width=16, d_out=3).double().eval()
    x, y = _rand(24, 5), _rand(24, 3)
    opt = make_opt(model.parameters())
    for _ in range(3):  # non-trivial optimizer state
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    before_state = copy.deepcopy(opt.state_dict())
    r = cl.feature_speed(model, mse, (x, y), optimizer=opt, method="finite-difference")
    exact = cl.feature_speed(model, mse, (x, y), optimizer=opt)
    assert r.direction == type(opt).__name__ and exact.direction == r.direction
    np.testing.assert_allclose(exact.predicted_update_norm, exact.feature_update_norm, rtol=1e-10)
    # The reference: one real step of a copy, from the same gradient, features before and after.
    work, work_opt = copy.deepcopy((model, opt))
    with L.recording(work, list(r.layers)) as rec:
        work(x)
    before = [f.detach() for f in rec.features(list(r.layers), "test")]
    work_opt.zero_grad()
    mse(work(x), y).backward()
    work_opt.step()
    with L.recording(work, list(r.layers)) as rec:
        work(x)
    change = [float(torch.linalg.vector_norm(a.detach() - b))
              for a, b in zip(rec.features(list(r.layers), "test"), before, strict=True)]
    np.testing.assert_allclose(r.feature_update_norm, change, rtol=1e-10)
    gd = cl.feature_speed(model, mse, (x, y), lrs=0.05, method="finite-difference")
    assert np.abs(gd.feature_update_norm / np.asarray(change) - 1).max() > 0.05  # not GD's step
    torch.testing.assert_close(opt.state_dict(), before_state, rtol=0, atol=0)  # untouched
