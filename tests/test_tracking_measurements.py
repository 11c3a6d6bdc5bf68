"""Tracking mode of Sharpness and HessianSpectrum: warm blocks, a probe subset, products logged."""

from __future__ import annotations

import copy

import pytest
import torch

import curvlab as cl
from curvlab.callbacks import Context
from curvlab.testing import MLP, dense_hessian, mse


def _problem(seed: int = 0, n: int = 48):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = MLP(4, 12, 2).double()
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return model, (x, y)


def _context(model, probe, step: int = 0) -> Context:
    return Context(model, mse, probe, None, step, torch.Generator().manual_seed(step))


def test_tracked_sharpness_is_within_the_tracking_tolerance_of_dense(tmp_path) -> None:
    """30 GD steps measured every 3: each value within the default 1e-3 of eigvalsh of the dense
    Hessian at that step, products logged per measurement, later ones from the warm block."""
    model, data = _problem()
    sharp = cl.Sharpness(every=3)
    assert sharp.tol == 1e-3 and sharp.warm_vectors == 4
    logger = cl.RunLogger(tmp_path / "run.h5", {}, mode="w")
    monitor = cl.Monitor(model, mse, data, logger, [sharp])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = {0: copy.deepcopy(model)}
    monitor.on_train_start()
    for step in range(1, 31):
        opt.zero_grad()
        mse(model(data[0]), data[1]).backward()
        opt.step()
        if step % 3 == 0:
            snapshots[step] = copy.deepcopy(model)
        monitor.on_train_batch_end(step)
    monitor.on_train_end()
    logger.close()
    run = cl.load_run(tmp_path / "run.h5")
    steps = run["sharpness"].step.tolist()
    assert steps == sorted(snapshots)
    for i, step in enumerate(steps):
        ref = float(torch.linalg.eigvalsh(dense_hessian(snapshots[step], mse, data))[-1])
        assert abs(float(run["sharpness"].value[i]) - ref) <= 1e-3 * ref, step
    matvecs = run["sharpness_matvecs"].value.tolist()
    assert matvecs == sharp.num_matvecs and len(matvecs) == len(steps)
    assert sum(matvecs[1:]) / len(matvecs[1:]) < matvecs[0]  # warm blocks after the first


def test_warm_start_false_and_wider_warm_blocks() -> None:
    model, data = _problem()
    ref = float(torch.linalg.eigvalsh(dense_hessian(model, mse, data))[-1])
    for kwargs in ({"warm_start": False}, {"warm_vectors": 4}, {"k": 2, "warm_vectors": 2}):
        sharp = cl.Sharpness(every=1, **kwargs)
        for step in (0, 1):
            records = sharp.measure(_context(model, data, step))
            top = records[0].value if sharp.k == 1 else records[0].value[0]
            assert abs(float(top) - ref) <= 1e-3 * ref, kwargs
        assert sharp.warm_block.shape[1] == sharp.warm_vectors


def test_warm_block_saves_and_restores_the_tracking_state() -> None:
    """A fresh Sharpness given another's warm_block measures exactly as that one would: same
    products, same value (a resumed run keeps its warm start)."""
    model, data = _problem()
    first = cl.Sharpness(every=1)
    assert first.warm_block is None
    first.measure(_context(model, data, 0))
    saved = first.warm_block.clone()
    resumed = cl.Sharpness(every=1)
    resumed.warm_block = saved
    a, b = first.measure(_context(model, data, 1)), resumed.measure(_context(model, data, 1))
    assert first.num_matvecs[-1] == resumed.num_matvecs[-1] < first.num_matvecs[0]
    torch.testing.assert_close(float(a[0].value), float(b[0].value), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Sharpness.warm_block: expected None or a tensor "
                                         r"\(P, j\) of start vectors, got Tensor \(5,\)"):
        resumed.warm_block = torch.ones(5)


@pytest.mark.parametrize("split", [False, True])
def test_probe_size_measures_the_first_examples(split: bool) -> None:
    """``probe_size=20`` on one batch of 48, or on batches of 16 (the third cut to 4): the
    Hessian of the first 20 examples (the loss is the size-weighted mean over the batches)."""
    model, (x, y) = _problem()
    probe = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)] if split else (x, y)
    expected = float(torch.linalg.eigvalsh(dense_hessian(model, mse, (x[:20], y[:20])))[-1])
    sharp = cl.Sharpness(every=1, probe_size=20, tol=1e-10)
    value = float(sharp.measure(_context(model, probe))[0].value)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=0)
    spectrum = cl.HessianSpectrum(every=1, k=2, probe_size=20, density=False, tol=1e-10)
    records = {r.name: r for r in spectrum.measure(_context(model, probe))}
    dense = torch.linalg.eigvalsh(dense_hessian(model, mse, (x[:20], y[:20]))).flip(0)[:2]
    torch.testing.assert_close(torch.as_tensor(records["hessian_top"].value), dense,
                               rtol=1e-9, atol=0)
    assert records["hessian_matvecs"].value == spectrum.num_matvecs[0]


def test_tracking_errors() -> None:
    with pytest.raises(ValueError, match=r"Sharpness: warm_vectors must be an int >= k = 2"):
        cl.Sharpness(every=1, k=2, warm_vectors=1)
    with pytest.raises(ValueError, match="HessianSpectrum: probe_size must be a positive int or "
                                         "None, got 0"):
        cl.HessianSpectrum(every=1, probe_size=0)
    model, data = _problem(n=8)
    with pytest.raises(ValueError, match="Sharpness: probe_size=20 but the probe holds 8 "
                                         "examples; pass a smaller probe_size"):
        cl.Sharpness(every=1, probe_size=20).measure(_context(model, data))
