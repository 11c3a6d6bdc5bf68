"""The command line: the sweep's flags come from SweepConfig and the registries, so neither can
drift from the other; the CLI only parses and dispatches; the module layering it relies on."""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
import torch

import curvlab as cl
from curvlab import cli, losses, sweep
from curvlab.sweep import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
FIELDS = [f.name for f in dataclasses.fields(SweepConfig)]


def flags() -> dict[str, argparse.Action]:
    return cli.add_config_flags(argparse.ArgumentParser())


def sweep_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_every_config_field_has_a_flag(capsys):
    actions = flags()
    assert list(actions) == FIELDS
    assert all(a.dest == name for name, a in actions.items())
    expected = {name: "--" + name.replace("_", "-") for name in FIELDS} | {"lrs": "--lr"}
    assert {name: a.option_strings[0] for name, a in actions.items()} == expected
    shown = sweep_help(capsys)
    for flag in [*expected.values(), "--config", "--out", "--resume", "--overwrite", "--quiet",
                 "--jobs", "--plan-only"]:
        assert f"{flag} " in shown, flag


def test_help_names_every_registered_choice_and_the_defaults(capsys):
    actions = flags()
    for field, registry in [("model", sweep.MODELS), ("dataset", sweep.DATASETS),
                            ("parametrizations", sweep.PARAMETRIZATIONS),
                            ("optimizer", sweep.OPTIMIZERS), ("loss", losses.LOSSES),
                            ("dtype", sweep.DTYPES)]:
        assert registry, field
        for name in registry:
            assert name in actions[field].help, (field, name)
    assert "interp:S" in actions["parametrizations"].help
    assert ".npz" in actions["dataset"].help
    assert "(default: 0,1,2)" in actions["seeds"].help  # the field's default, not a copy of it
    assert "(default: 64,128,256,512)" in actions["widths"].help
    assert "(default: auto)" in actions["lrs"].help
    assert "cuda when available" in actions["device"].help  # the CLI picks the device
    shown = " ".join(sweep_help(capsys).split())
    assert "the network: mlp, resnet, convnet or transformer (default: mlp)" in shown


