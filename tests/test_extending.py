"""The public extension points (docs/extending.md): loggers, measurements, curvature operators."""

from __future__ import annotations

import collections
import copy
import inspect
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cases import mlp_problem

import curvlab as cl
from curvlab import products
from curvlab.callbacks import Context, Measurement, Record
from curvlab.testing import dense_ggn, dense_hessian, dense_jacobian, make_case, mse

DOCS = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _train(model, data, logger, measurements, steps=6, lr=0.05):
    """Full-batch SGD with a Monitor; returns the gradient of each step's parameters (the
    training loop's own ``p.grad``, taken before the step that follows)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = cl.Monitor(model, mse, data, logger, measurements, optimizer=opt)
    monitor.on_train_start()
    grads = {}
    for step in range(1, steps + 2):
        opt.zero_grad()
        mse(model(data[0]), data[1]).backward()
        grads[step - 1] = [p.grad.clone() for p in model.parameters()]  # at step - 1's params
        if step > steps:
            break
        opt.step()
        monitor.on_train_batch_end(step)
    monitor.on_train_end()
    return grads


# ----------------------------------------------------------------------------- loggers


class MemoryLogger:
    """The protocol's five methods only: no update_env, last_step or path."""

    def __init__(self):
        self.rows: dict[str, list] = collections.defaultdict(list)
        self.declared: dict[str, dict] = {}

    def __contains__(self, name):
        return name in self.declared

    def declare(self, name, *, size=None, labels=None, description="", threshold=None,
                codes=None):
        self.declared[name] = {"size": size, "labels": labels, "threshold": threshold}

    def log(self, step, **scalars):
        for name, value in scalars.items():
            self.declared.setdefault(name, {"size": None})
            self.rows[name].append((step, float(value)))

    def log_array(self, step, name, values):
        self.rows[name].append((step, np.array(values)))

    def flush(self):
        pass


def test_run_logger_satisfies_the_protocol(tmp_path):
    with cl.RunLogger(tmp_path / "r.h5", {}) as log:
        assert isinstance(log, cl.MetricLogger)
        assert cl.loggers.missing_methods(log) == []
    assert isinstance(MemoryLogger(), cl.MetricLogger)
    assert not isinstance("run.h5", cl.MetricLogger)


def test_monitor_takes_any_metric_logger(tmp_path):
    """A logger with only the protocol's methods gets what a RunLogger gets."""
    measurements = lambda: [cl.Loss(every=1), cl.Sharpness(every=2, tol=1e-8),  # noqa: E731
                            cl.Sharpness(k=2, every=3, tol=1e-8, name="top2")]
    model, data = mlp_problem()
    memory = MemoryLogger()
    _train(copy.deepcopy(model), data, memory, measurements())
    with cl.RunLogger(tmp_path / "r.h5", {}) as log:
        _train(copy.deepcopy(model), data, log, measurements())
    run = cl.load_run(tmp_path / "r.h5")
    for name in ("loss", "sharpness", "top2", "sharpness_threshold"):
        steps, values = zip(*memory.rows[name], strict=True)
        assert list(steps) == run[name].step.tolist()
        torch.testing.assert_close(torch.as_tensor(np.array(values)),
                                   torch.as_tensor(run[name].value), rtol=1e-12, atol=1e-12)
    assert memory.declared["top2"]["labels"] == ["0", "1"]
    assert memory.declared["sharpness"]["threshold"] == 2 / 0.05


def test_monitor_names_the_missing_methods():
    model, data = mlp_problem()

    class HalfLogger:
        def log(self, step, **scalars):
            pass

        def flush(self):
            pass

    with pytest.raises(TypeError, match=r"Monitor: logger must be a curvlab\.MetricLogger .*got "
                       r"HalfLogger, which lacks \['__contains__', 'declare', 'log_array'\]"):
        cl.Monitor(model, mse, data, HalfLogger(), [cl.Loss(every=1)])


def _scalars(log_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
            for tag in events.Tags()["scalars"]}


