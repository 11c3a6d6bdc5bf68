"""Command-line front end: parses the arguments and calls the function that does the work.

- ``curvlab sweep [flags] [--config FILE]``: the main job, :func:`curvlab.sweep.run_sweep` then
  :func:`curvlab.fanout.write_report`: one HDF5 run per configuration in ``OUT/runs``, the
  overlay figure ``OUT/overlay.png`` and ``OUT/report.md``. ``--jobs N`` trains N runs at once;
  ``--plan-only`` writes one run config per run to ``OUT/plan`` and trains nothing
  (:func:`curvlab.fanout.plan_sweep`, docs/cluster.md).
- ``curvlab run CONFIG``: train the one run a planned run config describes
  (:func:`curvlab.fanout.run_config`).
- ``curvlab plot RUNS... -o FIG [--metric M]`` (:func:`curvlab.plot_overlay`), ``curvlab report
  RUNS...`` (:func:`curvlab.sweep_report`), ``curvlab inspect RUN``
  (:func:`curvlab.analysis.run_summary`), ``curvlab demo`` (:func:`curvlab.demo.demo`) and
  ``curvlab bench hvp | eigs`` (the benchmark scripts of a source checkout).

The flags of ``curvlab sweep`` are generated from the fields of
:class:`~curvlab.sweep.SweepConfig` (:func:`add_config_flags`): field ``name`` is the flag
``--name`` with ``_`` written ``-`` (``lrs`` is ``--lr``), its value is parsed by the field's
type (a comma-separated list for a tuple field) and its help is the field's metadata, its default
and, for the model, data set, parametrizations, optimizer, dtype and loss, the names of their
registries. Flags override the values of ``--config`` (a JSON or TOML file of SweepConfig fields).

Example:
    $ curvlab sweep --out runs/sweep
    $ curvlab report runs/sweep/runs/*.h5
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from curvlab.pool import RunsFailed
from curvlab.sweep import SweepConfig, config_from_dict

CLI_DEFAULTS = {"device": "cuda when available, else cpu"}  # where the CLI differs from the field
BENCHMARKS = {"hvp": "compare_hvp.py", "eigs": "compare_eigs.py"}


def _flag(field: dataclasses.Field) -> str:
    return "--" + (field.metadata.get("flag") or field.name).replace("_", "-")


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _tuple_item(hint: Any) -> Any:
    """The item type of ``tuple[T, ...]`` or of a union's tuple member; ``None`` for others."""
    for a in (hint, *typing.get_args(hint)):
        if typing.get_origin(a) is tuple:
            return typing.get_args(a)[0]
    return None


def field_help(field: dataclasses.Field) -> str:
    """The help of a SweepConfig field's flag: its metadata ``help``, the names it takes (its
    ``choices``, a registry, and ``also``), how a list is written, and its default."""
    meta, hint = field.metadata, typing.get_type_hints(SweepConfig)[field.name]
    text = meta.get("help", "")
    names = [*(meta.get("choices") or ()), *([meta["also"]] if meta.get("also") else [])]
    if names:
        text += ": " + ", ".join(names[:-1]) + (" or " if len(names) > 1 else "") + names[-1]
    if _tuple_item(hint) is not None:
        text += "; comma-separated"
    if field.name in CLI_DEFAULTS or field.default is not None:
        text += f" (default: {CLI_DEFAULTS.get(field.name) or _shown(field.default)})"
    return text.replace("%", "%%")  # argparse formats help strings with %