def test_a_registered_model_is_one_entry_and_the_help_follows(monkeypatch, tmp_path, capsys):
    def linear(width, depth, p, d_in, d_out):
        return cl.models.MLP(width, 2, p, d_in=d_in, d_out=d_out)

    monkeypatch.setitem(sweep.MODELS, "two-layer", linear)
    assert "two-layer" in flags()["model"].help
    out = tmp_path / "mine"
    assert cli.main(["sweep", "--model", "two-layer", "--widths", "8,16", "--seeds", "0",
                     "--parametrizations", "mup", "--steps", "2", "--every", "2", "--n", "32",
                     "--probe-size", "16", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    runs = cl.load_runs(str(out / "runs" / "*.h5"))
    assert {r.config["model"] for r in runs} == {"two-layer"}
    assert all(len(r.metrics["loss"].step) == 3 for r in runs)


def test_flags_are_parsed_by_the_field_types():
    parse = cli.parse_value
    assert parse(tuple[int, ...], "64,128 256") == (64, 128, 256)
    assert parse(tuple[float, ...] | str, "auto") == "auto"
    assert parse(tuple[float, ...] | str, "0.1,1e-2") == (0.1, 0.01)
    assert parse(int | None, "32") == 32
    with pytest.raises(ValueError, match="invalid literal for int"):
        parse(tuple[int, ...], "a,b")
    every = ["--model", "resnet", "--widths", "8,16", "--depths", "2,4", "--parametrizations",
             "mup,interp:0.5", "--optimizer", "adam", "--lr", "0.1,0.2", "--steps", "7",
             "--batch-size", "16", "--dataset", "mixture", "--n", "33", "--probe-size", "9",
             "--every", "3", "--seeds", "4", "--device", "cpu", "--base-width", "8", "--sigma",
             "0.5", "--lr-fraction", "0.25", "--dtype", "float64", "--loss", "xent"]
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    cli.add_config_flags(parser)
    cfg = cli.sweep_config(parser.parse_args(every))
    assert cfg == SweepConfig(
        model="resnet", widths=(8, 16), depths=(2, 4), parametrizations=("mup", "interp:0.5"),
        optimizer="adam", lrs=(0.1, 0.2), steps=7, batch_size=16, dataset="mixture", n=33,
        probe_size=9, every=3, seeds=(4,), device="cpu", base_width=8, sigma=0.5,
        lr_fraction=0.25, dtype="float64", loss="xent")
    assert set(every[::2]) == {a.option_strings[0] for a in flags().values()}  # all of them


def test_config_file_values_and_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('widths = "16,32"\nlrs = 0.1\nseeds = 3\nsteps = 5\nmodel = "resnet"\n')
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    cli.add_config_flags(parser)
    cfg = cli.sweep_config(parser.parse_args(["--config", str(path), "--steps", "9"]))
    assert (cfg.widths, cfg.lrs, cfg.seeds, cfg.steps, cfg.model) == ((16, 32), (0.1,), (3,), 9,
                                                                      "resnet")
    path.write_text("colour = 1\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['colour'\]"):
        cli.sweep_config(parser.parse_args(["--config", str(path)]))


def test_bad_flag_values_are_refused_with_the_flag(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert cli.main(["sweep", "--steps", "many", "--out", out, "--quiet"]) == 2
    assert "--steps: invalid literal for int() with base 10: 'many'" in capsys.readouterr().err
    assert cli.main(["sweep", "--lr", "fast", "--out", out, "--quiet"]) == 2
    assert "lrs must be 'auto' or positive numbers, got 'fast'" in capsys.readouterr().err


def test_registries_refuse_unknown_names_with_the_call_and_the_choices():
    cfg = SweepConfig(model="vit")
    with pytest.raises(ValueError, match=r"build_model: unknown model 'vit'; choose from "
                                         r"\('mlp', 'resnet', 'convnet', 'transformer'\)"):
        sweep.build_model(cfg, "mup", 16, 3, 16, 4, 0)
    with pytest.raises(ValueError, match=r"make_dataset: unknown dataset 'imagenet'; choose "
                                         r"from \('teacher', 'mixture', 'digits'\) or .*\.npz"):
        sweep.make_dataset("imagenet", 8)
    with pytest.raises(ValueError, match=r"parametrization: unknown parametrization 'abc'; "
                                         r"choose from \('mup', 'ntp', 'sp', 'depth-mup'\)"):
        sweep.parametrization("abc", 16, 1.0)


def test_demo_is_dispatched_and_trains_the_same_network_as_before(capsys):
    assert cli.main(["demo", "--steps", "6", "--width", "8"]) == 0
    shown = capsys.readouterr().out
    assert "stability threshold 2/lr = 4.0" in shown and len(shown.splitlines()) == 2 + 7
    from curvlab.demo import demo

    with contextlib.redirect_stdout(io.StringIO()):
        history = demo(steps=6, width=8)
    # the set-up of the demo before it moved out of the CLI: curvlab.testing's tanh MLP
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = cl.testing.MLP(8, 16, 2)(x).detach()
    model = cl.testing.MLP(8, 8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(6):
        opt.zero_grad()
        losses.mse(model(x), y).backward()
        opt.step()
    assert history[-1] == pytest.approx(cl.sharpness(model, losses.mse, (x, y), tol=1e-5),
                                        rel=1e-3)


def test_losses_live_in_curvlab_losses():
    assert cl.testing.mse is losses.mse and losses.LOSSES["mse"] is losses.mse
    f, y = torch.randn(5, 3), torch.eye(3)[[0, 1, 2, 0, 1]]
    assert losses.cross_entropy(f, y) == pytest.approx(
        torch.nn.functional.cross_entropy(f, torch.tensor([0, 1, 2, 0, 1])).item())


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_production_module_imports_the_testing_helpers():
    package = ROOT / "curvlab"
    for path in package.rglob("*.py"):
        if path.name in ("testing.py", "__init__.py") and path.parent == package:
            continue  # testing itself; __init__ exposes it as the cl.testing namespace
        assert "curvlab.testing" not in _imports(path), path.relative_to(ROOT)


def test_sweep_does_not_import_fanout_or_the_cli():
    """The layers: cli > fanout > sweep > analysis, plotting > ... > losses."""
    package = ROOT / "curvlab"
    assert not {"curvlab.fanout", "curvlab.cli", "curvlab.demo"} & _imports(package / "sweep.py")
    assert "curvlab.cli" not in _imports(package / "fanout.py")
    assert {n for n in _imports(package / "losses.py") if n.startswith("curvlab")} == set()
