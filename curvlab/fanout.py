"""A sweep as one cluster job per run, and a sweep's figures and report.

- ``plan_sweep(cfg, out)`` (``curvlab sweep --plan-only``): resolves the LRs and writes
  ``out/plan/<run>.json`` (one run config per run), ``out/plan/sweep_config.json`` (the sweep, for
  ``--config`` when collecting) and ``out/plan/commands.txt`` (one ``curvlab run CONFIG`` line per
  run, with absolute paths). Trains nothing.
- ``run_config(path)`` (``curvlab run CONFIG``): trains the one run a run config describes.
- ``write_report(cfg, out, paths)`` (``curvlab sweep``, after training or when collecting a plan
  with ``--resume``): the figures ``out/overlay.png`` and ``out/loss.png`` (or, for an LR sweep,
  ``out/lr_sweep.png``) and ``out/report.md``.

A run config is JSON: ``{"format": "curvlab run config", "sweep": {SweepConfig fields},
"run": {RunSpec fields: "parametrization", "width", "depth", "lr", "seed"}, "output": PATH}``; a
relative ``output`` is relative to the config file's folder (the plan writes ``../runs/<run>.h5``).

Every way of running gives the same run files as the sequential sweep (``curvlab.sweep.run_sweep``,
or its ``jobs=N`` processes): the LRs are resolved once, before any training, and each run is
seeded by its own seed alone (``torch.manual_seed(seed)`` for the model, generators seeded with it
for the measurements and mini-batches). Only the summation order of multi-threaded CPU kernels may
differ with the thread count, in the last bits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from curvlab.sweep import (
    RunSpec,
    SweepConfig,
    config_from_dict,
    finished,
    load_data,
    prepare,
    train_one,
)

FORMAT = "curvlab run config"
RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunSpec))


def plan_sweep(cfg: SweepConfig, out: Path, *, resume: bool = False,
               overwrite: bool = False) -> str:
    """Write the plan (see the module docstring) and return how to launch and collect it.

    With ``resume``, ``commands.txt`` lists only the runs that are not finished yet.
    """
    specs = prepare(cfg, out, resume=resume, overwrite=overwrite)
    out = Path(out).resolve()
    plan = out / "plan"
    plan.mkdir(exist_ok=True)
    sweep = dataclasses.asdict(cfg)
    (plan / "sweep_config.json").write_text(json.dumps(sweep, indent=2) + "\n")
    lines = []
    for spec in specs:
        config = plan / (spec.name.removesuffix(".h5") + ".json")
        config.write_text(json.dumps({"format": FORMAT, "sweep": sweep,
                                      "run": dataclasses.asdict(spec),
                                      "output": f"../runs/{spec.name}"}, indent=2) + "\n")
        if not (resume and not overwrite and finished(out / "runs" / spec.name, cfg.steps)):
            lines.append(f"curvlab run {shlex.quote(str(config))}\n")
    commands = plan / "commands.txt"
    commands.write_text("".join(lines))
    collect = (f"curvlab sweep --config {shlex.quote(str(plan / 'sweep_config.json'))} "
               f"--out {shlex.quote(str(out))} --resume")
    if not lines:
        return (f"All {len(specs)} runs in {out / 'runs'} are finished; nothing to launch. "
                f"Collect them (figures and report):\n    {collect}\n")
    task = f'eval "$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {shlex.quote(str(commands))})"'
    return (f"Planned {len(specs)} runs in {plan} (one JSON config per run); nothing was trained."
            f"\n{commands} has {len(lines)} lines, one `curvlab run CONFIG` per run to train "
            "(absolute paths).\n\n"
            f"On this machine, one after another:\n    bash {shlex.quote(str(commands))}\n"
            "On a SLURM cluster, one array task per line (see docs/cluster.md for a script):\n"
            f"    sbatch --array=1-{len(lines)} --wrap {shlex.quote(task)}\n"
            f"Then collect the runs, write the figures and the report:\n    {collect}\n")


def load_run_config(path: str | os.PathLike[str]) -> tuple[SweepConfig, RunSpec, Path]:
    """Read a run config: ``(sweep config, run spec, output path)``."""
    call, path = "run_config", Path(path)
    expected = "a run config (JSON) written by `curvlab sweep --plan-only`"
    if not path.is_file():
        raise FileNotFoundError(f"{call}: no config file at {path}; expected {expected}; check "
                                "the path, or write the plan with `curvlab sweep --plan-only`")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{call}: {path} is not valid JSON ({err}); expected {expected}; write "
                         "the plan again") from None
    missing = [k for k in ("sweep", "run", "output")
               if not isinstance(values, dict) or k not in values]
    run = values.get("run") if isinstance(values, dict) else None
    missing += [f"run.{k}" for k in RUN_KEYS if isinstance(run, dict) and k not in run]
    if missing or not isinstance(run, dict) or not isinstance(values["sweep"], dict):
        got = sorted(values) if isinstance(values, dict) else type(values).__name__
        raise ValueError(f"{call}: {path} lacks {missing or ['sweep and run as objects']} (got "
                         f"{got}); expected {expected}; write the plan again")
    try:
        cfg = config_from_dict(values["sweep"], call)
        cfg.validate()
        spec = RunSpec(str(run["parametrization"]), int(run["width"]), int(run["depth"]),
                       float(run["lr"]), int(run["seed"]))
    except TypeError as err:
        raise ValueError(f"{call}: {path} holds a value of the wrong type ({err}); expected "
                         f"{expected}; write the plan again") from None
    output = Path(values["output"])
    return cfg, spec, output if output.is_absolute() else path.parent / output


def run_config(path: str | os.PathLike[str], *, overwrite: bool = False,
               device: str | None = None, progress: bool = False) -> Path:
    """Train the run that the run config ``path`` describes; return its run file.

    A finished run is refused unless ``overwrite``; an unfinished or damaged file is trained
    again from the start. ``device`` replaces the config's device (e.g. a plan made on a machine
    without a GPU, run on one with a GPU).
    """
    cfg, spec, output = load_run_config(path)
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    output = Path(os.path.normpath(output))
    if not overwrite and finished(output, cfg.steps):
        raise FileExistsError(f"run_config: {output} is a finished run; pass --overwrite "
                              "(overwrite=True) to train it again")
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=cfg.steps, unit="step", desc=output.name, disable=not progress)
    train_one(cfg, spec, output, load_data(cfg), bar)
    bar.close()
    return output


def save_figure(fig: Any, path: str | os.PathLike[str]) -> None:
    """Write ``fig`` and close it (pyplot keeps every open figure alive otherwise)."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_report(cfg: SweepConfig, out: Path, paths: Sequence[Path]) -> str:
    """Load the runs ``paths`` of the sweep ``cfg``, write its figures and ``out/report.md``
    (see the module docstring) and return the report.

    One LR per parametrization (``lrs="auto"`` or a single LR): the sharpness overlay with its EoS
    lines and the loss overlay, and :func:`curvlab.analysis.sweep_report`; several LRs: the LR
    sweep figure and :func:`curvlab.analysis.lr_report`.
    """
    from curvlab.analysis import lr_report, sweep_report
    from curvlab.plotting import plot_lr_sweep, plot_overlay
    from curvlab.runs import load_runs

    out, runs = Path(out), load_runs(paths)
    sharp = "sharpness_lr" if cfg.optimizer == "sgd" else "sharpness_adam"
    title = (f"{cfg.model} depth {cfg.depths[0]}, {cfg.dataset}, full-batch GD"
             if cfg.batch_size is None else f"{cfg.model}, {cfg.dataset}")
    if cfg.lrs == "auto" or len(cfg.lrs) == 1:
        save_figure(plot_overlay(runs, metric=sharp, title=title), out / "overlay.png")
        save_figure(plot_overlay(runs, metric="loss", eos=False, log_y=True, title=title),
                    out / "loss.png")
        figures, report = ["overlay.png", "loss.png"], sweep_report(runs)
    else:
        save_figure(plot_lr_sweep(runs), out / "lr_sweep.png")
        figures, report = ["lr_sweep.png"], lr_report(runs)
    report += "\nFigures: " + ", ".join(figures) + "\n"
    (out / "report.md").write_text(report)
    return report
