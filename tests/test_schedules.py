"""Training-loop realities: an LR schedule that reaches 0, parameters frozen by their LR, gradient
accumulation in a plain loop, and resumed runs whose steps repeat."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch.func import functional_call, hessian

import curvlab as cl
from curvlab.callbacks.monitor import LR_ZERO, NO_STATE
from curvlab.testing import MLP, mse

STEPS, EVERY = 100, 10
WARMUP = 10


def _problem():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = MLP(3, 8, 2).double()
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = torch.randn(24, 2, generator=g, dtype=torch.float64)
    return model, x, y


def _warmup_cosine(step: int) -> float:
    """LR factor of a linear warm-up from 0 and a cosine decay to 0 at STEPS (the shape of
    transformers' get_cosine_schedule_with_warmup)."""
    if step < WARMUP:
        return step / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def _dense_top(model, x, y, d: torch.Tensor) -> float:
    """lambda_max(D^{1/2} H D^{1/2}) from the dense Hessian."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [p.shape for p in params.values()]

    def loss(flat):
        parts = torch.split(flat, [math.prod(s) for s in shapes])
        theta = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return mse(functional_call(model, theta, (x,)), y)

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    H = hessian(loss)(flat)  # (P, P)
    s = d.sqrt()
    return float(torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1])


def _run(tmp_path, measurements):
    model, x, y = _problem()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine)
    path = tmp_path / "run.h5"
    seen = {}
    with cl.RunLogger(path, {"lr": 0.05}) as log:
        mon = cl.Monitor(model, mse, (x, y), log, measurements, optimizer=opt)
        mon.on_train_start()
        for step in range(1, STEPS + 1):
            opt.zero_grad()
            mse(model(x), y).backward()
            opt.step()
            sched.step()  # the LR of the next step, as Lightning and the HF Trainer order it
            mon.on_train_batch_end(step)
            if step in (50, STEPS):
                named = dict(model.named_parameters())
                seen[step] = (
                    _dense_top(model, x, y, cl.adam_scales(opt, named)) if step != STEPS else None,
                    _dense_top(model, x, y, cl.adam_scales(opt, named, scheduled=False)),
                    opt.param_groups[0]["lr"])
    return cl.load_run(path), seen


def test_a_warmup_cosine_to_zero_run_logs_every_scheduled_measurement(tmp_path):
    measurements = [cl.Loss(every=EVERY), cl.Sharpness(every=EVERY),
                    cl.Sharpness(every=EVERY, preconditioned="adam", tol=1e-9),
                    cl.Sharpness(every=EVERY, preconditioned="adam", lr="base", tol=1e-9),
                    cl.Sharpness(every=EVERY, preconditioned="lr"),
                    cl.HessianSpectrum(every=EVERY, k=2, preconditioned="adam", density=False),
                    cl.NTKSpectrum(every=EVERY, k=3), cl.FeatureSpeed(every=EVERY),
                    cl.FeatureChange(every=EVERY)]
    run, seen = _run(tmp_path, measurements)
    assert seen[STEPS][2] == 0.0  # the schedule reaches 0 exactly
    scheduled = set(range(0, STEPS + 1, EVERY))
    skipped_where = {"sharpness_adam": {0: NO_STATE, STEPS: LR_ZERO},
                     "sharpness_adam_base": {0: NO_STATE},
                     "sharpness_lr": {0: LR_ZERO, STEPS: LR_ZERO},
                     "hessian": {0: NO_STATE, STEPS: LR_ZERO},
                     "ntk": {0: LR_ZERO, STEPS: LR_ZERO},
                     "feature": {0: LR_ZERO, STEPS: LR_ZERO}}
    measured = {"loss": "loss", "sharpness": "sharpness", "sharpness_adam": "sharpness_adam",
                "sharpness_adam_base": "sharpness_adam_base", "sharpness_lr": "sharpness_lr",
                "hessian": "hessian_top", "ntk": "ntk_top", "feature": "feature_cos_theta",
                "feature_change": "feature_change_rms"}
    for name, metric in measured.items():
        skipped = run.skipped(name) if f"{name}_skipped" in run.metrics else {}
        assert skipped == skipped_where.get(name, {}), name
        steps = run[metric].step.tolist()
        assert set(steps) | set(skipped) == scheduled, name  # every scheduled step, once
        assert not set(steps) & set(skipped), name
        assert np.isfinite(run[metric].value).all(), name
    # The scheduled sharpness is the base one times the schedule's factor (one group, one LR).
    adam, base = run["sharpness_adam"], run["sharpness_adam_base"]
    common = np.intersect1d(adam.step, base.step)
    factor = np.array([_warmup_cosine(int(s)) for s in common])
    np.testing.assert_allclose(adam.value[np.searchsorted(adam.step, common)],
                               factor * base.value[np.searchsorted(base.step, common)],
                               rtol=1e-7)
    # Against the dense Hessian: mid-run, and at LR 0 for the base-LR quantity.
    torch.testing.assert_close(float(adam.value[adam.step.tolist().index(50)]), seen[50][0],
                               rtol=1e-7, atol=0)
    torch.testing.assert_close(float(base.value[-1]), seen[STEPS][1], rtol=1e-7, atol=0)
    assert adam.threshold == base.threshold == pytest.approx(1.9 * (2 - 0.05 * 0.01) / 0.1 / 0.05)
    assert run["sharpness_adam_threshold"].step.tolist() == list(range(EVERY, STEPS, EVERY))
    assert "sharpness_threshold" not in run.metrics  # AdamW has no line for the raw Hessian
    fig = cl.plot_metrics(run, ["sharpness_adam", "sharpness_adam_base"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert sum(label.startswith("threshold of") for label in labels) == 2
    assert "sharpness_adam skipped" in labels


def test_parameters_frozen_by_their_lr_drop_out_of_the_preconditioned_operator(tmp_path):
    model, x, y = _problem()
    first, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = torch.optim.SGD([{"params": first, "lr": 0.1}, {"params": rest, "lr": 0.0}], lr=0.1)
    d = cl.lr_scales(opt, dict(model.named_parameters()))
    assert (d == 0).any() and (d > 0).any()
    with cl.RunLogger(tmp_path / "run.h5", {}) as log:
        mon = cl.Monitor(model, mse, (x, y), log,
                         [cl.Sharpness(every=1, preconditioned="lr", tol=1e-10,
                                       blocks=["0.*", "2.*"])], optimizer=opt)
        mon.on_train_start()
    run = cl.load_run(tmp_path / "run.h5")
    torch.testing.assert_close(float(run["sharpness_lr"].value[0]), _dense_top(model, x, y, d),
                               rtol=1e-8, atol=0)
    assert run["sharpness_lr_blocks"].value[0, 1] == 0.0  # the frozen block's operator is 0
    assert run["sharpness_lr_blocks"].value[0, 0] > 0


def test_gradient_accumulation_in_a_plain_loop_measures_once_per_optimizer_step(tmp_path):
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with cl.RunLogger(tmp_path / "run.h5", {}) as log:
        mon = cl.Monitor(model, mse, (x, y), log, [cl.Loss(every=1)], optimizer=opt)
        mon.on_train_start()
        step = 0
        for micro in range(8):
            part = slice(12 * (micro % 2), 12 * (micro % 2) + 12)
            (mse(model(x[part]), y[part]) / 2).backward()
            if micro % 2 == 1:
                opt.step()
                opt.zero_grad()
                step += 1
            mon.on_train_batch_end(step)  # after every micro-batch: repeats are ignored
    assert cl.load_run(tmp_path / "run.h5")["loss"].step.tolist() == [0, 1, 2, 3, 4]


def _train(log, start: int, stop: int, model, opt, x, y, **start_kw):
    mon = cl.Monitor(model, mse, (x, y), log, [cl.Loss(every=1), cl.Sharpness(every=5)],
                     optimizer=opt)
    mon.on_train_start(**start_kw)
    for step in range(start + 1, stop + 1):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
        mon.on_train_batch_end(step)
    return mon


def test_a_resumed_run_continues_after_the_last_committed_step(tmp_path):
    path = tmp_path / "run.h5"
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with cl.RunLogger(path, {"lr": 0.05}) as log:
        _train(log, 0, 12, model, opt, x, y)
    checkpoint = {n: p.detach().clone() for n, p in model.named_parameters()}  # as at step 12
    with cl.RunLogger(path, {"lr": 0.05}, mode="a") as log, warnings.catch_warnings():
        warnings.simplefilter("error")  # resuming at the file's last step repeats nothing
        _train(log, 12, 17, model, opt, x, y, step=12)  # a crash at 17, after the checkpoint
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(checkpoint[n])
    with cl.RunLogger(path, {"lr": 0.05}, mode="a") as log, \
            pytest.warns(UserWarning, match=r"already holds steps up to 17; training restarts at "
                                            r"step 12, so steps 12\.\.17 are not measured again"):
        _train(log, 12, 25, model, opt, x, y, step=12)
    run = cl.load_run(path)
    assert run["loss"].step.tolist() == list(range(26))
    assert run["sharpness"].step.tolist() == [0, 5, 10, 15, 20, 25]


def test_steps_that_go_back_or_are_not_steps_are_refused(tmp_path):
    model, x, y = _problem()
    with cl.RunLogger(tmp_path / "run.h5", {}) as log:
        mon = cl.Monitor(model, mse, (x, y), log, [cl.Loss(every=1)])
        with pytest.raises(ValueError, match=r"on_train_batch_end: call on_train_start\(\) first"):
            mon.on_train_batch_end(1)
        with pytest.raises(TypeError, match="on_train_start: step must be a non-negative int"):
            mon.on_train_start(step=-1)
        mon.on_train_start()
        mon.on_train_batch_end(3)
        mon.on_train_batch_end(3)  # a repeat (gradient accumulation) is ignored
        with pytest.raises(ValueError, match=r"step 2 comes before step 3, given earlier; steps "
                                             r"are optimizer steps taken and never go back"):
            mon.on_train_batch_end(2)
        with pytest.raises(TypeError, match="on_train_batch_end: step must be a non-negative int"):
            mon.on_train_batch_end(4.0)
        with pytest.raises(ValueError, match=r"step 3 of 'loss' does not follow the last "
                                             r"committed step 3 .*mode='a'"):
            log.log(3, loss=1.0)
        assert log.last_step() == 3 and log.last_step("loss") == 3
        assert log.last_step("nothing") is None


def test_skip_records_and_options_are_checked():
    with pytest.raises(ValueError, match=r"Skip: reason must be one of curvlab.SKIP_REASONS"):
        cl.callbacks.Skip("sharpness", "tired")
    with pytest.raises(ValueError, match=r"Sharpness: lr must be one of \('current', 'base'\)"):
        cl.Sharpness(every=1, preconditioned="adam", lr="peak")
    with pytest.raises(ValueError, match="lr='base' applies to a preconditioned sharpness"):
        cl.Sharpness(every=1, lr="base")


def test_declaring_codes_on_a_vector_metric_is_refused(tmp_path):
    with cl.RunLogger(tmp_path / "run.h5", {}) as log, \
            pytest.raises(ValueError, match="codes= describe a scalar metric's values"):
        log.declare("x", size=2, codes=["a", "b"])
    run = cl.load_run(tmp_path / "run.h5")
    with pytest.raises(KeyError, match=r"Run.skipped: .* has no metric 'sharpness'"):
        run.skipped("sharpness")
