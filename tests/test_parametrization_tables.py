"""Per-parameter learning rates and branch scales against the Tensor Programs tables, computed
by hand (muP: Yang & Hu 2021, Table 3; Depth-muP: Yang et al. 2023, TP6), and check() catching
each way of getting them wrong."""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from curvlab.models import MLP, ResNet, Transformer


def _lrs(model, kind, lr=0.1, parametrization=None):
    p = parametrization or model.parametrization
    opt = p.optimizer(model, kind, lr)
    return opt, {id(q): g["lr"] for g in opt.param_groups for q in g["params"]}


def test_mup_sgd_trains_layernorm_parameters_as_vector_like():
    """Table 3 (SGD): vector-like parameters (LayerNorm gain and bias, size width) get LR
    eta * fan_out / n0 = eta * m; under Adam a constant LR."""
    model = Transformer(256, 2, cl.MuP(base_width=64), heads=4, d_in=8)
    norms = [p for n, p in model.named_parameters() if ".ln" in n]
    assert len(norms) == 8
    _, sgd = _lrs(model, "sgd")
    _, adam = _lrs(model, "adam")
    assert [sgd[id(p)] for p in norms] == pytest.approx([0.4] * 8)  # 0.1 * m, m = 4
    assert [adam[id(p)] for p in norms] == pytest.approx([0.1] * 8)
    at_base = Transformer(64, 2, cl.MuP(base_width=64), heads=4, d_in=8)
    _, base = _lrs(at_base, "sgd")
    assert set(base.values()) == {0.1}  # SP at the base width
    p = model.parametrization
    groups = [{"params": [q for n, q in model.named_parameters() if ".ln" not in n], "lr": 0.1},
              {"params": norms, "lr": 0.1}]  # the base LR for the norms: today's mistake
    wrong = torch.optim.SGD(p.param_groups(model, 0.1, "sgd", 256)[:-1] + groups[1:], lr=0.1)
    with pytest.warns(UserWarning, match=r"blocks\.0\.ln1\.weight: learning rate 0\.1, expected "
                                         r"0\.4 under mup with sgd"):
        problems = p.check(model, wrong)
    assert len(problems) == 8


def test_depth_mup_with_adam_scales_only_the_branches():
    """TP6, alpha = 1/2 and gamma = 1/2 for Adam: LR * (L/L0)^(-1/2) on the blocks' parameters
    only; SGD has no depth factor (gamma = 0)."""
    model = ResNet(128, 16, cl.DepthMuP(base_width=64, base_depth=4), d_in=8)
    m, depth = 2.0, (16 / 4) ** -0.5
    _, adam = _lrs(model, "adam")
    _, sgd = _lrs(model, "sgd")
    want_adam = {"stem.weight": 0.1, "stem.bias": 0.1, "head.weight": 0.1, "head.bias": 0.1,
                 "blocks.0.linear.weight": 0.1 / m * depth, "blocks.0.linear.bias": 0.1 * depth,
                 "blocks.15.linear.weight": 0.1 / m * depth}
    want_sgd = {"stem.weight": 0.1 * m, "stem.bias": 0.1 * m, "head.weight": 0.1 * m,
                "head.bias": 0.1, "blocks.0.linear.weight": 0.1, "blocks.0.linear.bias": 0.1 * m}
    params = dict(model.named_parameters())
    assert {n: adam[id(params[n])] for n in want_adam} == pytest.approx(want_adam)
    assert {n: sgd[id(params[n])] for n in want_sgd} == pytest.approx(want_sgd)
    wrong = model.parametrization.optimizer(model, "adam", 0.1)
    wrong.param_groups[0]["lr"] *= depth  # the stem scaled with depth: the old mistake
    with pytest.warns(UserWarning, match=r"stem\.weight: learning rate 0\.05, expected 0\.1 "
                                         r"under depth-mup with adam"):
        assert len(model.parametrization.check(model, wrong)) == 1


def test_depth_mup_at_its_base_depth_is_mup():
    """The branch multiplier is relative to base_depth: at L = L0 the network is muP exactly."""
    x = torch.randn(16, 8)
    torch.manual_seed(0)
    mup = ResNet(128, 4, cl.MuP(base_width=64), d_in=8)
    torch.manual_seed(0)
    deep = ResNet(128, 4, cl.DepthMuP(base_width=64, base_depth=4), d_in=8)
    assert [b.scale for b in deep.blocks] == [1.0] * 4
    torch.testing.assert_close(deep(x), mup(x), rtol=0, atol=0)
    for kind in ("sgd", "adam"):
        assert [g["lr"] for g in deep.parametrization.optimizer(deep, kind, 0.1).param_groups] \
            == [g["lr"] for g in mup.parametrization.optimizer(mup, kind, 0.1).param_groups]
    for block in deep.blocks:
        block.scale = 0.5  # the absolute 1/sqrt(L): not muP at the base depth
    with pytest.warns(UserWarning, match=r"blocks\.0: residual branch scale 0\.5, expected 1 at "
                                         r"depth 4"):
        assert len(deep.parametrization.check(deep)) == 4


def test_interpolated_adam_learning_rates():
    """Adam form of Yaida's family: hidden and output weights at m^(-(1+s)/2) (NTP-Adam's
    n^(-1/2) at s = 0, muP-Adam's n^(-1) at s = 1), input weights and biases constant."""
    s, m = 0.5, 4.0
    p = cl.interpolated(s, 64)
    model = MLP(256, 3, p, d_in=8)
    opt = p.optimizer(model, "adam", 0.1)
    got = {g["name"]: g["lr"] for g in opt.param_groups}
    w = 0.1 * m ** -0.75
    assert got == pytest.approx({"layers.0.weight": 0.1, "layers.0.bias": 0.1,
                                 "layers.1.weight": w, "layers.1.bias": 0.1,
                                 "layers.2.weight": w, "layers.2.bias": 0.1})
    sgd_multipliers = torch.optim.Adam(p.param_groups(model, 0.1, "sgd", 256), lr=0.1)
    with pytest.warns(UserWarning, match=r"layers\.0\.weight: learning rate 0\.2, expected 0\.1 "
                                         r"under interpolated with adam"):
        assert len(p.check(model, sgd_multipliers)) == 5  # all but the output bias (1 in both)
    assert p.check(model, opt) == []


def test_interpolated_at_one_with_adam_trains_as_mup():
    """abc equivalence under Adam (eps tiny, where Adam is invariant to gradient scale):
    W_out' = W_out / m trained at LR eta / m follows muP's W_out at LR eta exactly."""
    width = 256
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 10, dtype=torch.float64)
    torch.manual_seed(0)
    mup = MLP(width, 3, cl.MuP(64), d_in=8).double()
    free = MLP(width, 3, cl.interpolated(1.0, 64), d_in=8).double()
    free.load_state_dict(mup.state_dict())
    with torch.no_grad():
        free.layers[2].weight.div_(width / 64)
    opts = [m.parametrization.optimizer(m, "adam", 1e-3, eps=1e-30) for m in (mup, free)]
    for _ in range(3):
        for model, opt in zip((mup, free), opts, strict=True):
            opt.zero_grad()
            cl.testing.mse(model(x), y).backward()
            opt.step()
    torch.testing.assert_close(free(x), mup(x), rtol=1e-10, atol=1e-12)
