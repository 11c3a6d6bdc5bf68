"""cl.maximal_update_lr: the per-layer change energies against a real small step (finite
differences in float64), the budget identity, the optimizer direction, and its errors."""

import copy

import numpy as np
import pytest
import torch

import curvlab as cl
from curvlab.layers import recording
from curvlab.testing import MLP, mse


def _setup(seed=0):
    torch.manual_seed(seed)
    model = MLP(d_in=3, width=16, d_out=2).double()
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    return model, (x, y)


def _relative_change(model, stepped, names, x):
    out = []
    for m in (model, stepped):
        with torch.no_grad(), recording(m, names) as rec:
            m(x)
        out.append(rec.features(names, "test"))
    return np.array([float(((b - a).norm() / a.norm()) ** 2) for a, b in zip(*out,
                                                                             strict=True)])


@pytest.mark.parametrize("kind", ["gd", "adam"])
def test_energies_match_a_real_small_step(kind):
    model, (x, y) = _setup()
    eta = 1e-5
    stepped = copy.deepcopy(model)
    if kind == "gd":
        r = cl.maximal_update_lr(model, mse, (x, y))
        opt = torch.optim.SGD(stepped.parameters(), lr=eta)
    else:
        r = cl.maximal_update_lr(model, mse, (x, y),
                                 optimizer=torch.optim.Adam(model.parameters(), lr=0.3))
        opt = torch.optim.Adam(stepped.parameters(), lr=eta)
        assert r.direction == "Adam"
    mse(stepped(x), y).backward()
    opt.step()
    real = _relative_change(model, stepped, r.layers, x)  # S_l(eta), O(eta^3) from first order
    torch.testing.assert_close(torch.tensor(real / eta ** 2), torch.tensor(r.energy_per_lr2),
                               rtol=1e-3, atol=0)


def test_the_budget_is_met_and_scales_the_rate():
    model, batch = _setup(1)
    r = cl.maximal_update_lr(model, mse, batch, budget=0.25)
    assert r.energy(r.lr).mean() == pytest.approx(0.25, rel=1e-12)
    r4 = cl.maximal_update_lr(model, mse, batch, budget=1.0)
    assert r4.lr == pytest.approx(2 * r.lr, rel=1e-12)  # eta* ~ sqrt(B)
    total = cl.maximal_update_lr(model, mse, batch, average="sum")
    assert total.energy(total.lr).sum() == pytest.approx(1.0, rel=1e-12)
    half = cl.maximal_update_lr(model, mse, batch, lrs=0.5)  # the direction halves: eta* doubles
    assert half.lr == pytest.approx(2 * r4.lr, rel=1e-9)


def test_errors():
    model, batch = _setup()
    with pytest.raises(ValueError, match=r"maximal_update_lr: average must be one of \('mean', "
                                         r"'sum'\), got 'max'"):
        cl.maximal_update_lr(model, mse, batch, average="max")
    with pytest.raises(ValueError, match="maximal_update_lr: budget must be positive, got 0"):
        cl.maximal_update_lr(model, mse, batch, budget=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="give lrs or optimizer, not both"):
        cl.maximal_update_lr(model, mse, batch, lrs=0.1, optimizer=opt)
    zero = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match=r"the optimizer.s base LR must be positive, got 0\.0"):
        cl.maximal_update_lr(model, mse, batch, optimizer=zero)
    with pytest.raises(ValueError, match="no layer's features move along the update"):
        cl.maximal_update_lr(model, lambda out, t: (out * 0).sum(), batch)
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead[0].weight.zero_()
        dead[0].bias.zero_()
    with pytest.raises(ValueError, match=r"layers \['0'\] have zero features on this batch"):
        cl.maximal_update_lr(dead, mse, batch, layers=["0", "4"])
