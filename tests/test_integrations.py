"""Compiled models, the Hugging Face Trainer callback, and what cannot be one operator."""

from __future__ import annotations

import multiprocessing
import warnings

import numpy as np
import pytest
import torch
from cases import assert_rel_close, vectors
from real_models import gpt2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
from curvlab.testing import MLP, mse


def _mlp_problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = MLP(d_in=4, width=8, d_out=2).double().eval()
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(16, 4, generator=g, dtype=torch.float64),
                   torch.randn(16, 2, generator=g, dtype=torch.float64))


def _compiled_cases():
    model, data = _mlp_problem()
    yield pytest.param(("mlp-inductor", model, torch.compile(model), mse, data, None))
    real = gpt2()
    yield pytest.param(("gpt2-aot_eager", real.model,
                        torch.compile(real.model, backend="aot_eager"), real.loss_fn,
                        real.batches, real.weights))


@pytest.mark.parametrize("case", list(_compiled_cases()),
                         ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_compiled_models_take_a_route_that_works_and_equal_the_eager_values(case, tmp_path):
    _, model, compiled, loss_fn, data, weights = case
    torch._dynamo.reset()
    H = cl.HessianOperator(compiled, loss_fn, data, weights=weights)
    eager = cl.HessianOperator(model, loss_fn, data, weights=weights)
    assert H.method == "fwd-rev" and eager.method == "rev-rev"  # aot_autograd: no double backward
    assert H.param_names == eager.param_names  # no "_orig_mod." prefix
    V = vectors(H.shape[0], 2)
    assert_rel_close(H @ V, eager @ V, 1e-10)
    top = cl.sharpness(compiled, loss_fn, data, weights=weights, tol=1e-8)
    assert top == pytest.approx(cl.sharpness(model, loss_fn, data, weights=weights, tol=1e-8),
                                rel=1e-7)
    values = []
    for name, net in (("compiled", compiled), ("eager", model)):
        with cl.RunLogger(tmp_path / f"{name}.h5", {}) as log:
            mon = cl.Monitor(net, loss_fn, data, log, [cl.Sharpness(every=1, tol=1e-8),
                                                       cl.FeatureSpeed(every=1)],
                             weights=weights)
            mon.on_train_start()
        run = cl.load_run(tmp_path / f"{name}.h5")
        values.append((run["sharpness"].value, run["feature_cos_theta"].value,
                       run["feature_cos_theta"].labels))
    np.testing.assert_allclose(values[0][0], values[1][0], rtol=1e-7)
    np.testing.assert_allclose(values[0][1], values[1][1], rtol=1e-10)
    assert values[0][2] == values[1][2]


def test_a_compiled_model_s_blocks_and_lr_scales_use_the_eager_names(tmp_path):
    model, data = _mlp_problem()
    compiled = torch.compile(model)
    values = []
    for name, net in (("compiled", compiled), ("eager", model)):
        opt = torch.optim.SGD([{"params": [model[0].weight], "lr": 0.2},
                               {"params": [p for n, p in model.named_parameters()
                                           if n != "0.weight"]}], lr=0.1)
        with cl.RunLogger(tmp_path / f"{name}.h5", {}) as log:
            cl.Monitor(net, mse, data, log, [cl.Sharpness(every=1, preconditioned="lr",
                                                          blocks=["0.*", "2.*"], tol=1e-8)],
                       optimizer=opt).on_train_start()
        run = cl.load_run(tmp_path / f"{name}.h5")
        values.append((run["sharpness_lr"].value, run["sharpness_lr_blocks"].value))
    np.testing.assert_allclose(values[0][0], values[1][0], rtol=1e-7)
    np.testing.assert_allclose(values[0][1], values[1][1], rtol=1e-7)


class _OnceDifferentiable(torch.autograd.Function):
    """tanh with a backward that cannot be differentiated and no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _OpaqueTanh(nn.Module):
    def forward(self, x):
        return _OnceDifferentiable.apply(x)


def test_a_model_no_route_can_differentiate_twice_gets_a_clear_error():
    """A custom Function without forward-mode support, in a compiled model: rev-rev has no
    double backward (aot_autograd), fwd-rev no jvp."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _OpaqueTanh(), nn.Linear(4, 2)).double().eval()
    data = (torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    H = cl.HessianOperator(model, mse, data, method="fwd-rev")
    with pytest.raises(ValueError, match=r"method='fwd-rev' does not run on this model.*setup_co"
                                         r".*try method='rev-rev'"):
        H @ v
    torch._dynamo.reset()
    H = cl.HessianOperator(torch.compile(model, backend="aot_eager"), mse, data)
    with pytest.raises(ValueError, match=r"neither double backward nor forward-over-reverse runs"
                                         r".*model\._orig_mod"):
        H @ v


def test_shuffling_dataloaders_are_refused_everywhere_they_would_not_be_one_matrix(tmp_path):
    model, (x, y) = _mlp_problem()
    shuffled = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    for build in (lambda: cl.HessianOperator(model, mse, shuffled),
                  lambda: cl.GGNOperator(model, mse, shuffled),
                  lambda: cl.sharpness(model, mse, shuffled)):
        with pytest.raises(ValueError, match=r"DataLoader that shuffles.*shuffle=False"):
            build()
    with cl.RunLogger(tmp_path / "run.h5", {}) as log, \
            pytest.raises(ValueError, match="Monitor: data is a DataLoader that shuffles"):
        cl.Monitor(model, mse, shuffled, log, [cl.Loss(every=1)])
    fixed = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    V = vectors(cl.HessianOperator(model, mse, (x, y)).shape[0], 1)
    assert_rel_close(cl.HessianOperator(model, mse, fixed) @ V,
                     cl.HessianOperator(model, mse, (x, y)) @ V)


def test_a_dict_batch_dataloader_probe_is_sliced_for_the_ntk(tmp_path):
    case = cl.testing.make_case("dict_input")
    inputs, y = case.data
    rows = [({"x": inputs["x"][i], "z": inputs["z"][i]}, y[i]) for i in range(len(y))]
    probe = DataLoader(rows, batch_size=6, shuffle=False)  # yields [dict of (6, d), (6, 2)]
    with cl.RunLogger(tmp_path / "run.h5", {}) as log:
        mon = cl.Monitor(case.model, case.loss_fn, probe, log,
                         [cl.NTKSpectrum(every=1, size=4), cl.Loss(every=1)])
        mon.on_train_start()
    run = cl.load_run(tmp_path / "run.h5")
    K = cl.empirical_ntk(case.model, {k: v[:4] for k, v in inputs.items()}, outputs="trace")
    expected = torch.linalg.eigvalsh(K).flip(0)[:4].numpy()
    np.testing.assert_allclose(run["ntk_top"].value[0], expected, rtol=1e-10)
    with torch.no_grad():
        loss = float(case.loss_fn(case.model(**inputs), y))
    assert run["loss"].value[0] == pytest.approx(loss, rel=1e-12)


def _hold_logger(path, ready, release):
    with cl.RunLogger(path, {}) as log:
        log.log(0, loss=1.0)
        ready.set()
        release.wait(30)


def test_a_second_writer_on_a_run_file_is_refused_in_this_and_another_process(tmp_path):
    path = tmp_path / "run.h5"
    with cl.RunLogger(path, {}) as log:
        log.log(0, loss=1.0)
        for mode in ("a", "w"):
            with pytest.raises(ValueError, match=r"is open in another RunLogger.*another path"):
                cl.RunLogger(path, {}, mode=mode)
    with cl.RunLogger(path, {}, mode="a") as log:  # closed: the lock is free again
        log.log(1, loss=0.5)
    assert cl.load_run(path)["loss"].step.tolist() == [0, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["run.h5"]  # the lock file goes on close

    other = tmp_path / "other.h5"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_hold_logger, args=(other, ready, release))
    writer.start()
    try:
        assert ready.wait(30)
        with pytest.raises(ValueError, match="is open in another RunLogger"):
            cl.RunLogger(other, {}, mode="a")
    finally:
        release.set()
        writer.join(30)
    with cl.RunLogger(other, {}, mode="a") as log:
        log.log(1, loss=0.5)


# --------------------------------------------------------------------- Hugging Face Trainer


def _fit_hf(tmp_path, model, rows, make_monitor=None, **arguments):
    """Train ``model`` with ``transformers.Trainer`` on ``rows`` (CPU, no saving or logging),
    with a Monitor from ``make_monitor(log)`` when given; returns the trained parameters."""
    import transformers

    from curvlab.callbacks.hf import CurvlabTrainerCallback

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, **arguments)
    callbacks, log = [], None
    if make_monitor is not None:
        log = cl.RunLogger(tmp_path / "hf.h5", {"model": type(model).__name__})
        callbacks.append(CurvlabTrainerCallback(make_monitor(log)))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    if log is not None:
        log.close()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _gpt2_rows(real):
    return [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i],
             "labels": labels[i]} for x, labels in real.batches for i in range(len(labels))]


