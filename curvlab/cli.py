"""Command-line front end (argparse only).

- ``curvlab sweep [flags] [--config FILE]``: the main job (see ``curvlab.sweep``): one HDF5 run per
  configuration in ``OUT/runs``, the overlay figure ``OUT/overlay.png`` and ``OUT/report.md``.
  ``--jobs N`` trains N runs at once; ``--plan-only`` writes one run config per run to
  ``OUT/plan`` and trains nothing (see ``curvlab.fanout`` and docs/cluster.md).
- ``curvlab run CONFIG``: train the one run a planned run config describes.
- ``curvlab plot RUNS... -o FIG [--metric M]``, ``curvlab report RUNS...``,
  ``curvlab inspect RUN``, ``curvlab demo``.

Example:
    $ curvlab sweep --out runs/sweep
    $ curvlab report runs/sweep/runs/*.h5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvlab.linalg import lanczos
from curvlab.operators import HessianOperator
from curvlab.testing import MLP, mse


def demo(steps: int = 300, lr: float = 0.5, width: int = 64, seed: int = 0) -> list[float]:
    """Train a small tanh MLP on a teacher task with full-batch GD and print its sharpness.

    The sharpness (top Hessian eigenvalue of the mean MSE loss) is computed by Lanczos from exact
    Hessian-vector products, warm-started from the previous top eigenvector, and compared with
    the gradient descent stability threshold ``2 / lr`` (Cohen et al. 2021, arXiv:2103.00065).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(256, 8, generator=g)  # (n, d_in)
    teacher = MLP(8, 16, 2)
    with torch.no_grad():
        y = teacher(x)  # (n, 2)
    model = MLP(8, width, 2)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    print(f"full-batch GD on a {sum(p.numel() for p in model.parameters())}-parameter tanh MLP, "
          f"lr={lr}, stability threshold 2/lr = {2 / lr:.1f}")
    print(f"{'step':>6} {'loss':>10} {'sharpness':>10} {'products':>9} {'seconds':>8}")
    history: list[float] = []
    v0 = None
    for step in range(steps + 1):
        if step % max(steps // 6, 1) == 0:
            start = time.perf_counter()
            H = HessianOperator(model, mse, (x, y))
            result = lanczos(H, 1, tol=1e-4, v0=v0, generator=torch.Generator().manual_seed(seed))
            top, v0 = float(result.eigenvalues[0]), result.eigenvectors
            history.append(top)
            print(f"{step:>6} {mse(model(x), y).item():>10.5f} {top:>10.3f} {H.num_matvecs:>9} "
                  f"{time.perf_counter() - start:>8.2f}")
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    return history


def inspect(path: str) -> str:
    """A run's config, environment and a one-line summary per metric."""
    from curvlab.runs import load_run

    run = load_run(path)
    lines = [f"run {run.path} (schema {run.attrs.get('schema_version')}, curvlab "
             f"{run.attrs.get('curvlab_version')}, created {run.attrs.get('created')})", "config:"]
    lines += [f"  {k} = {json.dumps(v)}" for k, v in sorted(run.config.items())]
    lines += ["env: " + ", ".join(f"{k}={v}" for k, v in sorted(run.env.items())), "metrics:"]
    if not run.metrics:
        lines.append("  (none)")
    for name, m in sorted(run.metrics.items()):
        shape = "x".join(map(str, m.value.shape[1:])) or "scalar"
        span = f"steps {m.step[0]}..{m.step[-1]}" if m.step.size else "no steps"
        last = m.value[-1] if m.value.size else None
        shown = (f"{last:.6g}" if np.ndim(last) == 0 else
                 "[" + ", ".join(f"{v:.4g}" for v in np.ravel(last)[:6])
                 + (", ...]" if np.size(last) > 6 else "]")) if last is not None else "-"
        extra = f", threshold {m.threshold:.6g}" if m.threshold is not None else ""
        lines.append(f"  {name:<28} {shape:<8} {len(m.step):>6} rows, {span}, last {shown}{extra}")
    return "\n".join(lines)


def _numbers(kind: type, text: str) -> tuple:
    return tuple(kind(v) for v in text.replace(",", " ").split())


def sweep_config(args: argparse.Namespace) -> Any:
    """A :class:`~curvlab.sweep.SweepConfig` from a JSON/TOML file and the flags (flags win)."""
    from curvlab.sweep import config_from_dict

    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if path.suffix == ".toml":
            import tomllib

            values = tomllib.loads(path.read_text())
        else:
            values = json.loads(path.read_text())
    flags = {"model": args.model, "widths": args.widths, "depths": args.depths,
             "parametrizations": args.parametrizations, "optimizer": args.optimizer,
             "lrs": args.lr, "steps": args.steps, "batch_size": args.batch_size,
             "dataset": args.dataset, "n": args.n, "probe_size": args.probe_size,
             "every": args.every, "seeds": args.seeds, "device": args.device,
             "base_width": args.base_width, "dtype": args.dtype, "loss": args.loss}
    values.update({k: v for k, v in flags.items() if v is not None})
    for key in ("widths", "depths", "seeds"):
        if isinstance(values.get(key), str):
            values[key] = _numbers(int, values[key])
        elif isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    if isinstance(values.get("parametrizations"), str):
        values["parametrizations"] = tuple(values["parametrizations"].replace(",", " ").split())
    if values.get("device") is None:
        values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    lrs = values.get("lrs")
    if isinstance(lrs, str) and lrs != "auto":
        values["lrs"] = _numbers(float, lrs)
    elif isinstance(lrs, list | float | int):
        values["lrs"] = tuple(lrs) if isinstance(lrs, list) else (float(lrs),)
    return config_from_dict(values)


def sweep(args: argparse.Namespace) -> str:
    """Run the sweep, then write the overlay figure(s) and the report; return the report."""
    from curvlab.analysis import sweep_report
    from curvlab.plotting import plot_lr_sweep, plot_overlay
    from curvlab.runs import load_runs
    from curvlab.sweep import run_sweep

    cfg = sweep_config(args)
    out = Path(args.out)
    if args.plan_only:
        from curvlab.fanout import plan_sweep

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
    runs = load_runs(paths)
    sharp = "sharpness_lr" if cfg.optimizer == "sgd" else "sharpness_adam"
    title = (f"{cfg.model} depth {cfg.depths[0]}, {cfg.dataset}, full-batch GD"
             if cfg.batch_size is None else f"{cfg.model}, {cfg.dataset}")
    figures = []
    if cfg.lrs == "auto" or len(cfg.lrs) == 1:
        save_figure(plot_overlay(runs, metric=sharp, title=title), out / "overlay.png")
        figures.append("overlay.png")
        save_figure(plot_overlay(runs, metric="loss", eos=False, log_y=True, title=title),
                    out / "loss.png")
        figures.append("loss.png")
        report = sweep_report(runs)
    else:
        save_figure(plot_lr_sweep(runs), out / "lr_sweep.png")
        figures.append("lr_sweep.png")
        report = lr_report(runs)
    report += "\nFigures: " + ", ".join(figures) + "\n"
    (out / "report.md").write_text(report)
    return report


def lr_report(runs: Sequence[Any], last: int = 10) -> str:
    """Best LR per (parametrization, width) by the final loss (mean of the last ``last``)."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for r in runs:
        loss = r.metrics["loss"].value
        final = float(np.mean(loss[-last:])) if loss.size and "diverged" not in r.metrics \
            else float("inf")
        key = (str(r.config["parametrization"]), int(r.config["width"]))
        if key not in best or final < best[key][1]:
            best[key] = (float(r.config["lr"]), final)
    lines = ["# LR sweep report", "", "| parametrization | width | best lr | final loss |",
             "|---|---:|---:|---:|"]
    lines += [f"| {p} | {w} | {lr:.4g} | {v:.4g} |" for (p, w), (lr, v) in sorted(best.items())]
    return "\n".join(lines) + "\n"


def save_figure(fig: Any, path: Any) -> None:
    """Write ``fig`` and close it (pyplot keeps every open figure alive otherwise)."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=130)
    plt.close(fig)


BENCHMARKS = {"hvp": "compare_hvp.py", "eigs": "compare_eigs.py"}


def bench(which: str, options: list[str]) -> None:
    """Run ``benchmarks/<BENCHMARKS[which]>`` of the source checkout with ``options``."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    script = folder / BENCHMARKS[which]
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: the benchmarks live in the repository, "
                                "not in the installed package; clone it and `pip install -e .`")
    sys.path.insert(0, str(folder))  # the scripts import their shared helpers (hvp.py)
    try:
        spec = importlib.util.spec_from_file_location(f"_curvlab_bench_{which}", script)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        module.main(options)
    finally:
        sys.path.remove(str(folder))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="curvlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train a small MLP and print its sharpness")
    p_demo.add_argument("--steps", type=int, default=300)
    p_demo.add_argument("--lr", type=float, default=0.5)
    p_demo.add_argument("--width", type=int, default=64)
    p_demo.add_argument("--seed", type=int, default=0)
    p_sweep = sub.add_parser("sweep", help="train across widths, log, plot and report")
    p_sweep.add_argument("--config", help="JSON or TOML file with SweepConfig fields")
    p_sweep.add_argument("--model", help="mlp (default), resnet, convnet or transformer")
    p_sweep.add_argument("--widths", help="e.g. '64,128,256,512' (default)")
    p_sweep.add_argument("--depths", help="e.g. '3' (default)")
    p_sweep.add_argument("--parametrizations",
                         help="e.g. 'mup,ntp' (default); also sp, depth-mup and interp:S "
                              "(cl.interpolated(S), S in [0, 1]: NTP at 0, muP at 1)")
    p_sweep.add_argument("--optimizer", help="sgd (default) or adam")
    p_sweep.add_argument("--lr", help="'auto' (default) or one or several LRs (an LR sweep)")
    p_sweep.add_argument("--steps", type=int, help="training steps (default 200)")
    p_sweep.add_argument("--batch-size", type=int, help="default: full batch")
    p_sweep.add_argument("--dataset", help="teacher (default), mixture, digits or a .npz path")
    p_sweep.add_argument("--n", type=int, help="training examples (default 512)")
    p_sweep.add_argument("--probe-size", type=int, help="examples measured on (default 256)")
    p_sweep.add_argument("--every", type=int, help="sharpness every N steps (default 10)")
    p_sweep.add_argument("--seeds", help="e.g. '0' (default) or '0,1,2'")
    p_sweep.add_argument("--base-width", type=int, help="muP base width (default: smallest)")
    p_sweep.add_argument("--device", help="default: cuda when available, else cpu")
    p_sweep.add_argument("--out", default="runs/sweep", help="output folder")
    p_sweep.add_argument("--resume", action="store_true", help="skip finished runs")
    p_sweep.add_argument("--overwrite", action="store_true", help="redo runs in --out")
    p_sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    p_sweep.add_argument("--dtype", help="float32 (default) or float64, of model and data")
    p_sweep.add_argument("--loss", help="mse (default) or xent (cross-entropy on the classes)")
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
    args = parser.parse_args(argv)
    if args.command == "bench":
        try:
            bench(args.which, args.options)
        except FileNotFoundError as err:
            print(f"curvlab bench: {err}", file=sys.stderr)
            return 2
    elif args.command == "demo":
        demo(args.steps, args.lr, args.width, args.seed)
    elif args.command == "run":
        from curvlab.fanout import run_config

        try:
            path = run_config(args.config, overwrite=args.overwrite, device=args.device,
                              progress=not args.quiet)
        except (FileExistsError, FileNotFoundError, ValueError) as err:
            print(f"curvlab run: {err}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
    elif args.command in ("sweep", "plot", "report"):
        from curvlab.fanout import RunsFailed

        try:
            if args.command == "sweep":
                print(sweep(args))
            else:
                from curvlab.analysis import sweep_report
                from curvlab.plotting import plot_overlay
                from curvlab.runs import load_runs

                runs = [r for pattern in args.runs for r in load_runs(pattern)]
                if args.command == "report":
                    print(sweep_report(runs))
                else:
                    save_figure(plot_overlay(
                        runs, metric=args.metric, log_steps=args.log_steps, index=args.index,
                        eos=args.metric.startswith("sharpness"),
                        log_y=args.metric in ("loss", "ntk_top")), args.output)
        except (FileExistsError, FileNotFoundError, ValueError) as err:
            print(f"curvlab {args.command}: {err}", file=sys.stderr)
            return 2
        except RunsFailed as err:
            print(f"curvlab sweep: {err}", file=sys.stderr)
            return 1
    elif args.command == "inspect":
        try:
            print(inspect(args.run))
        except (FileNotFoundError, ValueError) as err:
            print(f"curvlab inspect: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
