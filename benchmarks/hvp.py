"""Hessian-vector product throughput: curvlab's routes against a gradient and other libraries.

For three float32 models with cross-entropy on random data (``problems.make_problem``: fixed
``torch.Generator``, no downloads) -- an MLP 784-512-512-10 (ReLU, batch 1024), a CNN with two 3x3
convolutions (16 and 32 channels) on 1x28x28 images (batch 256) and a one-block transformer
(``curvlab.testing``, d_model 64, 4 heads, 32 tokens, batch 64) -- it measures the median wall time
of:

1. a gradient: one forward and backward of the mean loss (``torch.autograd.grad``);
2. curvlab's ``H @ v`` (operator built once, outside the timing) for ``rev-rev`` with the kept
   first-order graph (the default for one batch), ``rev-rev`` without reuse and ``fwd-rev``;
3. baselines: plain double backward with torch.autograd (the first-order graph rebuilt for every
   product), PyHessian's cached product (``pyhessian.utils.hessian_vector_product`` on the graph
   its ``hessian`` constructor builds once) and curvlinops' ``HessianLinearOperator``, when those
   optional packages are importable;
4. curvlab's ``H @ V`` for blocks ``V (P, m)``, m = 1, 8, 32: per-vector time and products/s.

Candidates of one group are timed interleaved (``harness.time_interleaved``: round robin,
rotating order) after a warm-up. The table's medians come from one group holding every route.
Each target is timed in a group of its own, two candidates called back to back in alternating
order for ``--target-rounds`` rounds (the m = 8 pairs a quarter of them) in each of
``--processes`` fresh processes, and reported as the median over rounds of the per-round ratio,
so that the drifts of a shared machine cancel, with a 95% interval: by default from the order
statistics of all rounds pooled; with ``--stats bootstrap`` from a two-level bootstrap
(processes, then rounds: ``stats.py``), which also holds the variation between processes:

- curvlab's kept-graph product against PyHessian's cached product;
- curvlab's product without reuse against a plain double backward;
- ``H @ V`` for a block of m = 8 columns against the same 8 columns as 8 calls ``H @ v``. The
  block is given with contiguous columns (``V = W.T`` for ``W (8, P)``), the layout that
  ``H @ V`` returns; a row-major block, which costs one gather per column, is reported beside it.
- a plain double backward against itself, an A/A control: how far apart two identical calls
  come out in the same design (not a target).

The blocks m = 1, 8, 32 of each route are one more group (products/s in the table). Every timing
runs with the math attention backend, which curvlab uses too (the fused CPU kernels have no double
backward). ``--malloc-tuning`` (off by default) makes glibc's malloc keep freed memory
(``malloc.keep_freed_memory``) for every candidate alike, which takes the page faults of fresh
temporaries out of the timings (see benchmarks/README.md); the JSON records the setting.

Targets (CPU, ratios within one run): with graph reuse, curvlab's product is no slower than
PyHessian's cached product (expected about 1.3-2x a gradient); without reuse, curvlab's rev-rev is
no slower than plain double backward; per vector, m = 8 is no slower than m = 1.

Run ``python benchmarks/hvp.py`` (about 30 minutes on two CPU cores) or ``--quick`` for a smoke run
(about a minute, one thread). On a shared machine pass ``--threads 1``: two OpenMP threads next
to another busy process slow down erratically (up to 8x); the JSON records the other load.
Results go to ``benchmarks/results/hvp_<device>.json`` and ``.md`` (``--out`` to change); the HVP
section of ``benchmarks/README.md`` is regenerated from every full-run JSON in that folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness as h
import numpy as np
import torch
from harness import verdict  # noqa: F401  (callers use hvp.<name>)
from malloc import keep_freed_memory  # noqa: F401
from problems import MODELS, make_problem
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvlab as cl

BLOCKS = (1, 8, 32)
CONTROL = "control: double backward / itself"
CURVLAB = {  # label -> HessianOperator keyword arguments
    "curvlab rev-rev reuse": {"method": "rev-rev"},
    "curvlab rev-rev no reuse": {"method": "rev-rev", "reuse_graph": False},
    "curvlab fwd-rev no reuse": {"method": "fwd-rev", "reuse_graph": False},
}


def target_groups(ops: dict[str, Any], others: dict[str, Callable[[], Any]], v: torch.Tensor,
                  block: torch.Tensor) -> dict[str, dict[str, Callable[[], Any]]]:
    """Head-to-head pairs ``{"curvlab": ..., "other": ...}`` behind each target ratio.

    ``block (P, 8)`` has contiguous columns; the m = 8 targets compare one ``H @ block`` with the
    8 columns as 8 calls ``H @ block[:, j]``, i.e. the same products one at a time.
    """
    reuse, no_reuse = ops["curvlab rev-rev reuse"], ops["curvlab rev-rev no reuse"]
    columns = [block[:, j] for j in range(block.shape[1])]  # each (P,), contiguous
    rows = block.contiguous()  # (P, 8) row-major: a column is a strided gather
    groups: dict[str, dict[str, Callable[[], Any]]] = {}
    if "PyHessian cached" in others:
        groups["curvlab reuse / PyHessian cached"] = {
            "curvlab": lambda: reuse @ v, "other": others["PyHessian cached"]}
    groups["curvlab rev-rev no reuse / double backward"] = {
        "curvlab": lambda: no_reuse @ v, "other": others["double backward"]}
    # A/A control: the same call on both sides; its spread is what the pairs can resolve.
    groups[CONTROL] = {"curvlab": others["double backward"], "other": others["double backward"]}
    for label, op in (("reuse", reuse), ("no reuse", no_reuse)):
        groups[f"{label}: m=8 block / 8 single products"] = {
            "curvlab": lambda op=op: op @ block, "other": lambda op=op: [op @ c for c in columns]}
    groups["reuse: m=8 row-major block / 8 single products"] = {
        "curvlab": lambda: reuse @ rows, "other": lambda: [reuse @ c for c in columns]}
    return groups


def baselines(model: nn.Module, criterion: nn.Module, x: Any, y: Any, v: torch.Tensor,
              device: torch.device) -> tuple[dict[str, Callable[[], Any]], Callable[[], None]]:
    """Products ``H v`` of the other routes, and a function to free their graphs.

    Every product maps the flat ``v (P,)`` to a flat ``H v (P,)``, as curvlab's ``H @ v`` does:
    the split of ``v`` into parameter-shaped views and the concatenation of the result are timed
    on both sides (until commit e6ba85c the views were made once, outside the timing; making
    them per call measured 1.002 [0.997, 1.007] of a double backward on the transformer).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]

    def pieces(w: torch.Tensor) -> list[torch.Tensor]:  # w (P,) -> views shaped like params
        return [c.view_as(p) for c, p in zip(w.split(sizes), params, strict=True)]

    def flat(parts: Any) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in parts])

    def double_backward() -> torch.Tensor:
        g = torch.autograd.grad(criterion(model(x), y), params, create_graph=True)
        return flat(torch.autograd.grad(g, params, grad_outputs=pieces(v)))

    fns: dict[str, Callable[[], Any]] = {"double backward": double_backward}
    try:
        import pyhessian
        from pyhessian.utils import hessian_vector_product
    except ImportError:
        pass
    else:  # the constructor runs loss.backward(create_graph=True) once
        with warnings.catch_warnings():  # its loss.backward(create_graph=True) warns of a cycle
            warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph")
            ph = pyhessian.hessian(model, criterion, data=(x, y), cuda=device.type == "cuda")
        gradsH, ph_params = ph.gradsH, ph.params
        fns["PyHessian cached"] = lambda: flat(hessian_vector_product(gradsH, ph_params,
                                                                        pieces(v)))
    try:
        from curvlinops import HessianLinearOperator
    except ImportError:
        pass
    else:
        hc = HessianLinearOperator(model, criterion, params, [(x, y)], check_deterministic=False)
        fns["curvlinops"] = lambda: hc @ v

    def release() -> None:
        for p in params:
            p.grad = None  # PyHessian's graph lives in the .grad fields

    return fns, release