def _hf_train(tmp_path, with_callback: bool):
    real = gpt2(torch.float32)
    model = real.model.train()

    def monitor(log):
        probe = real.batches[:2]  # fixed batches, given explicitly
        return cl.Monitor(model, real.loss_fn, probe, log,
                          [cl.Loss(every=1), cl.Sharpness(every=2, tol=1e-3, max_iters=20),
                           cl.Sharpness(every=2, preconditioned="adam", tol=1e-3, max_iters=20),
                           cl.FeatureSpeed(every=2)], weights=real.weights)

    return _fit_hf(tmp_path, model, _gpt2_rows(real), monitor if with_callback else None,
                   max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                   lr_scheduler_type="constant")


def test_gpt2_under_a_warmup_cosine_schedule_to_zero_skips_the_lr_zero_steps(tmp_path):
    """The user's case: a GPT-2 trained by the Trainer's AdamW with warm-up from 0 and a cosine
    decay to 0; the Adam-preconditioned sharpness is skipped where it does not exist."""
    real = gpt2(torch.float32)
    model = real.model.train()

    def monitor(log):
        return cl.Monitor(model, real.loss_fn, real.batches[:2], log,
                          [cl.Sharpness(every=2, preconditioned="adam", max_iters=20),
                           cl.Sharpness(every=2, preconditioned="adam", lr="base", max_iters=20),
                           cl.FeatureSpeed(every=2)], weights=real.weights)

    _fit_hf(tmp_path, model, _gpt2_rows(real), monitor, max_steps=8, warmup_steps=2,
            per_device_train_batch_size=2, learning_rate=1e-3, lr_scheduler_type="cosine")
    run = cl.load_run(tmp_path / "hf.h5")
    no_state, lr_zero = cl.SKIP_REASONS[1], cl.SKIP_REASONS[0]
    assert run.skipped("sharpness_adam") == {0: no_state, 8: lr_zero}
    assert run.skipped("sharpness_adam_base") == {0: no_state}
    assert run.skipped("feature") == {0: lr_zero, 8: lr_zero}
    assert run["sharpness_adam"].step.tolist() == [2, 4, 6]
    assert run["sharpness_adam_base"].step.tolist() == [2, 4, 6, 8]
    assert np.isfinite(run["sharpness_adam_base"].value).all()
    # past the warm-up the scheduled LR is below the base LR, and so is its sharpness
    assert (run["sharpness_adam"].value[1:] < run["sharpness_adam_base"].value[1:3]).all()


