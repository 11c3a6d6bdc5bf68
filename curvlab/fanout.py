"""Fanning a sweep out: several runs at once on one machine, or one cluster job per run.

- ``run_parallel(cfg, jobs, out, num_jobs)`` (``curvlab sweep --jobs N``): N worker processes,
  started with "spawn" (so CUDA works in them), each train one run at a time with
  ``torch.set_num_threads(max(1, os.cpu_count() // N))``. With ``device="cuda"`` and CUDA GPUs,
  worker i trains on GPU ``i % torch.cuda.device_count()``: ``--jobs`` equal to the number of GPUs
  gives one run per GPU. A run that fails is reported with its name and error once the other runs
  have finished (:class:`RunsFailed`).
- ``plan_sweep(cfg, out)`` (``curvlab sweep --plan-only``): resolves the LRs and writes
  ``out/plan/<run>.json`` (one run config per run), ``out/plan/sweep_config.json`` (the sweep, for
  ``--config`` when collecting) and ``out/plan/commands.txt`` (one ``curvlab run CONFIG`` line per
  run, with absolute paths). Trains nothing.
- ``run_config(path)`` (``curvlab run CONFIG``): trains the one run a run config describes.

A run config is JSON: ``{"format": "curvlab run config", "sweep": {SweepConfig fields},
"run": {"parametrization", "width", "depth", "lr", "seed"}, "output": PATH}``; a relative
``output`` is relative to the config file's folder (the plan writes ``../runs/<run>.h5``).

Every way of running gives the same run files as the sequential sweep: the LRs are resolved once,
before any training, and each run is seeded by its own seed alone (``torch.manual_seed(seed)`` for
the model, generators seeded with it for the measurements and mini-batches). Only the summation
order of multi-threaded CPU kernels may differ with the thread count, in the last bits.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shlex
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvlab.sweep import (
    Job,
    SweepConfig,
    config_from_dict,
    finished,
    load_data,
    prepare,
    run_name,
    run_path,
    train_one,
)

FORMAT = "curvlab run config"
RUN_KEYS = ("parametrization", "width", "depth", "lr", "seed")


class RunsFailed(RuntimeError):
    """Some runs of a parallel sweep failed; ``failed`` holds ``(run name, error)`` pairs."""

    def __init__(self, message: str, failed: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.failed = failed


_WORKER: dict[str, Any] = {"slot": 0}
_DATA: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}


def _init_worker(num_jobs: int, counter: Any) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_jobs))
    with counter.get_lock():
        _WORKER["slot"] = counter.value
        counter.value += 1


def _train(cfg: SweepConfig, job: Job, path: str) -> str | None:
    """Train one run in a worker; return ``None``, or the error as text (always picklable)."""
    try:
        if cfg.device == "cuda" and torch.cuda.is_available():
            gpu = _WORKER["slot"] % torch.cuda.device_count()
            cfg = dataclasses.replace(cfg, device=f"cuda:{gpu}")
        key = (cfg.dataset, cfg.n, cfg.device, cfg.dtype)
        if key not in _DATA:
            _DATA.clear()
            _DATA[key] = load_data(cfg)
        train_one(cfg, *job, _DATA[key], Path(path))
    except Exception as err:  # reported by the parent with the run's name
        return f"{type(err).__name__}: {err}"
    return None


def run_parallel(cfg: SweepConfig, jobs: list[Job], out: Path, num_jobs: int, *,
                 progress: bool = True) -> None:
    """Train ``jobs`` (resolved by :func:`curvlab.sweep.prepare`) in ``num_jobs`` processes."""
    if not jobs:
        return
    ctx = multiprocessing.get_context("spawn")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="run", desc=f"sweep, {num_jobs} at once")
    failed: list[tuple[str, str]] = []
    pool = ProcessPoolExecutor(max_workers=min(num_jobs, len(jobs)), mp_context=ctx,
                               initializer=_init_worker, initargs=(num_jobs, ctx.Value("i", 0)))
    try:
        futures = {pool.submit(_train, cfg, job, str(run_path(out, job))): run_name(*job)
                   for job in jobs}
        for future in as_completed(futures):
            try:
                error = future.result()
            except Exception as err:  # the worker process died (killed, out of memory)
                error = f"{type(err).__name__}: {err}"
            if error is not None:
                failed.append((futures[future], error))
                if bar is not None:
                    bar.write(f"sweep: run {futures[future]} failed: {error}")
            if bar is not None:
                bar.update(1)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    pool.shutdown()
    if failed:
        lines = "".join(f"\n  {name}: {error}" for name, error in sorted(failed))
        raise RunsFailed(f"sweep: {len(failed)} of {len(jobs)} runs failed (the other "
                         f"{len(jobs) - len(failed)} finished):{lines}\nFix the cause, then run "
                         "the same command with --resume to train only the unfinished runs.",
                         failed)


def plan_sweep(cfg: SweepConfig, out: Path, *, resume: bool = False,
               overwrite: bool = False) -> str:
    """Write the plan (see the module docstring) and return how to launch and collect it.

    With ``resume``, ``commands.txt`` lists only the runs that are not finished yet.
    """
    jobs = prepare(cfg, out, resume=resume, overwrite=overwrite)
    out = Path(out).resolve()
    plan = out / "plan"
    plan.mkdir(exist_ok=True)
    sweep = dataclasses.asdict(cfg)
    (plan / "sweep_config.json").write_text(json.dumps(sweep, indent=2) + "\n")
    lines = []
    for job in jobs:
        name = run_name(*job)
        config = plan / (name.removesuffix(".h5") + ".json")
        config.write_text(json.dumps({"format": FORMAT, "sweep": sweep,
                                      "run": dict(zip(RUN_KEYS, job, strict=True)),
                                      "output": f"../runs/{name}"}, indent=2) + "\n")
        if not (resume and not overwrite and finished(out / "runs" / name, cfg.steps)):
            lines.append(f"curvlab run {shlex.quote(str(config))}\n")
    commands = plan / "commands.txt"
    commands.write_text("".join(lines))
    collect = (f"curvlab sweep --config {shlex.quote(str(plan / 'sweep_config.json'))} "
               f"--out {shlex.quote(str(out))} --resume")
    if not lines:
        return (f"All {len(jobs)} runs in {out / 'runs'} are finished; nothing to launch. "
                f"Collect them (figures and report):\n    {collect}\n")
    task = f'eval "$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {shlex.quote(str(commands))})"'
    return (f"Planned {len(jobs)} runs in {plan} (one JSON config per run); nothing was trained.\n"
            f"{commands} has {len(lines)} lines, one `curvlab run CONFIG` per run to train "
            "(absolute paths).\n\n"
            f"On this machine, one after another:\n    bash {shlex.quote(str(commands))}\n"
            "On a SLURM cluster, one array task per line (see docs/cluster.md for a script):\n"
            f"    sbatch --array=1-{len(lines)} --wrap {shlex.quote(task)}\n"
            f"Then collect the runs, write the figures and the report:\n    {collect}\n")


def load_run_config(path: str | os.PathLike[str]) -> tuple[SweepConfig, Job, Path]:
    """Read a run config: ``(sweep config, (parametrization, width, depth, lr, seed), output)``."""
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
        job = (str(run["parametrization"]), int(run["width"]), int(run["depth"]),
               float(run["lr"]), int(run["seed"]))
    except TypeError as err:
        raise ValueError(f"{call}: {path} holds a value of the wrong type ({err}); expected "
                         f"{expected}; write the plan again") from None
    output = Path(values["output"])
    return cfg, job, output if output.is_absolute() else path.parent / output


def run_config(path: str | os.PathLike[str], *, overwrite: bool = False,
               device: str | None = None, progress: bool = False) -> Path:
    """Train the run that the run config ``path`` describes; return its run file.

    A finished run is refused unless ``overwrite``; an unfinished or damaged file is trained
    again from the start. ``device`` replaces the config's device (e.g. a plan made on a machine
    without a GPU, run on one with a GPU).
    """
    cfg, job, output = load_run_config(path)
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    output = Path(os.path.normpath(output))
    if not overwrite and finished(output, cfg.steps):
        raise FileExistsError(f"run_config: {output} is a finished run; pass --overwrite "
                              "(overwrite=True) to train it again")
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, unit="step", desc=output.name)
    train_one(cfg, *job, load_data(cfg), output, bar)
    if bar is not None:
        bar.close()
    return output
