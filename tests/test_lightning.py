"""The Lightning adapter logs what the plain-loop Monitor logs (needs the lightning extra)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning_ddp import Module, problem  # the module and data both tests train
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
from curvlab.callbacks.lightning import CurvlabCallback
from curvlab.testing import mse

LR, STEPS = 0.05, 20


def _measurements():
    return [cl.Loss(every=5), cl.Sharpness(every=10, tol=1e-10), cl.FeatureSpeed(every=10)]


def test_lightning_callback_logs_the_same_metrics_as_a_plain_loop(tmp_path):
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with cl.RunLogger(tmp_path / "plain.h5", {"lr": LR}) as log:
        mon = cl.Monitor(model, mse, (x, y), log, _measurements(), optimizer=opt)
        mon.on_train_start()
        for step in range(1, STEPS + 1):
            opt.zero_grad()
            mse(model(x), y).backward()
            opt.step()
            mon.on_train_batch_end(step)
        mon.on_train_end()

    model2, x2, y2 = problem()
    module = Module(model2)
    with cl.RunLogger(tmp_path / "lightning.h5", {"lr": LR}) as log:
        mon = cl.Monitor(model2, mse, (x2, y2), log, _measurements())
        trainer = Trainer(max_steps=STEPS, accelerator="cpu", logger=False,
                          enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[CurvlabCallback(mon)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's advice on workers and logging
            trainer.fit(module, DataLoader(TensorDataset(x2, y2), batch_size=32))
    plain, light = cl.load_run(tmp_path / "plain.h5"), cl.load_run(tmp_path / "lightning.h5")
    names = {n for n in plain.metrics if not n.startswith("time_")}
    assert names == {n for n in light.metrics if not n.startswith("time_")}
    for name in names:
        np.testing.assert_array_equal(plain[name].step, light[name].step)
        np.testing.assert_allclose(light[name].value, plain[name].value, rtol=1e-9, atol=1e-12)
    assert light["sharpness"].threshold == pytest.approx(2 / LR)


def _fit(tmp_path, with_callback: bool) -> dict[str, torch.Tensor]:
    model, x, y = problem()
    callbacks = []
    if with_callback:
        log = cl.RunLogger(tmp_path / "fit.h5", {"lr": LR})
        callbacks.append(CurvlabCallback(cl.Monitor(model, mse, (x, y), log, _measurements())))
    trainer = Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(model), DataLoader(TensorDataset(x, y), batch_size=32))
    if with_callback:
        log.close()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_training_with_the_callback_is_bit_identical_to_training_without(tmp_path):
    with_cb, without = _fit(tmp_path, True), _fit(tmp_path, False)
    assert all(torch.equal(with_cb[n], without[n]) for n in with_cb)
    assert cl.load_run(tmp_path / "fit.h5")["sharpness"].step.tolist() == [0, 10, 20]


def test_callback_refuses_other_objects():
    with pytest.raises(TypeError, match=r"CurvlabCallback: expected a curvlab\.Monitor"):
        CurvlabCallback("monitor")


def test_lightning_ddp_on_cpu_writes_one_file_from_rank_zero(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("lightning_ddp.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run.h5"]
    run = cl.load_run(tmp_path / "run.h5")
    assert run.env["world_size"] == "2" and run.env["backend"] == "gloo"
    assert run.metrics["sharpness"].step.tolist() == [0, 2, 4]
    model, x, y = problem()  # every rank's probe is the whole set: the collective mean is its own
    expected = cl.sharpness(model, mse, (x, y), tol=1e-10)
    assert abs(run.metrics["sharpness"].value[0] - expected) <= 1e-8 * expected


# ------------------------------------------------------------------ gradient accumulation
ACCUMULATE, OPT_STEPS, MICRO = 2, 6, 8  # 32 examples in micro-batches of 8: 2 steps per epoch


def _accumulation_measurements():
    return [cl.Loss(every=1), cl.Sharpness(every=2, tol=1e-10), cl.FeatureSpeed(every=2)]


def _plain_accumulation(tmp_path):
    """The loop Lightning runs with accumulate_grad_batches=2: each micro-batch's loss / 2 is
    backpropagated, the optimizer steps every second micro-batch."""
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with cl.RunLogger(tmp_path / "plain.h5", {"lr": LR}) as log:
        mon = cl.Monitor(model, mse, (x, y), log, _accumulation_measurements(), optimizer=opt)
        mon.on_train_start()
        step = 0
        while step < OPT_STEPS:
            for i in range(len(x) // MICRO):
                part = slice(MICRO * i, MICRO * (i + 1))
                (mse(model(x[part]), y[part]) / ACCUMULATE).backward()
                if i % ACCUMULATE == ACCUMULATE - 1:
                    opt.step()
                    opt.zero_grad()
                    step += 1
                mon.on_train_batch_end(step)
                if step == OPT_STEPS:
                    break
        mon.on_train_end()
    return cl.load_run(tmp_path / "plain.h5")


def _lightning_accumulation(tmp_path, with_callback: bool):
    model, x, y = problem()
    callbacks, log = [], None
    if with_callback:
        log = cl.RunLogger(tmp_path / "lightning.h5", {"lr": LR})
        callbacks.append(CurvlabCallback(cl.Monitor(model, mse, (x, y), log,
                                                    _accumulation_measurements())))
    trainer = Trainer(max_steps=OPT_STEPS, accumulate_grad_batches=ACCUMULATE, accelerator="cpu",
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(model), DataLoader(TensorDataset(x, y), batch_size=MICRO))
    if log is not None:
        log.close()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_accumulate_grad_batches_measures_once_per_optimizer_step_as_a_plain_loop(tmp_path):
    with_cb = _lightning_accumulation(tmp_path, with_callback=True)
    without = _lightning_accumulation(tmp_path, with_callback=False)
    assert all(torch.equal(with_cb[n], without[n]) for n in with_cb)  # training untouched
    plain, light = _plain_accumulation(tmp_path), cl.load_run(tmp_path / "lightning.h5")
    assert light["loss"].step.tolist() == list(range(OPT_STEPS + 1))
    assert light["sharpness"].step.tolist() == [0, 2, 4, 6]
    names = {n for n in plain.metrics if not n.startswith("time_")}
    assert names == {n for n in light.metrics if not n.startswith("time_")}
    for name in names:
        np.testing.assert_array_equal(plain[name].step, light[name].step)
        torch.testing.assert_close(light[name].value, plain[name].value, rtol=1e-8, atol=1e-12)
