"""Run files: round trip, live reading, crash safety under SIGKILL, resume, and clear errors."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import h5py
import numpy as np
import pytest

import curvlab as cl
from curvlab.hdf5 import RunLogger

CONFIG = {"width": 64, "depth": 2, "parametrization": "mup", "lr": 0.1, "seed": 0,
          "model": "mlp", "optimizer": "sgd", "extra": {"nested": [1, 2]}}


def test_round_trip_of_every_metric_kind(tmp_path):
    path = tmp_path / "run.h5"
    with RunLogger(path, CONFIG, env={"device": "cpu"}) as log:
        log.declare("sharpness", description="top eigenvalue", threshold=20.0)
        for step in (0, 10, 20):
            log.log(step, loss=1.0 / (step + 1), sharpness=3.0 + step)
            log.log_array(step, "top", [3.0 + step, 2.0, 1.0])
            log.log_array(step, "cos_theta", [0.1 * step, 0.5], labels=["0", "2"],
                          description="per layer")
    run = cl.load_run(path)
    assert run.config == CONFIG
    for key in ("width", "depth", "parametrization", "lr", "seed", "model", "optimizer"):
        assert run.attrs[key] == CONFIG[key]
    assert run.attrs["schema_version"] == 1 and "created" in run.attrs
    assert run.env["device"] == "cpu" and "torch" in run.env
    np.testing.assert_array_equal(run["loss"].step, [0, 10, 20])
    np.testing.assert_array_equal(run["loss"].value, [1.0, 1 / 11, 1 / 21])
    assert run["sharpness"].threshold == 20.0 and run["sharpness"].description == "top eigenvalue"
    assert run["top"].value.shape == (3, 3) and run["top"].labels is None
    assert run["cos_theta"].labels == ("0", "2") and run["cos_theta"].description == "per layer"
    np.testing.assert_array_equal(run["cos_theta"].value[:, 0], [0.0, 1.0, 2.0])
    with h5py.File(path, "r") as f:  # the schema, as a non-curvlab reader sees it
        assert f["metrics/top/value"].maxshape == (None, 3)
        assert f["metrics/loss/step"].dtype == np.int64 and f["metrics/loss/step"].chunks


def _live_writer(path, conn, steps):
    with RunLogger(path, {"width": 8}) as log:
        for step in range(steps):
            log.log(step, loss=float(step))
            log.log_array(step, "eig", [step, -step])
            conn.send(step)
            conn.recv()  # wait until the reader has looked
    conn.send("done")


def test_a_second_process_reads_while_the_first_writes(tmp_path):
    path = tmp_path / "live.h5"
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    writer = ctx.Process(target=_live_writer, args=(path, there, 6))
    writer.start()
    try:
        for step in range(6):
            assert here.recv() == step
            run = cl.load_run(path)  # the writer still holds the file open
            np.testing.assert_array_equal(run["loss"].step, np.arange(step + 1))
            np.testing.assert_array_equal(run["eig"].value[:, 0], np.arange(step + 1))
            here.send("ok")
        assert here.recv() == "done"
    finally:
        writer.join(10)
        writer.kill()


def _crash_writer(path, conn):
    """Log forever; new metrics appear on the way; report each committed step."""
    with RunLogger(path, {"trial": True}) as log:
        conn.send("open")
        step = 0
        while True:
            log.log(step, loss=float(step), time=0.5 * step)
            log.log_array(step, "per_layer", np.full(16, float(step)),
                          labels=list("abcdefghijklmnop"))
            if step in (3, 40, 200):
                log.log(step, **{f"late_{step}": 1.0})
            conn.send(step)
            step += 1


def test_sigkill_at_random_moments_leaves_readable_files(tmp_path):
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    for trial in range(24):
        path = tmp_path / f"crash{trial}.h5"
        here, there = ctx.Pipe(duplex=False)
        writer = ctx.Process(target=_crash_writer, args=(path, there))
        writer.start()
        assert here.recv() == "open"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        committed = -1
        while here.poll():
            committed = here.recv()
        run = cl.load_run(path)
        for name in ("loss", "time", "per_layer"):
            steps = run[name].step
            assert np.all(np.diff(steps) == 1) and (steps.size == 0 or steps[0] == 0), name
            assert steps.size >= committed + 1, (trial, name, steps.size, committed)
            assert not np.isnan(run[name].value).any()
        np.testing.assert_array_equal(run["per_layer"].value, np.repeat(
            run["per_layer"].step[:, None], 16, axis=1).astype(float))
        if trial == 0:  # a killed writer's file resumes without any repair tool
            with RunLogger(path, {"trial": True}, mode="a") as log:
                last = int(run["loss"].step[-1]) if run["loss"].step.size else -1
                log.log(last + 1, loss=-1.0)
            assert cl.load_run(path)["loss"].step[-1] == last + 1


def _killed_on_open(path, restructure):
    """A writer killed the moment its append handle on ``path`` exists (before any other call)."""
    opened = h5py.File

    def file_then_exit(*args, **kwargs):
        f = opened(*args, **kwargs)
        if f.mode == "r+" and os.path.abspath(f.filename) == os.path.abspath(path):
            os._exit(0)  # no close, no flush: as a SIGKILL right after the open
        return f

    if restructure:  # the first reopen: after the swap that adds a new metric
        with RunLogger(path, CONFIG) as log:
            log.log(0, loss=1.0)
            h5py.File = file_then_exit
            log.log(1, new_metric=2.0)
    else:
        h5py.File = file_then_exit
        RunLogger(path, CONFIG)
    os._exit(1)  # not reached when the writer opens through h5py.File


@pytest.mark.parametrize("restructure", [False, True])
def test_a_writer_killed_right_after_opening_leaves_a_readable_file(tmp_path, restructure):
    # The append handle must carry HDF5's SWMR flags from the moment it exists. Opened "r+" and
    # switched to SWMR afterwards, a kill in between left "open for write" without "SWMR", which
    # neither the plain nor the SWMR reader opens (CI caught that window once, at random).
    path = tmp_path / "run.h5"
    writer = multiprocessing.get_context("fork").Process(target=_killed_on_open,
                                                         args=(path, restructure))
    writer.start()
    writer.join()
    assert writer.exitcode == 0
    run = cl.load_run(path)
    assert run.config == CONFIG
    if restructure:  # the committed row survives; the metric just added holds no row yet
        assert run["loss"].step.tolist() == [0] and run["new_metric"].step.size == 0
    else:
        assert not run.metrics


def test_resume_and_refusals(tmp_path):
    path = tmp_path / "run.h5"
    with RunLogger(path, CONFIG) as log:
        log.log(0, loss=1.0)
        log.log(5, loss=0.5)
    with pytest.raises(FileExistsError, match=r"RunLogger: .*run.h5 exists; pass mode='a'"):
        RunLogger(path, CONFIG)
    with pytest.raises(ValueError, match=r"resuming .* with a different config \(keys \['lr'\]"):
        RunLogger(path, {**CONFIG, "lr": 0.2}, mode="a")
    with RunLogger(path, CONFIG, mode="a") as log:
        with pytest.raises(ValueError, match="step 5 of 'loss' does not follow the last committed"):
            log.log(5, loss=0.1)
        log.log(6, loss=0.4)
        with pytest.raises(ValueError, match=r"'loss' holds values of shape \(\), got \(2,\)"):
            log.log_array(7, "loss", [1.0, 2.0])
        with pytest.raises(ValueError, match="metric names must be non-empty strings without"):
            log.log(7, **{"a/b": 1.0})
        with pytest.raises(TypeError, match="step must be an int"):
            log.log(7.0, loss=1.0)
        with pytest.raises(ValueError, match="values must be 1-D"):
            log.log_array(7, "m", np.ones((2, 2)))
        with pytest.raises(ValueError, match="has 3 labels for 2 values"):
            log.declare("x", size=2, labels=["a", "b", "c"])
    assert cl.load_run(path)["loss"].step.tolist() == [0, 5, 6]
    with RunLogger(path, {**CONFIG, "lr": 0.2}, mode="a", allow_config_change=True):
        pass
    assert cl.load_run(path).config["lr"] == 0.2
    with RunLogger(path, CONFIG, mode="w"):
        pass
    assert cl.load_run(path).metrics == {}
    closed = RunLogger(tmp_path / "c.h5", CONFIG)
    closed.close()
    with pytest.raises(ValueError, match=r"the logger for .* is closed"):
        closed.log(0, loss=1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        RunLogger(tmp_path / "d.h5", CONFIG, mode="r")
    with pytest.raises(TypeError, match="config must be JSON-serializable"):
        RunLogger(tmp_path / "e.h5", {"f": object()})
    with pytest.raises(TypeError, match="config must be a dict"):
        RunLogger(tmp_path / "e.h5", [1])


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="load_run: no file at"):
        cl.load_run(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="is not a readable HDF5 file"):
        cl.load_run(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ValueError, match="is an HDF5 file but not a curvlab run"):
        cl.load_run(other)
    good = tmp_path / "good.h5"
    with RunLogger(good, CONFIG) as log:
        log.log(0, loss=1.0)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:600])
    with pytest.raises(ValueError, match="is not a readable HDF5 file"):
        cl.load_run(truncated)
    with RunLogger(tmp_path / "held.h5", CONFIG) as log:  # copied while a SWMR writer holds it
        log.log(0, loss=1.0)
        held = (tmp_path / "held.h5").read_bytes()
    (tmp_path / "held_copy.h5").write_bytes(held)
    assert cl.load_run(tmp_path / "held_copy.h5")["loss"].step.tolist() == [0]
    (tmp_path / "held_cut.h5").write_bytes(held[:2000])  # inside the superblock's end of file
    with pytest.raises(ValueError, match="is not a readable HDF5 file"):
        cl.load_run(tmp_path / "held_cut.h5")
    with pytest.raises(ValueError, match="load_runs: no file matches"):
        cl.load_runs(str(tmp_path / "nothing*.h5"))
    with pytest.raises(ValueError, match="load_runs: no paths given"):
        cl.load_runs([])
    runs = cl.load_runs([good, good])
    assert [r.config["width"] for r in runs] == [64, 64]


def test_cli_inspect(tmp_path, capsys):
    from curvlab.cli import main

    path = tmp_path / "run.h5"
    with RunLogger(path, CONFIG) as log:
        log.declare("sharpness", threshold=20.0)
        log.log(0, sharpness=3.5)
        log.log_array(0, "cos_theta", [0.25, 0.5], labels=["0", "2"])
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "width = 64" in out and "threshold 20" in out
    assert "cos_theta" in out and "[0.25, 0.5]" in out and "last 3.5" in out
    assert main(["inspect", str(tmp_path / "missing.h5")]) == 2
    assert "curvlab inspect: load_run: no file at" in capsys.readouterr().err


def test_only_rank_zero_writes(tmp_path, monkeypatch) -> None:
    """A process launched as rank 1 (torchrun's RANK) checks its calls but creates no file."""
    monkeypatch.setenv("RANK", "1")
    path = tmp_path / "run.h5"
    logger = cl.RunLogger(path, {"lr": 0.1})
    assert not logger.writes
    logger.log(0, loss=1.0)
    logger.log_array(0, "top", [2.0, 1.0])
    assert "loss" in logger and "top" in logger and "other" not in logger
    with pytest.raises(TypeError, match="step must be an int"):
        logger.log(1.5, loss=1.0)
    logger.update_env(device="cpu")
    logger.flush()
    logger.close()
    assert not path.exists() and not list(tmp_path.iterdir())
    with cl.RunLogger(path, {"lr": 0.1}, rank_zero_only=False) as own:  # every rank its own file
        own.log(0, loss=1.0)
    assert cl.load_run(path).metrics["loss"].value.tolist() == [1.0]
