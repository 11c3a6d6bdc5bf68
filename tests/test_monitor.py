"""Monitor and measurements: no perturbation of training, values against independent references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from cases import mlp_problem

import curvlab as cl
from curvlab.callbacks import Schedule, eos_threshold, resolve_blocks
from curvlab.testing import dense_hessian, mse

LR = 0.05


def _train(model, data, steps, monitor=None, optimizer=None, snapshots=None):
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=LR)
    if monitor is not None:
        monitor.optimizer = opt
        monitor.on_train_start()
    for step in range(1, steps + 1):
        opt.zero_grad()
        mse(model(data[0]), data[1]).backward()
        opt.step()
        if snapshots is not None and step in snapshots:
            snapshots[step] = copy.deepcopy(model)
        if monitor is not None:
            monitor.on_train_batch_end(step)
    if monitor is not None:
        monitor.on_train_end()
    return model


def test_monitor_does_not_perturb_training_and_matches_sharpness(tmp_path):
    steps = 25
    plain, data = mlp_problem()
    _train(plain, data, steps)
    model, _ = mlp_problem()
    snapshots = {10: None, 20: None}
    with cl.RunLogger(tmp_path / "run.h5", {"lr": LR}) as log:
        measurements = [cl.Loss(every=5), cl.Sharpness(every=10, tol=1e-10),
                        cl.Sharpness(every=10, preconditioned="lr", tol=1e-10),
                        cl.HessianSpectrum(every=10, k=2, num_iters=10),
                        cl.NTKSpectrum(every=10, k=3), cl.FeatureSpeed(every=10),
                        cl.FeatureChange(every=10)]
        monitor = cl.Monitor(model, mse, data, log, measurements)
        _train(model, data, steps, monitor=monitor, snapshots=snapshots)
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # bit-identical trajectory
    run = cl.load_run(tmp_path / "run.h5")
    sharp = run["sharpness"]
    assert sharp.step.tolist() == [0, 10, 20] and sharp.threshold == pytest.approx(2 / LR)
    for i, step in ((1, 10), (2, 20)):
        ref = cl.sharpness(snapshots[step], mse, data, tol=1e-12)
        torch.testing.assert_close(sharp.value[i], ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(run["sharpness_lr"].value, sharp.value, rtol=1e-9, atol=0)
    assert run["loss"].step.tolist() == [0, 5, 10, 15, 20, 25]
    assert run["feature_cos_theta"].labels == ("0", "2", "4")
    assert run["feature_change_rms"].value.shape == (3, 3)
    assert run["hessian_top"].value.shape == (3, 2) and run["ntk_top"].value.shape == (3, 3)
    assert run["ntk_distance_from_start"].value[0] == pytest.approx(0, abs=1e-12)
    assert set(run.metrics) >= {"time_sharpness", "time_loss", "hessian_density_nodes"}


def _dense_blocks(model, data):
    H = dense_hessian(model, mse, data)
    sizes = [p.numel() for p in model.parameters()]
    edges = np.cumsum([0, *sizes])
    return H, edges


def test_block_curvature_matches_dense_diagonal_blocks(tmp_path):
    model, data = mlp_problem(1)
    H, edges = _dense_blocks(model, data)
    blocks = {"layer0": ["0.*"], "hidden_w": "2.weight", "head": ["4.weight", "4.bias"]}
    ranges = {"layer0": (edges[0], edges[2]), "hidden_w": (edges[2], edges[3]),
              "head": (edges[4], edges[6])}
    with cl.RunLogger(tmp_path / "b.h5", {}) as log:
        mon = cl.Monitor(model, mse, data, log,
                         [cl.HessianSpectrum(steps=[0], k=2, blocks=blocks, tol=1e-12,
                                             trace_matvecs=200, density=False),
                          cl.Sharpness(steps=[0], blocks="layers", tol=1e-12)])
        mon.on_train_start()
    run = cl.load_run(tmp_path / "b.h5")
    assert run["hessian_blocks"].labels == ("layer0", "hidden_w", "head")
    for i, (a, b) in enumerate(ranges.values()):
        Hb = H[a:b, a:b]
        torch.testing.assert_close(run["hessian_blocks"].value[0, i],
                                   float(torch.linalg.eigvalsh(Hb)[-1]), rtol=1e-9, atol=0)
        torch.testing.assert_close(run["hessian_block_trace"].value[0, i],
                                   float(torch.trace(Hb)), rtol=1e-10, atol=1e-12)
    layer_blocks = run["sharpness_blocks"]
    assert layer_blocks.labels == ("0", "2", "4")
    for i, (a, b) in enumerate([(edges[0], edges[2]), (edges[2], edges[4]), (edges[4], edges[6])]):
        torch.testing.assert_close(layer_blocks.value[0, i],
                                   float(torch.linalg.eigvalsh(H[a:b, a:b])[-1]), rtol=1e-9,
                                   atol=0)


def test_adam_preconditioned_sharpness_and_thresholds(tmp_path):
    model, data = mlp_problem(2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.999))
    with cl.RunLogger(tmp_path / "a.h5", {}) as log:
        mon = cl.Monitor(model, mse, data, log,
                         [cl.Sharpness(every=3, preconditioned="adam", tol=1e-12)],
                         optimizer=opt)
        _train(model, data, 3, monitor=mon, optimizer=opt)
    run = cl.load_run(tmp_path / "a.h5")
    adam = run["sharpness_adam"]
    assert adam.step.tolist() == [3]  # no Adam state at step 0: nothing to precondition with
    assert adam.threshold == pytest.approx(38 / 1e-2)
    d = cl.adam_scales(opt, dict(model.named_parameters()))
    H = dense_hessian(model, mse, data)
    ref = torch.linalg.eigvalsh(d.sqrt()[:, None] * H * d.sqrt()[None, :])[-1]
    torch.testing.assert_close(adam.value[0], float(ref), rtol=1e-9, atol=0)
    sgd = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": list(model[2].parameters()) + list(model[4].parameters())}],
                          lr=0.2)
    assert eos_threshold(None, sgd) is None  # raw sharpness: no single LR
    assert eos_threshold("lr", sgd) == pytest.approx(10.0)


def test_schedules():
    every = Schedule.make(10, None, None, "t")
    assert [s for s in range(35) if every.due(s)] == [0, 10, 20, 30]
    explicit = Schedule.make(None, [3, 7], None, "t")
    assert [s for s in range(10) if explicit.due(s)] == [3, 7]
    log = Schedule.make(None, None, 4, "t")
    due = [s for s in range(1001) if log.due(s)]
    assert due == [0, 1, 2, 3, 6, 10, 18, 32, 56, 100, 178, 316, 562, 1000]
    with pytest.raises(ValueError, match="give exactly one schedule"):
        Schedule.make(10, [1], None, "Sharpness")
    with pytest.raises(ValueError, match="every must be a positive int"):
        Schedule.make(0, None, None, "Sharpness")


def test_budget_stretches_the_schedule(tmp_path):
    model, data = mlp_problem()
    with cl.RunLogger(tmp_path / "b.h5", {}) as log:
        mon = cl.Monitor(model, mse, data, log, [cl.Sharpness(every=1)], budget=1e-6)
        _train(model, data, 5, monitor=mon)
    run = cl.load_run(tmp_path / "b.h5")
    assert run["sharpness"].step.tolist() == [0]  # step 0 runs, then the budget is spent
    assert run["monitor_skipped"].value[-1] == 5


def test_monitor_errors(tmp_path):
    model, data = mlp_problem()
    with cl.RunLogger(tmp_path / "e.h5", {}) as log:
        with pytest.raises(TypeError, match=r"logger must be a curvlab\.MetricLogger .*got str, "
                           r"which lacks \['declare', 'flush', 'log', 'log_array'\]"):
            cl.Monitor(model, mse, data, "log.h5", [cl.Loss(every=1)])
        with pytest.raises(TypeError, match="measurements must be a non-empty list"):
            cl.Monitor(model, mse, data, log, [])
        with pytest.raises(ValueError, match="measurement names must differ"):
            cl.Monitor(model, mse, data, log, [cl.Loss(every=1), cl.Loss(every=2)])
        with pytest.raises(ValueError, match=r"budget must be a share of wall time in \(0, 1\)"):
            cl.Monitor(model, mse, data, log, [cl.Loss(every=1)], budget=2.0)
        mon = cl.Monitor(model, mse, data, log, [cl.Sharpness(every=1, preconditioned="lr")])
        with pytest.raises(ValueError, match="preconditioned='lr' needs the Monitor's optimizer"):
            mon.on_train_start()
        mon = cl.Monitor(model, mse, data, log, [cl.FeatureChange(every=1)])
        with pytest.raises(ValueError, match="FeatureChange: needs the Monitor's optimizer"):
            mon.on_train_start()
        mon = cl.Monitor(model, mse, data, log, [cl.Loss(every=1)])
        with pytest.raises(ValueError, match="call on_train_start"):
            mon.on_train_batch_end(1)
    with pytest.raises(ValueError, match="preconditioned must be one of"):
        cl.Sharpness(every=1, preconditioned="kfac")
    with pytest.raises(ValueError, match="block 'x' matches no trained parameter"):
        resolve_blocks(model, {"x": "nope.*"}, "Sharpness")
    with pytest.raises(TypeError, match="blocks must be 'layers'"):
        resolve_blocks(model, "all", "Sharpness")


class _Noisy(torch.nn.Sequential):
    def __init__(self):
        super().__init__(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                         torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))


def _state(model, opt):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
            [p.grad.clone() for p in model.parameters()], torch.get_rng_state())


def test_measurements_leave_train_mode_batchnorm_dropout_models_untouched(tmp_path):
    torch.manual_seed(0)
    model = _Noisy().double().train()
    _, data = mlp_problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # momentum state, running statistics and .grad all non-trivial
        opt.zero_grad()
        mse(model(data[0]), data[1]).backward()
        opt.step()
    before = _state(model, opt)
    with cl.RunLogger(tmp_path / "n.h5", {}) as log:
        mon = cl.Monitor(model, mse, data, log,
                         [cl.Loss(every=1), cl.Sharpness(every=1, preconditioned="adam"),
                          cl.HessianSpectrum(every=1, k=2, num_iters=8), cl.NTKSpectrum(every=1),
                          cl.FeatureSpeed(every=1), cl.FeatureChange(every=1)], optimizer=opt)
        mon.on_train_start()
        mon.on_train_batch_end(1)
    after = _state(model, opt)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(m.training for m in model.modules())
    run = cl.load_run(tmp_path / "n.h5")
    assert run["sharpness_adam"].step.tolist() == [0, 1]  # Adam state existed from the start
    # eval-mode curvature (running statistics, no dropout) is what was measured
    ref = cl.sharpness(copy.deepcopy(model).eval(), mse, data, tol=1e-10,
                       scales=cl.adam_scales(opt, dict(model.named_parameters())))
    torch.testing.assert_close(run["sharpness_adam"].value[0], ref, rtol=1e-3, atol=0)