def test_tensorboard_logger_matches_run_logger(tmp_path):
    pytest.importorskip("tensorboard")
    measurements = lambda: [cl.Loss(every=1), cl.Sharpness(every=2, tol=1e-8),  # noqa: E731
                            cl.Sharpness(k=2, every=3, tol=1e-8, name="top2")]
    model, data = mlp_problem()
    with cl.TensorBoardLogger(tmp_path / "tb") as tb:
        assert isinstance(tb, cl.MetricLogger)
        _train(copy.deepcopy(model), data, tb, measurements())
    with cl.RunLogger(tmp_path / "r.h5", {}) as log:
        _train(copy.deepcopy(model), data, log, measurements())
    run, scalars = cl.load_run(tmp_path / "r.h5"), _scalars(tmp_path / "tb")
    for name in ("loss", "sharpness", "sharpness_threshold", "sharpness_matvecs"):
        steps, values = scalars[name]
        assert steps == run[name].step.tolist()
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float64),
                                   torch.as_tensor(run[name].value), rtol=1e-6, atol=1e-6)
    assert run["top2"].labels == ("0", "1") or list(run["top2"].labels) == ["0", "1"]
    for i in range(2):  # one scalar per entry, name/<label>
        steps, values = scalars[f"top2/{i}"]
        assert steps == run["top2"].step.tolist() == [0, 3, 6]
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float64),
                                   torch.as_tensor(run["top2"].value[:, i]), rtol=1e-6, atol=1e-6)
    assert "top2" not in scalars