def rounds_of(key: str, rounds: int) -> int:
    """Rounds of one target group: ``rounds`` for single products, a quarter (at least 3) for the
    m = 8 groups, whose rounds cost 8 products a side and whose ratios sit far from 1."""
    return max(3, rounds // 4) if "m=8" in key else rounds


def time_targets(name: str, args: argparse.Namespace, device: torch.device
                 ) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of both sides of every target pair (``target_groups``), in this process."""
    model, x, y, _ = make_problem(name, args.quick, device)
    criterion = nn.CrossEntropyLoss()
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(P, generator=gen).to(device)  # (P,)
    block = torch.randn(8, P, generator=gen).to(device).T  # (P, 8), contiguous columns
    ops = {label: cl.HessianOperator(model, criterion, (x, y), **kw)
           for label, kw in CURVLAB.items()}
    with sdpa_kernel(SDPBackend.MATH):
        others, release = baselines(model, criterion, x, y, v, device)
        samples = {key: h.time_interleaved(pair, rounds_of(key, args.target_rounds),
                                           max(args.warmup, 5), device)
                   for key, pair in target_groups(ops, others, v, block).items()}
        release()
    return samples


def targets_in_processes(name: str, args: argparse.Namespace, device: torch.device
                         ) -> dict[str, list[dict[str, list[float]]]]:
    """``time_targets`` in ``args.processes`` fresh processes, one after another.

    What limits the pooled ratio is the noise of single rounds: on two shared CPU cores one
    round's ratio of two products varies by 8-11% (standard deviation), and the spread of
    per-process medians was no larger than that predicts (transformer without reuse, 4 processes
    of 250 rounds, six pairs). So the interval narrows with the total number of rounds, here 8
    processes of 40 (the m = 8 groups 10, see :func:`rounds_of`); ``--stats bootstrap`` resamples
    processes too, in case a machine does show a bias per process. The A/A control
    (``CONTROL``) measures in every run how far apart two identical calls come out.
    """
    runs: dict[str, list[dict[str, list[float]]]] = {}
    for k in range(args.processes):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "targets.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--targets-of", name,
                   "--out", str(out), "--device", str(device),
                   "--target-rounds", str(args.target_rounds), "--warmup", str(args.warmup)]
            cmd += ["--quick"] * args.quick + ["--malloc-tuning"] * args.malloc_tuning
            cmd += ["--threads", str(torch.get_num_threads())]
            print(f"  targets of {name}: process {k + 1} of {args.processes}", file=sys.stderr,
                  flush=True)
            subprocess.run(cmd, check=True)
            for key, samples in json.loads(out.read_text()).items():
                runs.setdefault(key, []).append(samples)
    return runs


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model, x, y, text = make_problem(name, args.quick, device)
    criterion = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(1)
    blocks = {m: torch.randn(P, m, generator=gen).to(device) for m in BLOCKS}
    v = blocks[1][:, 0].contiguous()  # (P,)
    ops = {label: cl.HessianOperator(model, criterion, (x, y), **kw)
           for label, kw in CURVLAB.items()}
    with sdpa_kernel(SDPBackend.MATH):
        others, release = baselines(model, criterion, x, y, v, device)
        fns: dict[str, Callable[[], Any]] = {
            "gradient": lambda: torch.autograd.grad(criterion(model(x), y), params)}
        fns.update({label: (lambda op=op: op @ v) for label, op in ops.items()})
        fns.update(others)
        reference = ops["curvlab rev-rev reuse"] @ v
        rel_diff = {label: float((fn() - reference).norm() / reference.norm())
                    for label, fn in fns.items() if label not in ("gradient",)}
        s1 = h.time_interleaved(fns, args.repeats, args.warmup, device)
        blocks_s = {}  # label -> m -> samples; m = 1, 8, 32 of one route timed in the same rounds
        for label, op in ops.items():
            blocks_s[label] = h.time_interleaved(
                {str(m): (lambda op=op, V=blocks[m]: op @ V) for m in BLOCKS}, args.repeats,
                args.warmup, device)
        release()
    del others, fns  # the graphs go before the target processes start
    ops = dict.fromkeys(ops)  # the labels only
    targets = targets_in_processes(name, args, device)  # key -> one sample dict per process
    t1 = {label: h.median(x) for label, x in s1.items()}
    per_call = {label: {m: h.median(blocks_s[label][str(m)]) for m in BLOCKS} for label in ops}
    grad = t1["gradient"]
    ratios = {f"{label} / gradient": t / grad for label, t in t1.items() if label != "gradient"}
    paired = {key: h.pooled_ratio(runs, args.stats) for key, runs in targets.items()}
    for label in ops:
        for m in BLOCKS[1:]:
            paired[f"{label} per vector m={m} / m=1"] = h.paired_ratio(
                blocks_s[label][str(m)], blocks_s[label]["1"], scale=m, stats=args.stats)
    ratios.update({key: q["median"] for key, q in paired.items()})
    return {
        "description": text, "num_params": P, "batch": int(y.shape[0]),
        "median_s": {label: t for label, t in t1.items() if label not in ops},
        "summary_s": {label: h.summary(x) for label, x in s1.items()},
        "curvlab_median_s_per_call": {lab: {str(m): t for m, t in d.items()}
                                      for lab, d in per_call.items()},
        "per_vector_s": {lab: {str(m): t / m for m, t in d.items()} for lab, d in per_call.items()},
        "products_per_s": {lab: {str(m): m / t for m, t in d.items()}
                           for lab, d in per_call.items()},
        "ratios": ratios, "paired_ratios": paired,
        "target_median_s": {key: {side: h.median([t for run in runs for t in run[side]])
                                  for side in ("curvlab", "other")}
                            for key, runs in targets.items()},
        "target_ratio_per_process": {key: [float(np.median(np.divide(run["curvlab"], run["other"])))
                                           for run in runs] for key, runs in targets.items()},
        "relative_difference_to_curvlab_reuse": rel_diff,
    }


def interval_text(settings: dict[str, Any]) -> str:
    """How the run's intervals were made (runs before ``--stats`` existed bootstrapped)."""
    if settings.get("stats", "bootstrap") == "bootstrap":
        return "from a bootstrap over processes and rounds"
    return "of the median from the order statistics of all rounds pooled"


def markdown(result: dict[str, Any]) -> str:
    """The tables of one run: times per model and route, then the targets."""
    lines = [*h.header(result, f"median of {result['settings']['repeats']} repeats"),
             "| model | P | route | ms per product (m=1) | x gradient | ms per vector "
             "m=8 / m=32 | products/s m=1 / 8 / 32 |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in result["models"].values():
        grad = r["median_s"]["gradient"]
        lines.append(f"| {r['description']} | {r['num_params']:,} | gradient | "
                     f"{1e3 * grad:.2f} | 1.00 | | |")
        for label, d in r["per_vector_s"].items():
            pps = " / ".join(f"{r['products_per_s'][label][m]:.1f}" for m in d)
            lines.append(f"| | | {label} | {1e3 * d['1']:.2f} | {d['1'] / grad:.2f} | "
                         f"{1e3 * d['8']:.2f} / {1e3 * d['32']:.2f} | {pps} |")
        for label, t in r["median_s"].items():
            if label != "gradient":
                lines.append(f"| | | {label} | {1e3 * t:.2f} | {t / grad:.2f} | | |")
    st = result["settings"]
    lines += ["", f"Targets, each timed head to head in {st['target_processes']} fresh processes "
              f"({st['target_rounds']} rounds each of the two calls back to back, alternating "
              f"order; the m = 8 pairs {rounds_of('m=8', st['target_rounds'])}), as the median "
              f"over all rounds of the per-round ratio with a 95% interval {interval_text(st)} "
              "(target <= 1; \"within noise\": the median is above 1 "
              "but the interval reaches 1, so the run cannot tell the two apart). The m = 8 "
              "cells compare one `H @ V` with the same 8 columns as 8 calls `H @ v`. The last "
              "column times one call against itself in the same way: how far from 1 two "
              "identical calls come out on this machine:", "",
              "| model | reuse / PyHessian cached | no reuse / double backward | m=8 block / 8 "
              "single, reuse | m=8 block / 8 single, no reuse | A/A control: double backward / "
              "itself |", "|---|---|---|---|---|---|"]
    keys = ["curvlab reuse / PyHessian cached", "curvlab rev-rev no reuse / double backward",
            "reuse: m=8 block / 8 single products", "no reuse: m=8 block / 8 single products"]
    for name, r in result["models"].items():
        q = r["paired_ratios"]
        control = q.get(CONTROL)
        lines.append(f"| {name} | " + " | ".join(h.fmt(q.get(k)) for k in keys) + " | "
                     + (h.fmt(control).rsplit(" (", 1)[0] if control else "n/a") + " |")
    lines += ["", "Not targets: a row-major m = 8 block (one strided gather per column) against "
              "8 single products, reuse; and the per-vector time at m = 8 over m = 1 from the "
              "blocks group (medians of different rounds):", "",
              "| model | row-major m=8 block / 8 single | per vector m=8 / m=1: reuse | no reuse "
              "| fwd-rev |", "|---|---|---|---|---|"]
    for name, r in result["models"].items():
        q = r["paired_ratios"]
        cells = [q.get("reuse: m=8 row-major block / 8 single products"),
                 *(q[f"{label} per vector m=8 / m=1"] for label in CURVLAB)]
        lines.append(f"| {name} | " + " | ".join(h.fmt(c) for c in cells) + " |")
    differ = [f"{label} on {name} ({d:.1e})" for name, r in result["models"].items()
              for label, d in r["relative_difference_to_curvlab_reuse"].items() if d > 1e-4]
    lines += ["", "Products differing from curvlab's rev-rev by a relative 2-norm above 1e-4: "
              + (", ".join(differ) if differ else "none") + "."]
    return "\n".join(lines) + "\n"


def write_readme() -> None:
    h.write_section("hvp", "Hessian-vector products",
                    "Generated by `benchmarks/hvp.py` from `results/hvp_<device>.json`; rerun "
                    "with `python benchmarks/hvp.py` (options: `--device`, `--repeats`, "
                    "`--threads`, `--quick`, `--out`). Ratios compare timings of one run, paired "
                    "by round.", markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     parents=[h.options(repeats=(25, 3), stats=True)])
    parser.add_argument("--target-rounds", type=int, default=None,
                        help="rounds of each target pair in each process (default 40; 3); the "
                        "m = 8 pairs take a quarter of them")
    parser.add_argument("--processes", type=int, default=None,
                        help="fresh processes that time the targets (default 8; 1 with --quick)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--targets-of", choices=MODELS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-malloc-tuning", action="store_true",  # the default now
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.target_rounds = args.target_rounds or (3 if args.quick else 40)
    args.processes = args.processes or (1 if args.quick else 8)
    args.malloc_tuning = args.malloc_tuning and not args.no_malloc_tuning
    malloc = h.setup(args)
    device = torch.device(args.device)
    if args.targets_of:  # a child of targets_in_processes
        args.out.write_text(json.dumps(time_targets(args.targets_of, args, device)))
        return
    out = h.out_path(args, "hvp", device.type)
    models, start = {}, h.busy_seconds()
    for name in args.models:
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        models[name] = bench_model(name, args, device)
    result = {"settings": {"repeats": args.repeats, "target_rounds": args.target_rounds,
                           "target_processes": args.processes, "stats": args.stats,
                           "malloc": malloc, "warmup": args.warmup, "quick": args.quick,
                           "blocks": list(BLOCKS), "dtype": "float32", "models": args.models},
              "environment": h.environment(device), "models": models}
    h.save(result, start, out, markdown, write_readme)


if __name__ == "__main__":
    main()
