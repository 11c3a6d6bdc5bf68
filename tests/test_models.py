"""Parametrizations and reference models: base-width identities, coordinate check, check()."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import curvlab as cl
from curvlab.models import MLP, ResNet, ScaledLinear
from curvlab.testing import mse


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_mup_at_base_width_is_sp(kind):
    torch.manual_seed(3)
    sp = MLP(64, 4, cl.SP(), d_in=8)
    torch.manual_seed(3)
    mup = MLP(64, 4, cl.MuP(base_width=64), d_in=8)
    for a, b in zip(_weights(sp), _weights(mup), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [m.multiplier for m in mup.layers] == [1.0] * 4
    lrs = [[g["lr"] for g in p.parametrization.optimizer(p, kind, 0.1).param_groups]
           for p in (sp, mup)]
    assert lrs[0] == lrs[1] == [0.1] * 8


def test_mup_scales_with_width():
    p = cl.MuP(base_width=64)
    model = MLP(256, 3, p, d_in=8)
    assert [m.multiplier for m in model.layers] == [1.0, 1.0, 0.25]
    torch.testing.assert_close(model.layers[2].weight.std().item(), 2 ** 0.5 / 8, rtol=0.05,
                               atol=0)  # sigma / sqrt(base width), not / sqrt(width)
    sgd = {g["name"]: g["lr"] for g in p.optimizer(model, "sgd", 0.1).param_groups}
    adam = {g["name"]: g["lr"] for g in p.optimizer(model, "adam", 0.1).param_groups}
    assert sgd == pytest.approx({"layers.0.weight": 0.4, "layers.0.bias": 0.4,
                                 "layers.1.weight": 0.1, "layers.1.bias": 0.4,
                                 "layers.2.weight": 0.4, "layers.2.bias": 0.1})
    assert adam == pytest.approx({"layers.0.weight": 0.1, "layers.0.bias": 0.1,
                                  "layers.1.weight": 0.025, "layers.1.bias": 0.1,
                                  "layers.2.weight": 0.1, "layers.2.bias": 0.1})
    deep = ResNet(128, 16, cl.DepthMuP(base_width=64, base_depth=4))
    assert deep.blocks[0].scale == pytest.approx(0.5)  # (L / L0)^(-1/2), relative to L0 = 4
    adam_deep = {g["name"]: g["lr"] for g in deep.parametrization.optimizer(
        deep, "adam", 0.1).param_groups}
    assert adam_deep["blocks.0.linear.weight"] == pytest.approx(0.1 / 2 * 0.5)  # 1/m, (L/L0)^-1/2


def test_interpolated_at_one_is_mup_in_multiplier_free_form():
    """abc equivalence: W_out' = W_out / m with LR eta / m trains the same function as muP."""
    width, x, y = 256, torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 10,
                                                                             dtype=torch.float64)
    torch.manual_seed(0)
    mup = MLP(width, 3, cl.MuP(64), d_in=8).double()
    free = MLP(width, 3, cl.interpolated(1.0, 64), d_in=8).double()
    free.load_state_dict(mup.state_dict())
    with torch.no_grad():
        free.layers[2].weight.div_(width / 64)
    opts = [m.parametrization.optimizer(m, "sgd", 0.05) for m in (mup, free)]
    for _ in range(3):
        for model, opt in zip((mup, free), opts, strict=True):
            opt.zero_grad()
            mse(model(x), y).backward()
            opt.step()
    torch.testing.assert_close(free(x), mup(x), rtol=1e-10, atol=1e-12)


WIDTHS = (64, 128, 256, 512, 1024, 2048)


def _coord_slopes(parametrization, lr, steps=3, seeds=(0, 1)):
    """Log-log slopes in width of [RMS of hidden features (2), their one-step change (2), the
    output change], after ``steps`` SGD steps on a teacher task (docs/math.md section 6)."""
    rows = []
    for width in WIDTHS:
        per_seed = []
        for seed in seeds:
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(100 + seed)
            x = torch.randn(64, 16, generator=g)
            y = 5 * torch.tanh(x @ torch.randn(16, 10, generator=g) / 4)
            model = MLP(width, 3, parametrization, d_in=16, d_out=10)
            opt = parametrization.optimizer(model, "sgd", lr)
            for _ in range(steps):
                opt.zero_grad()
                mse(model(x), y).backward()
                opt.step()
            r = cl.feature_change(model, mse, (x, y), opt,
                                  layers=["layers.0", "layers.1", "layers.2"])
            per_seed.append(np.r_[r.feature_rms[:2], r.change_rms])
        rows.append(np.mean(per_seed, axis=0))
    return np.polyfit(np.log(WIDTHS), np.log(np.array(rows)), 1)[0]  # (5,)


def test_coordinate_check():
    mup = _coord_slopes(cl.MuP(64, sigma=1.0), 5e-3)
    ntp = _coord_slopes(cl.NTP(sigma=1.0), 5e-3)
    sp = _coord_slopes(cl.SP(sigma=1.0), 5e-3)
    np.testing.assert_allclose(mup[:4], 0.0, atol=0.1)  # hidden features and changes flat
    np.testing.assert_allclose(ntp[2:4], -0.5, atol=0.15)  # hidden changes ~ width^-1/2
    assert sp[4] > 0.3, sp  # SP at a fixed LR: the output change grows with width