def test_hf_trainer_callback_logs_a_run_and_leaves_training_bit_identical(tmp_path):
    with_cb = _hf_train(tmp_path, with_callback=True)
    without = _hf_train(tmp_path, with_callback=False)
    for name in with_cb:
        assert torch.equal(with_cb[name], without[name]), name
    run = cl.load_run(tmp_path / "hf.h5")
    assert run["loss"].step.tolist() == [0, 1, 2, 3, 4]
    assert run["sharpness"].step.tolist() == [0, 2, 4]
    assert run["sharpness_adam"].step.tolist() == [2, 4]
    assert run["feature_cos_theta"].labels[0] == "transformer.h.0:in"
    assert np.isfinite(run["sharpness_adam"].value).all()


def test_hf_callback_refuses_other_objects():
    from curvlab.callbacks.hf import CurvlabTrainerCallback

    with pytest.raises(TypeError, match=r"CurvlabTrainerCallback: expected a curvlab\.Monitor"):
        CurvlabTrainerCallback("monitor")


# ------------------------------------------- Hugging Face Trainer with gradient accumulation
HF_ACCUMULATE, HF_STEPS, HF_MICRO, HF_LR = 2, 4, 8, 1e-3


class _Regressor(nn.Module):
    """An MLP with the Trainer's calling convention: ``forward(x, labels=None)`` returns an
    output with ``.logits`` (and ``.loss`` when labels are given). No ``**kwargs``, so the
    Trainer divides each micro-batch's loss by gradient_accumulation_steps."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(d_in=4, width=8, d_out=2).double()

    def forward(self, x, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.net(x)
        return SequenceClassifierOutput(loss=None if labels is None else mse(logits, labels),
                                        logits=logits)


class _Rows(torch.utils.data.IterableDataset):
    """The rows in order (an iterable dataset, so the Trainer does not shuffle them)."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter({"x": a, "labels": b} for a, b in zip(self.x, self.y, strict=True))


