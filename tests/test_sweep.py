"""The sweep command end to end on a tiny configuration, its refusals, plot and report."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import curvlab as cl
from curvlab import sweep
from curvlab.cli import main
from curvlab.sweep import SweepConfig, make_dataset, run_sweep

TINY = ["--widths", "16,32", "--seeds", "0", "--steps", "6", "--every", "3", "--n", "64",
        "--probe-size", "32", "--quiet", "--device", "cpu"]


def test_sweep_writes_runs_figures_and_report(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), *TINY]) == 0
    report = capsys.readouterr().out
    assert "super consistency of 'sharpness_lr'" in report and "| mup | 16 |" in report
    runs = cl.load_runs(str(out / "runs" / "*.h5"))
    assert sorted((r.config["parametrization"], r.config["width"]) for r in runs) == [
        ("mup", 16), ("mup", 32), ("ntp", 16), ("ntp", 32)]
    for r in runs:
        assert r["loss"].step.tolist() == list(range(7))
        assert r["sharpness_lr"].step.tolist() == [0, 3, 6]
        assert r["sharpness_lr"].threshold == pytest.approx(2 / r.config["lr"])
    lrs = {p: {r.config["lr"] for r in runs if r.config["parametrization"] == p}
           for p in ("mup", "ntp")}
    assert all(len(v) == 1 for v in lrs.values())  # one auto LR per parametrization
    for name in ("overlay.png", "loss.png", "report.md", "sweep.json"):
        assert (out / name).stat().st_size > 0
    # the output folder is never clobbered
    assert main(["sweep", "--out", str(out), *TINY]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert main(["sweep", "--out", str(out), "--resume", *TINY]) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert main(["report", str(out / "runs" / "*.h5")]) == 0
    assert "Sharpness against the edge of stability" in capsys.readouterr().out
    assert main(["plot", str(out / "runs" / "*.h5"), "-o", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 0


def test_lr_sweep_and_config_file(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('parametrizations = ["mup", "sp"]\nlrs = [0.01, 0.1]\nwidths = [16, 32]\n')
    out = tmp_path / "lr"
    assert main(["sweep", "--config", str(cfg), "--out", str(out), "--steps", "4", "--seeds",
                 "0", "--every", "2", "--n", "32", "--probe-size", "16", "--quiet"]) == 0
    assert "LR sweep report" in capsys.readouterr().out
    assert (out / "lr_sweep.png").stat().st_size > 0
    assert len(list((out / "runs").glob("*.h5"))) == 8


def test_interpolated_and_depth_mup_are_selectable(tmp_path, capsys):
    """``interp:S`` is cl.interpolated(S) with its own per-layer LRs; ``depth-mup`` is relative
    to the smallest depth of the sweep."""
    out = tmp_path / "interp"
    assert main(["sweep", "--out", str(out), "--parametrizations", "interp:0.5,depth-mup",
                 "--model", "resnet", "--depths", "2,8", "--lr", "0.05", *TINY]) == 0
    runs = cl.load_runs(str(out / "runs" / "*.h5"))
    assert sorted({r.config["parametrization"] for r in runs}) == ["depth-mup", "interp:0.5"]
    assert sorted(p.name for p in (out / "runs").iterdir())[0].startswith("depth-mup_w16_d2")
    assert any(p.name.startswith("interp-0.5_w32_d8") for p in (out / "runs").iterdir())
    p = sweep.parametrization("interp:0.5", 16, 1.0)
    assert isinstance(p, cl.models.Interpolated) and p.s == 0.5
    deep = sweep.parametrization("depth-mup", 16, 1.0, base_depth=2)
    assert deep.branch_scale(8) == pytest.approx(0.5)  # (8 / 2)^(-1/2)


def test_cross_entropy_on_digits(tmp_path):
    """``--loss xent``: the logged loss is the cross-entropy of the model the run trains."""
    out = tmp_path / "xent"
    assert main(["sweep", "--out", str(out), "--dataset", "digits", "--loss", "xent",
                 "--parametrizations", "mup", "--lr", "0.1", *TINY]) == 0
    run = cl.load_run(sorted((out / "runs").glob("*w16*.h5"))[0])
    assert run.config["loss"] == "xent"
    cfg = SweepConfig(dataset="digits", loss="xent", n=64, widths=(16, 32), seeds=(0,))
    x, y = sweep.load_data(cfg)
    model = sweep.build_model(cfg, "mup", 16, 3, x.shape[1], y.shape[1], 0)
    x, y = x[:32], y[:32]  # the probe (--probe-size 32)
    want = torch.nn.functional.cross_entropy(model(x), y.argmax(1)).item()
    assert run["loss"].value[0] == pytest.approx(want, rel=1e-5)


def test_a_run_whose_parameters_blow_up_is_marked_diverged_and_the_sweep_goes_on(tmp_path):
    """A step can leave a network whose loss overflows behind a finite training loss; the run
    stops there, marked diverged, instead of its next measurement raising (the curvature of an
    infinite loss) and ending the sweep."""
    out = tmp_path / "blow"
    assert main(["sweep", "--out", str(out), "--lr", "1e30", "--parametrizations", "sp",
                 *TINY, "--every", "1"]) == 0
    runs = cl.load_runs(str(out / "runs" / "*.h5"))
    assert len(runs) == 2
    for r in runs:
        assert r["diverged"].step.tolist() == [1]
        assert r["sharpness_lr"].step.tolist() == [0]  # measured at init only


def test_a_run_spec_names_its_run_file_and_train_one_trains_it(tmp_path):
    """The file names of the runs (resume and the plans find runs by them) are unchanged by
    RunSpec: ``<par>_w<width>_d<depth>_lr<lr:.4g>_s<seed>.h5``, ``interp:S`` as ``interp-S``."""
    spec = sweep.RunSpec("interp:0.5", 16, 2, 0.028712345, 1)
    assert spec.name == "interp-0.5_w16_d2_lr0.02871_s1.h5"
    assert sweep.run_path(tmp_path, spec) == tmp_path / "runs" / spec.name
    cfg = SweepConfig(model="resnet", widths=(16,), depths=(2,), seeds=(1,), steps=3, every=3,
                      n=32, probe_size=16)
    path = tmp_path / spec.name
    sweep.train_one(cfg, spec, path)  # loads the data itself
    run = cl.load_run(path)
    assert (run.config["parametrization"], run.config["width"], run.config["depth"],
            run.config["lr"], run.config["seed"]) == dataclasses.astuple(spec)
    assert run["loss"].step.tolist() == [0, 1, 2, 3] and sweep.finished(path, 3)


def test_npz_dataset(tmp_path):
    x, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    xt, yt = make_dataset(str(tmp_path / "d.npz"), 10)
    assert xt.shape == (10, 3) and yt.shape == (10, 3)


def test_errors(tmp_path, capsys):
    cases = [({"model": "vit"}, "unknown model 'vit'"),
             ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
             ({"parametrizations": ("mup", "abc")}, r"unknown parametrizations \['abc'\]"),
             ({"parametrizations": ("interp:1.5",)},
              r"unknown parametrizations \['interp:1\.5'\].*e\.g\. 'interp:0\.5'"),
             ({"parametrizations": ("interp:x",)}, r"unknown parametrizations \['interp:x'\]"),
             ({"loss": "hinge"}, r"loss must be one of \('mse', 'xent'\), got 'hinge'"),
             ({"widths": (64, 0)}, r"widths must be positive integers, got \[64, 0\]"),
             ({"widths": (64, 128), "base_width": 128},
              "base width 128 is larger than the smallest width 64"),
             ({"optimizer": "rmsprop"}, "optimizer must be 'sgd' or 'adam'"),
             ({"lrs": (0.1, -1.0)}, "lrs must be 'auto' or positive numbers")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            run_sweep(SweepConfig(**kwargs), tmp_path / "x", progress=False)
    assert main(["sweep", "--widths", "a,b", "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "invalid literal for int()" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"dataset file .* does not exist"):
        make_dataset(str(tmp_path / "missing.npz"), 4)
    assert main(["report", str(tmp_path / "none*.h5")]) == 2
    assert "no file matches" in capsys.readouterr().err


@pytest.mark.slow  # 80 s: the full main job (32 runs); CI runs it in its slow step
def test_default_job_shows_super_consistency(tmp_path, capsys):
    """The README's main job: muP's sharpness trajectories coincide across widths 64-512 and rise
    to 2/eta; NTP's sharpen less as width grows (Noci et al. 2024, arXiv:2402.17457)."""
    out = tmp_path / "main"
    assert main(["sweep", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    runs = cl.load_runs(str(out / "runs" / "*.h5"))
    assert {r.config["width"] for r in runs} == {64, 128, 256, 512}
    sc = cl.super_consistency(runs, metric="sharpness_lr")
    assert 3 * sc.mean_gap("mup") <= sc.mean_gap("ntp"), sc.table()
    for r in runs:
        m = r["sharpness_lr"]
        ratio = float(np.mean(m.value[-5:])) / m.threshold
        if r.config["parametrization"] == "mup":
            assert 0.9 <= ratio <= 1.1, (r.config, ratio)  # at the edge of stability
    assert (out / "overlay.png").stat().st_size > 10_000


@pytest.mark.slow  # 90 s: 36 runs up to width 1024; CI runs it in its slow step
def test_lr_transfer_mup_keeps_its_optimum_sp_does_not(tmp_path, capsys):
    """The best GD learning rate (final loss after 100 steps) on a factor-2 grid: under muP it
    moves by at most one grid step from width 64 to 1024; under SP it moves further."""
    grid = [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4]
    out = tmp_path / "lr"
    assert main(["sweep", "--out", str(out), "--parametrizations", "mup,sp", "--lr",
                 ",".join(map(str, grid)), "--widths", "64,256,1024", "--steps", "100",
                 "--seeds", "0", "--every", "100", "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    best: dict[str, dict[int, tuple[float, float]]] = {"mup": {}, "sp": {}}
    for r in cl.load_runs(str(out / "runs" / "*.h5")):
        loss = r["loss"].value
        final = float(np.mean(loss[-10:])) if "diverged" not in r.metrics else np.inf
        p, w = r.config["parametrization"], r.config["width"]
        if w not in best[p] or final < best[p][w][1]:
            best[p][w] = (r.config["lr"], final)
    steps = {p: [grid.index(b[w][0]) for w in (64, 256, 1024)] for p, b in best.items()}
    assert max(steps["mup"]) - min(steps["mup"]) <= 1, steps
    assert max(steps["sp"]) - min(steps["sp"]) >= 2, steps
    assert (out / "lr_sweep.png").stat().st_size > 10_000


@pytest.mark.parametrize("model", ["resnet", "convnet", "transformer"])
def test_every_reference_model_sweeps(tmp_path, capsys, model):
    out = tmp_path / model
    assert main(["sweep", "--model", model, "--depths", "2", "--out", str(out), *TINY]) == 0
    runs = cl.load_runs(str(out / "runs" / "*.h5"))
    assert len(runs) == 4 and all(r.config["model"] == model for r in runs)
    assert all(r["ntk_top"].value.shape[0] == 3 for r in runs)


def test_convnet_needs_square_inputs(tmp_path):
    x, y = np.zeros((8, 6)), np.zeros((8, 2))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(ValueError, match="model 'convnet' needs square images; inputs have 6"):
        run_sweep(SweepConfig(model="convnet", dataset=str(tmp_path / "d.npz"), widths=(8,),
                              seeds=(0,), steps=1), tmp_path / "o", progress=False)


def test_auto_lr_with_adam_uses_the_adam_preconditioned_sharpness_and_38_over_eta():
    """By hand: after a first step at LR 0, Adam's next-step preconditioner is
    P = (1 - beta1^2) (sqrt(g^2 (1 - beta2) / (1 - beta2^2)) + eps), from the first gradient g."""
    from curvlab.sweep import auto_lr, build_model, load_data, parametrization

    cfg = SweepConfig(widths=(16, 32), optimizer="adam", n=64, steps=2, dtype="float64")
    x, y = load_data(cfg)
    lr = auto_lr(cfg, "mup", cfg.depths[0], x, y)
    model = build_model(cfg, "mup", cfg.base, cfg.depths[0], x.shape[1], y.shape[1],
                        cfg.seeds[0])
    opt = parametrization("mup", cfg.base, cfg.sigma).optimizer(model, "adam", 1.0)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(cl.testing.mse(model(x), y), params)
    group_lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    b1, b2, eps = 0.9, 0.999, 1e-8
    d = torch.cat([(group_lr[id(p)] / ((1 - b1 ** 2) * ((g ** 2 * (1 - b2) / (1 - b2 ** 2)).sqrt()
                                                        + eps))).reshape(-1)
                   for p, g in zip(params, grads, strict=True)])
    H = cl.testing.dense_hessian(model, cl.testing.mse, (x, y))
    lam = torch.linalg.eigvalsh(d.sqrt()[:, None] * H * d.sqrt()[None, :])[-1]
    assert lr == pytest.approx(cfg.lr_fraction * 38 / float(lam), rel=1e-3)
