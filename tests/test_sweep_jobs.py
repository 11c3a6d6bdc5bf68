"""Fanning a sweep out (curvlab.fanout): `sweep --jobs N`, `sweep --plan-only` + `curvlab run` +
`sweep --resume` give the same run files and report as the sequential sweep; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from curvlab.cli import main
from curvlab.runs import load_run

TINY = ["--widths", "16,32", "--seeds", "0", "--parametrizations", "mup,ntp", "--steps", "20",
        "--every", "5", "--n", "64", "--probe-size", "32", "--dtype", "float64", "--quiet",
        "--device", "cpu"]
RUNS = 4  # 2 parametrizations x 2 widths x 1 seed


def assert_same_runs(a: Path, b: Path) -> None:
    """The same run files in ``a/runs`` and ``b/runs``: configs and every metric (rtol 1e-12)
    but the wall-clock timings ``time_*``."""
    names = sorted(p.name for p in (a / "runs").glob("*.h5"))
    assert len(names) == RUNS and names == sorted(p.name for p in (b / "runs").glob("*.h5"))
    for name in names:
        ra, rb = load_run(a / "runs" / name), load_run(b / "runs" / name)
        assert ra.config == rb.config and ra.config["dtype"] == "float64"
        assert ra.env["dtype"] == "torch.float64"
        assert sorted(ra.metrics) == sorted(rb.metrics) and "sharpness_lr" in ra.metrics
        for key, ma in ra.metrics.items():
            if key.startswith("time_"):
                continue
            mb = rb.metrics[key]
            assert ma.step.tolist() == mb.step.tolist(), (name, key)
            np.testing.assert_allclose(ma.value, mb.value, rtol=1e-12, atol=0,
                                       err_msg=f"{name} {key}")
            assert ma.threshold == mb.threshold


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here (the --jobs 2 workers get cpu_count // 2): tiny models run several
    times faster on a busy 2-core machine, where two threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seq") / "sweep"
    assert main(["sweep", "--out", str(out), *TINY]) == 0
    return out


def same_figure(a, b) -> None:
    """The two PNG figures have the same pixels."""
    import matplotlib.image

    np.testing.assert_array_equal(matplotlib.image.imread(a), matplotlib.image.imread(b))


def test_jobs_gives_the_sequential_runs(sequential, tmp_path, capsys):
    out = tmp_path / "jobs"
    assert main(["sweep", "--out", str(out), "--jobs", "2", *TINY]) == 0
    capsys.readouterr()
    assert_same_runs(sequential, out)
    assert (out / "report.md").read_text() == (sequential / "report.md").read_text()
    for name in ("overlay.png", "loss.png"):
        same_figure(out / name, sequential / name)


def test_plan_run_resume_gives_the_sequential_runs(sequential, tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["sweep", "--out", str(out), "--plan-only", *TINY]) == 0
    printed = capsys.readouterr().out
    plan = out / "plan"
    commands = (plan / "commands.txt").read_text().splitlines()
    assert len(commands) == RUNS and "sbatch --array=1-4" in printed
    assert "SLURM_ARRAY_TASK_ID" in printed and "--resume" in printed
    assert not list((out / "runs").glob("*.h5"))  # nothing trained
    assert all(line.startswith("curvlab run /") for line in commands)  # absolute paths
    configs = [line.split(" ", 2)[2] for line in commands]
    first = json.loads(Path(configs[0]).read_text())
    assert first["sweep"]["dtype"] == "float64" and first["output"].startswith("../runs/")
    assert set(first["run"]) == {"parametrization", "width", "depth", "lr", "seed"}
    # a cut-short file (a killed run) is trained again from the start
    (out / "runs" / (Path(configs[0]).stem + ".h5")).write_bytes(b"\x89HDF\r\n\x1a\n cut")
    for config in configs[:-1]:
        assert main(["run", config, "--quiet"]) == 0
    assert f"wrote {out / 'runs' / Path(configs[0]).stem}.h5" in capsys.readouterr().out
    # planning again with --resume lists only the run still to train
    assert main(["sweep", "--out", str(out), "--plan-only", "--resume", *TINY]) == 0
    assert "sbatch --array=1-1 " in capsys.readouterr().out
    assert (plan / "commands.txt").read_text().splitlines() == commands[-1:]
    assert main(["run", configs[-1], "--quiet"]) == 0
    # a finished run is refused unless --overwrite
    assert main(["run", configs[0], "--quiet"]) == 2
    assert "is a finished run; pass --overwrite" in capsys.readouterr().err
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert main(["sweep", "--config", str(plan / "sweep_config.json"), "--out", str(out),
                 "--resume", "--quiet"]) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert_same_runs(sequential, out)
    assert (out / "report.md").read_text() == (sequential / "report.md").read_text()
    same_figure(out / "overlay.png", sequential / "overlay.png")


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path, capsys):
    out, small = tmp_path / "fail", [*TINY, "--parametrizations", "mup", "--steps", "4"]
    assert main(["sweep", "--out", str(out), "--plan-only", *small]) == 0
    capsys.readouterr()
    bad = Path((out / "plan" / "commands.txt").read_text().splitlines()[1].split(" ", 2)[2])
    (out / "runs" / (bad.stem + ".h5")).mkdir()  # a folder where the run file goes: it fails
    assert main(["sweep", "--out", str(out), "--resume", "--jobs", "2", *small]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 runs failed" in err and f"{bad.stem}.h5: IsADirectoryError" in err
    assert "the other 1 finished" in err and "--resume" in err
    files = list((out / "runs").glob("*.h5"))
    assert len(files) == 2 and sum(p.is_file() for p in files) == 1


def test_errors(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["sweep", "--out", out, "--jobs", "0", *TINY]) == 2
    assert "--jobs is how many runs train at once and must be 1 or more, got 0" in \
        capsys.readouterr().err
    assert main(["sweep", "--out", out, "--plan-only", "--jobs", "2", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--plan-only writes the plan and trains nothing" in err and "--jobs 2" in err
    from curvlab.sweep import SweepConfig, run_sweep

    with pytest.raises(ValueError, match=r"jobs \(how many runs train at once\) must be a "
                                         r"positive integer, got 0; use 1"):
        run_sweep(SweepConfig(), tmp_path / "x", jobs=0, progress=False)
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'float64'\), got "
                                         "'float16'"):
        run_sweep(SweepConfig(dtype="float16"), tmp_path / "x", progress=False)
    # curvlab run: a missing, malformed or incomplete config
    assert main(["run", str(tmp_path / "missing.json")]) == 2
    assert "no config file at" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not valid JSON" in err and "curvlab sweep --plan-only" in err
    bad.write_text(json.dumps({"sweep": {}, "run": {"width": 16}, "output": "x.h5"}))
    assert main(["run", str(bad)]) == 2
    assert "lacks ['run.parametrization', 'run.depth', 'run.lr', 'run.seed']" in \
        capsys.readouterr().err
    bad.write_text(json.dumps({"sweep": {"colour": 1}, "run": dict.fromkeys(
        ("parametrization", "width", "depth", "lr", "seed"), 1), "output": "x.h5"}))
    assert main(["run", str(bad)]) == 2
    assert "unknown config keys ['colour']" in capsys.readouterr().err
    from curvlab.fanout import run_config

    with pytest.raises(FileNotFoundError, match=r"run_config: no config file at .*expected a run "
                                                "config"):
        run_config(tmp_path / "missing.json")