def test_check_warns_naming_the_layers():
    p = cl.MuP(base_width=64)
    model = MLP(256, 3, p, d_in=8)
    assert p.check(model, p.optimizer(model, "sgd", 0.1)) == []
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"mup check: .*layers\.0\.weight: learning rate 0\.1, "
                                         r"expected 0\.4"):
        problems = p.check(model, plain)
    assert len(problems) == 4  # every group but the hidden weight and the output bias
    model.layers[2].multiplier = 1.0
    with pytest.warns(UserWarning, match=r"layers\.2: forward multiplier 1, expected 0\.25"):
        p.check(model)


def test_errors():
    with pytest.raises(ValueError, match="MLP: width must be a positive int, got 0"):
        MLP(0)
    with pytest.raises(ValueError, match=r"MLP: width must be a positive int, got 64\.0"):
        MLP(64.0)
    with pytest.raises(ValueError, match="MLP: depth must be an int >= 2"):
        MLP(64, 1)
    with pytest.raises(ValueError, match="base width 128 is larger than the width 64"):
        ResNet(64, 2, cl.MuP(base_width=128))
    with pytest.raises(TypeError, match=r"parametrization must be cl\.SP\(\)"):
        MLP(64, 3, "mup")
    with pytest.raises(ValueError, match="name must be one of"):
        cl.SP().optimizer(MLP(8), "lbfgs", 0.1)
    with pytest.raises(ValueError, match=r"interpolated: s must be in \[0, 1\]"):
        cl.interpolated(1.5, 64)
    with pytest.raises(ValueError, match="role must be one of"):
        ScaledLinear(2, 2, "middle")
    with pytest.raises(TypeError, match="the model has no ScaledLinear layers"):
        cl.SP().apply(torch.nn.Linear(2, 2), 2)
    model = copy.deepcopy(MLP(8))
    del model.width
    with pytest.raises(TypeError, match="no integer `width` attribute"):
        cl.SP().optimizer(model, "sgd", 0.1)


def test_effective_depth_follows_the_documented_convention():
    from curvlab.testing import SmallCNN, TinyTransformer

    for depth in (2, 3, 6):
        assert cl.effective_depth(MLP(16, depth), torch.randn(2, 16)) == depth
    for blocks in (1, 4, 9):  # identity shortcuts: one per block, plus stem and head
        assert cl.effective_depth(ResNet(16, blocks), torch.randn(2, 16)) == blocks + 2
    for blocks in (1, 3):  # two residual additions per block, plus embedding and head
        assert cl.effective_depth(TinyTransformer(depth=blocks), torch.randn(2, 5, 4)) == \
            2 * blocks + 2
    assert cl.effective_depth(SmallCNN(), torch.randn(2, 1, 8, 8)) == 3  # two convs and a head
    model = MLP(16, 3).train()
    cl.effective_depth(model, torch.randn(2, 16))
    assert model.training
    assert cl.transfer_lr(0.1, 4, 16) == pytest.approx(0.0125)
    with pytest.raises(ValueError, match="transfer_lr: to_depth must be positive"):
        cl.transfer_lr(0.1, 4, 0)
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        cl.effective_depth(model, [1, 2])


def test_convnet_and_transformer():
    from curvlab.models import ConvNet, Transformer
    from curvlab.testing import dense_hessian

    x_img, x_seq = torch.randn(3, 1, 8, 8), torch.randn(3, 5, 16)
    for cls, x in ((ConvNet, x_img), (Transformer, x_seq)):
        torch.manual_seed(1)
        sp = cls(32, 2, cl.SP())
        torch.manual_seed(1)
        mup = cls(32, 2, cl.MuP(base_width=32))
        for a, b in zip(_weights(sp), _weights(mup), strict=True):  # muP = SP at base width
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(sp(x), mup(x), rtol=0, atol=0)
        assert mup(x).shape == (3, 10)
    wide = Transformer(128, 2, cl.MuP(base_width=32))
    assert wide.blocks[0].attn_scale == pytest.approx(8**0.5 / 32)  # sqrt(d0) / d, d = 32, d0 = 8
    assert wide.head.multiplier == pytest.approx(0.25)
    assert cl.effective_depth(ConvNet(8, 3), x_img) == 4  # three convolutions and the head
    assert cl.effective_depth(Transformer(16, 3), x_seq) == 8  # 2 per block, embedding, head
    # twice differentiable through the custom attention scale and the convolutions (float64)
    for model, x in ((Transformer(8, 1, heads=2, d_in=16, d_out=2).double(), x_seq.double()),
                     (ConvNet(4, 2, d_out=2).double(), x_img.double())):
        y = torch.randn(3, 2, dtype=torch.float64)
        H = cl.HessianOperator(model.eval(), mse, (x, y))
        P = H.shape[0]
        torch.testing.assert_close(H @ torch.eye(P, dtype=torch.float64),
                                   dense_hessian(model, mse, (x, y)), rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="width 30 must be divisible by heads 4"):
        Transformer(30)