def parse_value(hint: Any, text: str) -> Any:
    """``text`` as a value of type ``hint``: ``int``, ``float``, ``str``, ``tuple[T, ...]`` (items
    separated by commas or spaces) or a union (its members tried in order, ``None`` skipped)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return tuple(parse_value(args[0], item) for item in text.replace(",", " ").split())
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        for member in members[:-1]:
            try:
                return parse_value(member, text)
            except ValueError:
                pass
        return parse_value(members[-1], text)
    return hint(text)


def add_config_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Add one flag per :class:`~curvlab.sweep.SweepConfig` field to ``parser`` (see the module
    docstring); return the actions by field name. The flags keep their text: values are parsed
    by :func:`sweep_config`, together with those of ``--config``."""
    return {f.name: parser.add_argument(_flag(f), dest=f.name, help=field_help(f),
                                        metavar=_flag(f)[2:].replace("-", "_").upper())
            for f in dataclasses.fields(SweepConfig)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """A config value as its field's type: text parsed, a scalar of a tuple field one-tuple."""
    hints = typing.get_type_hints(SweepConfig)
    if name not in hints:
        return value  # refused with the other unknown keys by config_from_dict
    hint = hints[name]
    if isinstance(value, str):
        try:
            return parse_value(hint, value)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
    item = _tuple_item(hint)
    if item is not None and isinstance(value, int | float) and not isinstance(value, bool):
        return (item(value),)
    return value


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    """A :class:`~curvlab.sweep.SweepConfig` from a JSON/TOML file and the flags (flags win)."""
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if path.suffix == ".toml":
            import tomllib

            values = tomllib.loads(path.read_text())
        else:
            values = json.loads(path.read_text())
        values = {k: _coerce(k, v, f"--config {path}: {k}") for k, v in values.items()}
    for f in dataclasses.fields(SweepConfig):
        if getattr(args, f.name) is not None:
            values[f.name] = _coerce(f.name, getattr(args, f.name), _flag(f))
    if values.get("device") is None:
        values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return config_from_dict(values)


def sweep(args: argparse.Namespace) -> str:
    """``curvlab sweep``: plan it (``--plan-only``), or run it and write its figures and report;
    return what to print."""
    from curvlab.fanout import plan_sweep, write_report
    from curvlab.sweep import run_sweep

    cfg, out = sweep_config(args), Path(args.out)
    if args.plan_only:
        if args.jobs is not None:
            raise ValueError(f"--plan-only writes the plan and trains nothing, so it takes no "
                             f"--jobs (got --jobs {args.jobs}); drop --jobs, or drop --plan-only "
                             "to train here")
        return plan_sweep(cfg, out, resume=args.resume, overwrite=args.overwrite)
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs is how many runs train at once and must be 1 or more, got "
                         f"{args.jobs}; use --jobs 1 (the default) to train one run at a time")
    paths = run_sweep(cfg, out, resume=args.resume, overwrite=args.overwrite,
                      progress=not args.quiet, jobs=1 if args.jobs is None else args.jobs)
    return write_report(cfg, out, paths)