def test_tensorboard_logger_labels_and_errors(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    with cl.TensorBoardLogger(tmp_path / "tb") as tb:
        tb.declare("per_layer", labels=["0.weight", "2.weight"], description="per layer")
        tb.log_array(3, "per_layer", [1.5, 2.5])
        tb.log_array(4, "unlabelled", np.array([7.0, 8.0, 9.0]))
        tb.log(4, loss=0.25)
        tb.update_env(device="cpu")
        assert "per_layer" in tb and "loss" in tb and "other" not in tb
        with pytest.raises(ValueError, match=r"TensorBoardLogger\.declare: metric 'loss' exists"):
            tb.declare("loss")
        with pytest.raises(ValueError, match=r"'v' has 1 labels for 2 values; give one label"):
            tb.declare("v", size=2, labels=["a"])
        with pytest.raises(ValueError, match=r"TensorBoardLogger.log: metric 'per_layer' is a "
                           r"vector of 2 entries; use log_array"):
            tb.log(5, per_layer=1.0)
        with pytest.raises(ValueError, match=r"'m' values must be 1-D \(k,\), got shape \(2, 2\)"):
            tb.log_array(5, "m", np.ones((2, 2)))
        with pytest.raises(ValueError, match=r"metric 'per_layer' was declared with 2 entries, "
                           r"got 3"):
            tb.log_array(5, "per_layer", [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"TensorBoardLogger\.log: the logger for .*tb is closed; "
                       r"create a new TensorBoardLogger"):
        tb.log(6, loss=0.5)
    with pytest.raises(ValueError, match=r"TensorBoardLogger\.log_array: the logger .* is closed"):
        tb.log_array(6, "per_layer", [1.0, 2.0])
    scalars = _scalars(tmp_path / "tb")
    assert scalars["per_layer/0.weight"] == ([3], [1.5])
    assert scalars["per_layer/2.weight"] == ([3], [2.5])
    assert scalars["unlabelled/2"] == ([4], [9.0])
    assert scalars["loss"] == ([4], [0.25])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"TensorBoardLogger: needs the tensorboard package.*"
                       r"pip install curvlab\[tensorboard\]"):
        cl.TensorBoardLogger(tmp_path / "tb2")


# ----------------------------------------------------------------------------- measurements


class GradNorm(Measurement):
    """||grad L|| on the probe's first batch, and the norm of each parameter tensor's part."""

    name = "grad_norm"

    def measure(self, ctx: Context) -> list[Record]:
        x, y = ctx.first_batch
        names, params = zip(*[(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad],
                            strict=True)
        with torch.enable_grad():
            out = cl.batches.pick_output(cl.batches.call_model(ctx.model, x), ctx.output)
            grads = torch.autograd.grad(ctx.loss_fn(out, y), params)
        norms = torch.stack([g.norm() for g in grads])  # (tensors,)
        return [Record(self.name, norms.norm(), description="||grad L|| on the probe"),
                Record(f"{self.name}_tensors", norms, labels=names,
                       description="||grad L|| of each parameter tensor")]


def test_custom_measurement_logs_the_training_gradient(tmp_path):
    model, data = mlp_problem()
    plain = copy.deepcopy(model)
    with cl.RunLogger(tmp_path / "g.h5", {}) as log:
        grads = _train(model, data, log, [GradNorm(every=2), cl.Loss(every=2)])
    run = cl.load_run(tmp_path / "g.h5")
    assert run["grad_norm"].step.tolist() == [0, 2, 4, 6]
    assert list(run["grad_norm_tensors"].labels) == [n for n, _ in model.named_parameters()]
    assert run["grad_norm"].description == "||grad L|| on the probe"
    expected = torch.stack([torch.cat([g.reshape(-1) for g in grads[s]]).norm()
                            for s in (0, 2, 4, 6)])  # the training loop's own gradients
    torch.testing.assert_close(torch.as_tensor(run["grad_norm"].value), expected)
    per_tensor = torch.stack([torch.stack([g.norm() for g in grads[s]]) for s in (0, 2, 4, 6)])
    torch.testing.assert_close(torch.as_tensor(run["grad_norm_tensors"].value), per_tensor)
    assert "time_grad_norm" in run.metrics
    _train(plain, data, MemoryLogger(), [cl.Loss(every=100)])  # training without the measurement
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ----------------------------------------------------------------------------- operators


class DampedHessian(cl.CurvatureOperator):
    """``H + lam I``: the Hessian of the mean loss plus a damping term."""

    def __init__(self, model, loss_fn, data, *, lam, **kwargs):
        self.lam = lam  # before super().__init__, which may build products
        super().__init__(model, loss_fn, data, **kwargs)

    def make_product(self, batch):
        common = {"context": batch.context, "check_loss": batch.check_loss}
        if batch.method == "rev-rev":
            hvp = products.make_hvp_revrev(batch.loss, batch.primals, batch.layout,
                                           reuse=batch.reuse_graph, **common)
        else:
            hvp = products.make_hvp_fwdrev(batch.loss, batch.primals, batch.layout, **common)
        return lambda V: hvp(V) + self.lam * V  # mean over batches: H V + lam V


class JacobianGram(cl.CurvatureOperator):
    """``sum_i J_i^T J_i / N``: the Gauss-Newton matrix with the loss's output Hessian set to I."""

    def make_product(self, batch):
        def unit(f):  # mean_i 0.5 ||f_i||^2, whose Hessian in f is I / n
            return 0.5 * f.pow(2).sum() / f.shape[0]

        factory = (products.make_ggnvp_revrev if batch.method == "rev-rev"
                   else products.make_ggnvp_fwdrev)
        return factory(batch.outputs, unit, batch.primals, batch.layout, context=batch.context,
                       check_loss=batch.check_loss)


@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
@pytest.mark.parametrize("reuse_graph", [True, False])
def test_new_operators_match_dense_references(method, reuse_graph):
    for cls in (DampedHessian, JacobianGram):
        assert len(inspect.getsource(cls).splitlines()) < 30
    case = make_case("multibatch")  # an MLP, float64, batches of 7, 3 and 12 examples
    model, loss_fn, data = case.model, case.loss_fn, case.data
    P = sum(p.numel() for p in model.parameters())
    eye = torch.eye(P, dtype=torch.float64)  # (P, P)
    kwargs = {"method": method, "reuse_graph": reuse_graph}
    A = DampedHessian(model, loss_fn, data, lam=0.3, **kwargs)
    torch.testing.assert_close(A @ eye, dense_hessian(model, loss_fn, data) + 0.3 * eye)
    N = sum(len(x) for x, _ in data)
    gram = sum(J.reshape(-1, P).T @ J.reshape(-1, P)
               for J in (dense_jacobian(model, x) for x, _ in data)) / N  # (P, P)
    B = JacobianGram(model, loss_fn, data, **kwargs)
    torch.testing.assert_close(B @ eye, gram)
    v = torch.randn(P, dtype=torch.float64)
    torch.testing.assert_close(B @ v, gram @ v)  # a vector as well as a block
    assert A.num_matvecs == P and B.num_matvecs == P + 1 and A.method == method
    # params= selects a diagonal block, as for the built-in operators
    C = JacobianGram(model, loss_fn, data, params=["4.weight", "4.bias"], **kwargs)
    block = C @ torch.eye(C.shape[0], dtype=torch.float64)
    torch.testing.assert_close(block, gram[-C.shape[0]:, -C.shape[0]:])


def test_builtin_operators_are_curvature_operators():
    case = make_case("mlp_relu")  # cross-entropy
    for cls, dense in ((cl.HessianOperator, dense_hessian), (cl.GGNOperator, dense_ggn)):
        A = cls(case.model, case.loss_fn, case.data)
        assert isinstance(A, cl.CurvatureOperator)
        torch.testing.assert_close(A @ torch.eye(A.shape[0], dtype=torch.float64),
                                   dense(case.model, case.loss_fn, case.data))
    with pytest.raises(TypeError, match=r"CurvatureOperator: subclass CurvatureOperator and "
                       r"implement make_product\(batch\)"):
        cl.CurvatureOperator(case.model, case.loss_fn, case.data)


def _top(A):
    return torch.linalg.eigvalsh(A)[-1]


def test_ggn_sharpness_matches_dense_ggn(tmp_path):
    model, data = mlp_problem()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": [*model[2].parameters(), *model[4].parameters()]}], lr=0.05)
    measurements = [cl.Sharpness(every=3, matrix="ggn", tol=1e-10),
                    cl.Sharpness(every=3, matrix="ggn", preconditioned="lr", tol=1e-10),
                    cl.Sharpness(every=3, tol=1e-10)]
    assert [m.name for m in measurements] == ["sharpness_ggn", "sharpness_ggn_lr", "sharpness"]
    snapshots = {}
    with cl.RunLogger(tmp_path / "ggn.h5", {}) as log:
        monitor = cl.Monitor(model, mse, data, log, measurements, optimizer=opt)
        monitor.on_train_start()
        snapshots[0] = copy.deepcopy(model)
        for step in range(1, 7):
            opt.zero_grad()
            mse(model(data[0]), data[1]).backward()
            opt.step()
            monitor.on_train_batch_end(step)
            snapshots[step] = copy.deepcopy(model)
        monitor.on_train_end()
    run = cl.load_run(tmp_path / "ggn.h5")
    assert run["sharpness_ggn"].step.tolist() == [0, 3, 6]
    assert run["sharpness_ggn"].description == "top GGN eigenvalue"
    assert run["sharpness_ggn_lr"].threshold == 2 / 0.05  # the base LR's line, as for H
    scales = torch.cat([torch.full((p.numel(),), 2.0 if n.startswith("0.") else 1.0,
                                   dtype=torch.float64) for n, p in model.named_parameters()])
    d = scales.sqrt()  # D^(1/2), (P,)
    for i, step in enumerate([0, 3, 6]):
        G = dense_ggn(snapshots[step], mse, data)  # (P, P)
        H = dense_hessian(snapshots[step], mse, data)
        assert (G - H).abs().max() > 1e-3  # the residual term: G is not H here
        torch.testing.assert_close(torch.tensor(run["sharpness_ggn"].value[i]), _top(G))
        torch.testing.assert_close(torch.tensor(run["sharpness_ggn_lr"].value[i]),
                                   _top(d[:, None] * G * d[None, :]))
        torch.testing.assert_close(torch.tensor(run["sharpness"].value[i]), _top(H))
    with pytest.raises(ValueError, match=r"Sharpness: matrix must be one of \('hessian', 'ggn'\)"
                       r" .*got 'fisher'"):
        cl.Sharpness(every=1, matrix="fisher")


# ----------------------------------------------------------------------------- docs


def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(_doc_blocks())))
def test_docs_examples_run(index, tmp_path, monkeypatch, capsys):
    block = _doc_blocks()[index]
    if "tensorboard" in block:
        pytest.importorskip("tensorboard")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"{DOCS.name} block {index}", "exec"), {"__name__": "extending_docs"})
    printed = capsys.readouterr().out
    assert printed, "every example prints what it shows"
