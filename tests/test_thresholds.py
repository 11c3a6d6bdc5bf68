"""Edge-of-stability thresholds against the optimizers' own update maps on a quadratic.

On ``L = 0.5 lam theta^2`` one step of each optimizer is linear in its state (``theta`` and the
momentum buffer), with the preconditioner frozen for Adam. The threshold is where the spectral
radius of that map crosses 1: just below it the map contracts, just above it it does not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvlab.callbacks import eos_threshold


def _sgd_map(lam: float, **kw: float) -> np.ndarray:
    """The matrix of one real ``torch.optim.SGD`` step on ``(theta, buffer)``."""
    columns = []
    for state in ((1.0, 0.0), (0.0, 1.0)):
        p = torch.nn.Parameter(torch.tensor([state[0]], dtype=torch.float64))
        opt = torch.optim.SGD([p], **kw)
        if kw.get("momentum", 0):
            opt.state[p]["momentum_buffer"] = torch.tensor([state[1]], dtype=torch.float64)
        p.grad = lam * p.detach().clone()
        opt.step()
        buffer = opt.state[p].get("momentum_buffer", torch.zeros(1))
        columns.append([float(p.detach()), float(buffer)])
    return np.array(columns).T  # (2, 2): new (theta, buffer) from old


def _adam_map(lam_over_p: float, lr: float, beta1: float, w: float) -> np.ndarray:
    """One AdamW step with a frozen preconditioner, ``u = eta m / P``, on ``(theta, u)``:
    ``u' = beta1 u + (1 - beta1) eta lam/P theta``, ``theta' = (1 - eta w) theta - u'``
    (torch.optim.AdamW's order: decay, then the moment update and the step)."""
    a = lr * lam_over_p
    return np.array([[1 - lr * w - (1 - beta1) * a, -beta1],
                     [(1 - beta1) * a, beta1]])


def _radius(M: np.ndarray) -> float:
    return float(np.abs(np.linalg.eigvals(M)).max())


@pytest.mark.parametrize("kw", [dict(lr=0.1), dict(lr=0.1, momentum=0.9),
                                dict(lr=0.05, momentum=0.5, dampening=0.3),
                                dict(lr=0.1, momentum=0.9, nesterov=True)],
                         ids=["gd", "heavy-ball", "dampening", "nesterov"])
def test_sgd_thresholds_are_where_the_real_step_stops_contracting(kw):
    T = eos_threshold(None, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], **kw))
    assert _radius(_sgd_map(0.99 * T, **kw)) < 1 < _radius(_sgd_map(1.01 * T, **kw))
    assert _radius(_sgd_map(T, **kw)) == pytest.approx(1.0, abs=1e-9)


def test_momentum_thresholds_by_hand():
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert eos_threshold(None, torch.optim.SGD(p, lr=0.1, momentum=0.9)) == pytest.approx(38.0)
    assert eos_threshold(None, torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)) == \
        pytest.approx(3.8 / 2.8 / 0.1)
    assert eos_threshold(None, torch.optim.SGD(p, lr=0.1)) == pytest.approx(20.0)
    assert eos_threshold("adam", torch.optim.Adam(p, lr=1e-3)) == pytest.approx(38e3)


@pytest.mark.parametrize("w", [0.0, 0.1, 30.0])
def test_adam_and_adamw_thresholds_are_where_the_frozen_step_stops_contracting(w):
    lr, beta1 = 1e-2, 0.9
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr, betas=(beta1, 0.99),
                            weight_decay=w)
    T = eos_threshold("adam", opt)
    assert _radius(_adam_map(0.99 * T, lr, beta1, w)) < 1 < _radius(_adam_map(1.01 * T, lr,
                                                                               beta1, w))
    if w == 0.0:
        assert T == pytest.approx(38 / lr)


def test_no_single_threshold_gives_none():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    mixed = torch.optim.SGD([{"params": [a], "momentum": 0.9}, {"params": [b]}], lr=0.1)
    assert eos_threshold("lr", mixed) is None
    assert eos_threshold(None, torch.optim.SGD([a], lr=0.0)) is None
    assert eos_threshold(None, torch.optim.Adam([a], lr=1e-3)) is None  # raw sharpness: no line
    assert eos_threshold("lr", torch.optim.AdamW([a], lr=1e-3)) is None


def test_adam_preconditioning_with_another_optimizer_is_refused(tmp_path):
    import curvlab as cl

    model = torch.nn.Linear(3, 1)
    data = (torch.randn(8, 3), torch.randn(8, 1))
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1),
                torch.optim.RMSprop(model.parameters(), lr=0.1)):
        with cl.RunLogger(tmp_path / f"{type(opt).__name__}.h5", {}) as log:
            mon = cl.Monitor(model, cl.testing.mse, data, log,
                             [cl.Sharpness(every=1, preconditioned="adam")], optimizer=opt)
            with pytest.raises(ValueError, match=r"preconditioned='adam' needs torch\.optim\.Adam"
                                                 r" or AdamW.*preconditioned='lr'"):
                mon.on_train_start()


def test_adamw_groups_that_differ_in_decay_get_the_lowest_line():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.1},
                             {"params": [b], "weight_decay": 0.0}], lr=1e-2)
    assert eos_threshold("adam", opt) == pytest.approx(1.9 * (2 - 1e-3) / (0.1 * 1e-2))