def bench(which: str, options: list[str]) -> None:
    """Run ``benchmarks/<BENCHMARKS[which]>`` of the source checkout with ``options``."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    script = folder / BENCHMARKS[which]
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: the benchmarks live in the repository, "
                                "not in the installed package; clone it and `pip install -e .`")
    sys.path.insert(0, str(folder))  # the scripts import their neighbours (harness.py, ...)
    try:
        spec = importlib.util.spec_from_file_location(f"_curvlab_bench_{which}", script)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        module.main(options)
    finally:
        sys.path.remove(str(folder))


def build_parser() -> argparse.ArgumentParser:
    """The ``curvlab`` parser and its subcommands."""
    parser = argparse.ArgumentParser(prog="curvlab", description="curvlab: curvature and "
                                     "feature-learning diagnostics for PyTorch; width sweeps, "
                                     "their runs, figures and reports. `curvlab COMMAND --help` "
                                     "lists a command's flags.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train a small MLP and print its sharpness")
    p_demo.add_argument("--steps", type=int, default=300)
    p_demo.add_argument("--lr", type=float, default=0.5)
    p_demo.add_argument("--width", type=int, default=64)
    p_demo.add_argument("--seed", type=int, default=0)
    p_sweep = sub.add_parser("sweep", help="train across widths, log, plot and report")
    p_sweep.add_argument("--config", help="JSON or TOML file with SweepConfig fields; the flags "
                         "below override its values")
    add_config_flags(p_sweep)
    p_sweep.add_argument("--out", default="runs/sweep", help="output folder")
    p_sweep.add_argument("--resume", action="store_true", help="skip finished runs")
    p_sweep.add_argument("--overwrite", action="store_true", help="redo runs in --out")
    p_sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    p_sweep.add_argument("--jobs", type=int, help="train N runs at once, in N processes (with "
                         "CUDA, worker i on GPU i mod the GPU count; default 1)")
    p_sweep.add_argument("--plan-only", action="store_true", help="write OUT/plan (one run "
                         "config per run, commands.txt) and train nothing; see docs/cluster.md")
    p_run = sub.add_parser("run", help="train one run from a config of `sweep --plan-only`")
    p_run.add_argument("config", help="a run config (JSON) from OUT/plan")
    p_run.add_argument("--overwrite", action="store_true", help="train a finished run again")
    p_run.add_argument("--device", help="replaces the config's device (e.g. cuda)")
    p_run.add_argument("--quiet", action="store_true", help="no progress bar")
    p_plot = sub.add_parser("plot", help="overlay a metric of several runs")
    p_plot.add_argument("runs", nargs="+", help="run files (or quoted globs)")
    p_plot.add_argument("-o", "--output", required=True, help="figure path (.png, .pdf)")
    p_plot.add_argument("--metric", default="sharpness_lr")
    p_plot.add_argument("--log-steps", action="store_true")
    p_plot.add_argument("--index", type=int, help="column of a vector metric (default: the "
                        "largest of a top-k metric, the last layer of a per-layer one)")
    p_report = sub.add_parser("report", help="print the super-consistency report of runs")
    p_report.add_argument("runs", nargs="+", help="run files (or quoted globs)")
    p_inspect = sub.add_parser("inspect", help="print a run file's config and metrics summary")
    p_inspect.add_argument("run", help="path of an HDF5 run file")
    p_bench = sub.add_parser("bench", help="side-by-side benchmarks against PyHessian, "
                             "curvlinops and hessian-eigenthings (needs a source checkout)")
    p_bench.add_argument("which", choices=sorted(BENCHMARKS), help="hvp: product time, "
                         "memory; eigs: products to the top eigenvalues")
    p_bench.add_argument("options", nargs=argparse.REMAINDER,
                         help="passed on, e.g. --quick, --device cuda, --dtype bfloat16")
    return parser


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "bench":
        bench(args.which, args.options)
    elif args.command == "demo":
        from curvlab.demo import demo

        demo(args.steps, args.lr, args.width, args.seed)
    elif args.command == "run":
        from curvlab.fanout import run_config

        path = run_config(args.config, overwrite=args.overwrite, device=args.device,
                          progress=not args.quiet)
        print(f"wrote {path}")
    elif args.command == "sweep":
        print(sweep(args))
    elif args.command == "inspect":
        from curvlab.analysis import run_summary

        print(run_summary(args.run))
    else:  # plot, report
        from curvlab.runs import load_runs

        runs = [r for pattern in args.runs for r in load_runs(pattern)]
        if args.command == "report":
            from curvlab.analysis import sweep_report

            print(sweep_report(runs))
        else:
            from curvlab.fanout import save_figure
            from curvlab.plotting import plot_overlay

            save_figure(plot_overlay(runs, metric=args.metric, log_steps=args.log_steps,
                                     index=args.index, eos=args.metric.startswith("sharpness"),
                                     log_y=args.metric in ("loss", "ntk_top")), args.output)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; 2 for a refused input (the reason on stderr), 1 when
    runs of a parallel sweep failed, else 0."""
    args = build_parser().parse_args(argv)
    refused = (FileNotFoundError,) if args.command == "bench" else (
        FileExistsError, FileNotFoundError, ValueError)
    try:
        _dispatch(args)
    except refused as err:
        print(f"curvlab {args.command}: {err}", file=sys.stderr)
        return 2
    except RunsFailed as err:
        print(f"curvlab sweep: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