def _hf_problem():
    torch.manual_seed(0)
    model = _Regressor()
    g = torch.Generator().manual_seed(1)
    return (model, torch.randn(32, 4, generator=g, dtype=torch.float64),
            torch.randn(32, 2, generator=g, dtype=torch.float64))


def _hf_measurements():
    return [cl.Loss(every=1), cl.Sharpness(every=2, tol=1e-10),
            cl.Sharpness(every=2, preconditioned="adam", tol=1e-10), cl.FeatureSpeed(every=2)]


def _hf_accumulation(tmp_path, with_callback: bool):
    model, x, y = _hf_problem()

    def monitor(log):
        return cl.Monitor(model, mse, (x, y), log, _hf_measurements())

    return _fit_hf(tmp_path, model, _Rows(x, y), monitor if with_callback else None,
                   max_steps=HF_STEPS, per_device_train_batch_size=HF_MICRO,
                   gradient_accumulation_steps=HF_ACCUMULATE, learning_rate=HF_LR,
                   weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0)


def _plain_hf_accumulation(tmp_path):
    """What the Trainer runs: AdamW, each micro-batch's loss / 2 backpropagated, a step every
    second micro-batch, no clipping, a constant LR."""
    model, x, y = _hf_problem()
    opt = torch.optim.AdamW(model.parameters(), lr=HF_LR, weight_decay=0.0)
    with cl.RunLogger(tmp_path / "plain.h5", {"lr": HF_LR}) as log:
        mon = cl.Monitor(model, mse, (x, y), log, _hf_measurements(), optimizer=opt)
        mon.on_train_start()
        model.train()
        micro, step = 0, 0
        while step < HF_STEPS:
            part = slice(HF_MICRO * (micro % 4), HF_MICRO * (micro % 4 + 1))
            (model(x[part], labels=y[part]).loss / HF_ACCUMULATE).backward()
            micro += 1
            if micro % HF_ACCUMULATE == 0:
                opt.step()
                opt.zero_grad()
                step += 1
                mon.on_train_batch_end(step)
    return cl.load_run(tmp_path / "plain.h5")


def test_hf_gradient_accumulation_measures_once_per_optimizer_step_as_a_plain_loop(tmp_path):
    with_cb = _hf_accumulation(tmp_path, with_callback=True)
    without = _hf_accumulation(tmp_path, with_callback=False)
    for name in with_cb:
        assert torch.equal(with_cb[name], without[name]), name  # training untouched
    hf, plain = cl.load_run(tmp_path / "hf.h5"), _plain_hf_accumulation(tmp_path)
    assert hf["loss"].step.tolist() == list(range(HF_STEPS + 1))
    assert hf["sharpness_adam"].step.tolist() == [2, 4]
    assert hf.skipped("sharpness_adam") == {0: cl.SKIP_REASONS[1]}  # no Adam state at step 0
    names = {n for n in plain.metrics if not n.startswith("time_")}
    assert names == {n for n in hf.metrics if not n.startswith("time_")}
    for name in names:
        np.testing.assert_array_equal(plain[name].step, hf[name].step)
        torch.testing.assert_close(hf[name].value, plain[name].value, rtol=1e-8, atol=1e-12)
