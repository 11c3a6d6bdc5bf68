"""Hessian-vector product throughput: curvlab's routes against a gradient and other libraries.

For three float32 models with cross-entropy on random data (fixed ``torch.Generator``, no
downloads) -- an MLP 784-512-512-10 (ReLU, batch 1024), a CNN with two 3x3 convolutions (16 and 32
channels) on 1x28x28 images (batch 256) and a one-block transformer (``curvlab.testing``,
d_model 64, 4 heads, 32 tokens, batch 64) -- it measures the median wall time of:

1. a gradient: one forward and backward of the mean loss (``torch.autograd.grad``);
2. curvlab's ``H @ v`` (operator built once, outside the timing) for ``rev-rev`` with the kept
   first-order graph (the default for one batch), ``rev-rev`` without reuse and ``fwd-rev``;
3. baselines: plain double backward with torch.autograd (the first-order graph rebuilt for every
   product), PyHessian's cached product (``pyhessian.utils.hessian_vector_product`` on the graph
   its ``hessian`` constructor builds once) and curvlinops' ``HessianLinearOperator``, when those
   optional packages are importable;
4. curvlab's ``H @ V`` for blocks ``V (P, m)``, m = 1, 8, 32: per-vector time and products/s.

Candidates of one group are timed interleaved (round robin, rotating order) after a warm-up. The
table's medians come from one group holding every route. Each target is timed in a group of its
own, two candidates called back to back in alternating order for ``--target-rounds`` rounds (the
m = 8 pairs a quarter of them) in each of ``--processes`` fresh processes, and reported as the
median over rounds of the per-round ratio with a 95% bootstrap interval, so that the drifts of a
shared machine cancel:

- curvlab's kept-graph product against PyHessian's cached product;
- curvlab's product without reuse against a plain double backward;
- ``H @ V`` for a block of m = 8 columns against the same 8 columns as 8 calls ``H @ v``. The
  block is given with contiguous columns (``V = W.T`` for ``W (8, P)``), the layout that
  ``H @ V`` returns; a row-major block, which costs one gather per column, is reported beside it.
- a plain double backward against itself, an A/A control: how far apart two identical calls
  come out in the same design (not a target).

The blocks m = 1, 8, 32 of each route are one more group (products/s in the table). Every timing
runs with the math attention backend, which curvlab uses too (the fused CPU kernels have no double
backward). On Linux the benchmark sets glibc's malloc to keep freed memory (``mallopt``: trim
threshold 2 GiB - 1, mmap threshold 32 MiB) for every candidate alike: otherwise each product's
temporaries come back from the kernel as fresh pages (with glibc's defaults, 1,600-1,800 minor
page faults per MLP product and 11,000-12,000 per CNN product, which then took 1.5 times as long;
none with the setting), which adds noise; ``--no-malloc-tuning`` turns it off, and the JSON
records it.

Targets (CPU, ratios within one run): with graph reuse, curvlab's product is no slower than
PyHessian's cached product (expected about 1.3-2x a gradient); without reuse, curvlab's rev-rev is
no slower than plain double backward; per vector, m = 8 is no slower than m = 1.

Run ``python benchmarks/hvp.py`` (about 30 minutes on two CPU cores) or ``--quick`` for a smoke run
(under a minute, one thread). On a shared machine pass ``--threads 1``: two OpenMP threads next
to another busy process slow down erratically (up to 8x); the JSON records the other load.
Results go to ``benchmarks/results/hvp_<device>.json`` and ``.md`` (``--out`` to change); the HVP
section of ``benchmarks/README.md`` is regenerated from every full-run JSON in that folder.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvlab as cl
from curvlab.testing import TinyTransformer

HERE = Path(__file__).resolve().parent
MODELS = ("mlp", "cnn", "transformer")
BLOCKS = (1, 8, 32)
CONTROL = "control: double backward / itself"
CURVLAB = {  # label -> HessianOperator keyword arguments
    "curvlab rev-rev reuse": {"method": "rev-rev"},
    "curvlab rev-rev no reuse": {"method": "rev-rev", "reuse_graph": False},
    "curvlab fwd-rev no reuse": {"method": "fwd-rev", "reuse_graph": False},
}


class CNN(nn.Module):
    """Two 3x3 convolutions on ``(n, 1, 28, 28)`` images, then a linear head."""

    def __init__(self, c1: int = 16, c2: int = 32, d_out: int = 10) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, c1, 3), nn.Conv2d(c1, c2, 3, stride=2)
        self.head = nn.Linear(c2 * 12 * 12, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (n, 1, 28, 28)
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (n, c2, 12, 12)
        return self.head(h.flatten(1))  # (n, d_out)


def make_problem(name: str, quick: bool, device: torch.device) -> tuple[nn.Module, Any, Any, str]:
    """``(model, inputs, targets, description)``; weights and data are seeded."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if name == "mlp":
        n = 128 if quick else 1024
        model: nn.Module = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                                         nn.ReLU(), nn.Linear(512, 10))
        x, text = torch.randn(n, 784, generator=gen), "MLP 784-512-512-10 ReLU"
    elif name == "cnn":
        n = 32 if quick else 256
        model, x = CNN(), torch.randn(n, 1, 28, 28, generator=gen)
        text = "CNN conv3x3(16)-conv3x3/2(32)-linear, 1x28x28"
    else:
        n = 8 if quick else 64
        model = TinyTransformer(d_in=16, d_model=64, heads=4, d_out=10)
        x, text = torch.randn(n, 32, 16, generator=gen), "transformer d=64, 4 heads, T=32"
    y = torch.randint(0, 10, (n,), generator=gen)
    return model.to(device).eval(), x.to(device), y.to(device), f"{text}, batch {n}"


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` rounds; within a round every function runs
    once, in a rotating order, so that round ``r`` of two functions saw the same machine state."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    names, samples = list(fns), {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            samples[name].append(time.perf_counter() - start)
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def paired_ratio(num: list[float], den: list[float], scale: float = 1.0) -> dict[str, float]:
    """Median over rounds of ``num[r] / (scale * den[r])`` with a 95% bootstrap interval.

    Pairing by round cancels the slow drifts of a shared machine that separate groups of timings.
    One process's rounds: :func:`pooled_ratio` of a single run.
    """
    return pooled_ratio([{"curvlab": num, "other": [scale * d for d in den]}])


def keep_freed_memory(trim: int = 2**31 - 1, mmap: int = 1 << 25) -> dict[str, int] | None:
    """Make glibc's malloc keep freed memory instead of returning it to the kernel.

    Sets the trim threshold to ``trim`` bytes (default ``2**31 - 1``, the largest ``mallopt``
    takes: its value is a C ``int``) and the mmap threshold to ``mmap`` (default 32 MiB),
    process-wide and for every candidate alike, so that the temporaries of repeated products reuse
    pages instead of faulting fresh ones in. Returns the settings, or ``None`` where there is no
    glibc. A value that does not fit a C ``int`` raises ``ValueError`` before anything is set.

    Up to commit f89c612 the trim threshold was ``2**34``, which ctypes silently truncated to 0
    (trim on every free): every product then faulted its temporaries in again, 1,500-2,500 minor
    page faults per MLP product. Values are now checked to round-trip through a C ``int``.
    """
    settings = {"M_TRIM_THRESHOLD": trim, "M_MMAP_THRESHOLD": mmap}
    for key, value in settings.items():
        if ctypes.c_int(value).value != value:  # ctypes would truncate it without a word
            raise ValueError(f"keep_freed_memory: {key} must fit a C int (-2**31 to "
                             f"2**31 - 1), got {value}; pass a value in that range")
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or name is None:
        return None
    libc = ctypes.CDLL(name)
    codes = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}  # glibc's malloc.h
    if not all(libc.mallopt(codes[k], ctypes.c_int(v)) == 1 for k, v in settings.items()):
        return None
    return settings


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
        samples = {key: time_interleaved(pair, rounds_of(key, args.target_rounds),
                                         max(args.warmup, 5), device)
                   for key, pair in target_groups(ops, others, v, block).items()}
        release()
    return samples


def targets_in_processes(name: str, args: argparse.Namespace, device: torch.device
                         ) -> dict[str, list[dict[str, list[float]]]]:
    """``time_targets`` in ``args.processes`` fresh processes, one after another.

    What limits the pooled ratio is the noise of single rounds, not a bias per process. On this
    machine one round's ratio of two products varies with a standard deviation of 8-11% (the
    machine's speed drifts by up to 40% within a second, wall time and CPU time alike, with no
    steal time), so the median of 10 rounds varies by about 3.5% from process to process: the
    0.94-1.06 spread of the A/A control's per-process medians in the results of commit c7cb7c2.
    Measured on the transformer without reuse (4 processes of 250 rounds, commit e6ba85c), the
    spread of per-process medians was no larger than the round noise predicts, for six pairs.
    Earlier versions read that spread as a bias of each process's memory layout and ran 16
    processes of 10 rounds; a random 64 B-256 KiB heap offset before every call did not change
    the ratios either. The interval narrows with the total number of rounds, so the targets now
    run in 8 processes of 40 rounds (the m = 8 groups 10, see :func:`rounds_of`), twice the
    rounds of before in less time. The A/A control (``CONTROL``) measures in every run how far
    apart two identical calls come out.
    """
    runs: dict[str, list[dict[str, list[float]]]] = {}
    for k in range(args.processes):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "targets.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--targets-of", name,
                   "--out", str(out), "--device", str(device),
                   "--target-rounds", str(args.target_rounds), "--warmup", str(args.warmup)]
            cmd += ["--quick"] * args.quick + ["--no-malloc-tuning"] * args.no_malloc_tuning
            cmd += ["--threads", str(torch.get_num_threads())]
            print(f"  targets of {name}: process {k + 1} of {args.processes}", file=sys.stderr,
                  flush=True)
            subprocess.run(cmd, check=True)
            for key, samples in json.loads(out.read_text()).items():
                runs.setdefault(key, []).append(samples)
    return runs


def pooled_ratio(runs: list[dict[str, list[float]]]) -> dict[str, float]:
    """Median per-round ratio ``curvlab / other`` over the rounds of every process, with a 95%
    interval from a two-level bootstrap (processes with replacement, then rounds within each),
    so that the interval includes the variation between processes."""
    ratios = [np.asarray(r["curvlab"]) / np.asarray(r["other"]) for r in runs]  # each (rounds,)
    rng = np.random.default_rng(0)
    boot = np.empty(2000)
    for b in range(boot.size):
        picked = rng.integers(len(ratios), size=len(ratios))
        boot[b] = np.median(np.concatenate([rng.choice(ratios[i], ratios[i].size)
                                            for i in picked]))
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"median": float(np.median(np.concatenate(ratios))), "low": float(low),
            "high": float(high)}


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
        s1 = time_interleaved(fns, args.repeats, args.warmup, device)
        blocks_s = {}  # label -> m -> samples; m = 1, 8, 32 of one route timed in the same rounds
        for label, op in ops.items():
            sm = time_interleaved({str(m): (lambda op=op, V=blocks[m]: op @ V) for m in BLOCKS},
                                  args.repeats, args.warmup, device)
            blocks_s[label] = sm
        release()
    del others, fns  # the graphs go before the target processes start
    ops = dict.fromkeys(ops)  # the labels only
    targets = targets_in_processes(name, args, device)  # key -> one sample dict per process
    t1 = {label: median(x) for label, x in s1.items()}
    per_call = {label: {m: median(blocks_s[label][str(m)]) for m in BLOCKS} for label in ops}
    grad = t1["gradient"]
    ratios = {f"{label} / gradient": t / grad for label, t in t1.items() if label != "gradient"}
    paired = {key: pooled_ratio(runs) for key, runs in targets.items()}
    for label in ops:
        for m in BLOCKS[1:]:
            paired[f"{label} per vector m={m} / m=1"] = paired_ratio(
                blocks_s[label][str(m)], blocks_s[label]["1"], scale=m)
    ratios.update({key: q["median"] for key, q in paired.items()})
    return {
        "description": text, "num_params": P, "batch": int(y.shape[0]),
        "median_s": {label: t for label, t in t1.items() if label not in ops},
        "curvlab_median_s_per_call": {lab: {str(m): t for m, t in d.items()}
                                      for lab, d in per_call.items()},
        "per_vector_s": {lab: {str(m): t / m for m, t in d.items()} for lab, d in per_call.items()},
        "products_per_s": {lab: {str(m): m / t for m, t in d.items()}
                           for lab, d in per_call.items()},
        "ratios": ratios, "paired_ratios": paired,
        "target_median_s": {key: {side: median([t for run in runs for t in run[side]])
                                  for side in ("curvlab", "other")}
                            for key, runs in targets.items()},
        "target_ratio_per_process": {key: [paired_ratio(run["curvlab"], run["other"])["median"]
                                           for run in runs] for key, runs in targets.items()},
        "relative_difference_to_curvlab_reuse": rel_diff,
    }


def busy_seconds() -> tuple[float, float, float] | None:
    """``(wall, CPU seconds busy on the machine incl. steal, CPU seconds of this process)``."""
    try:
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    own = os.times()  # with the finished subprocesses it started (memory runs, ranks)
    return time.perf_counter(), busy, own.user + own.system + own.children_user + \
        own.children_system


def other_load(start: tuple[float, float, float] | None) -> float | None:
    """Average number of cores busy with other work (other processes, steal) since ``start``."""
    end = busy_seconds()
    if start is None or end is None:
        return None
    wall, busy, own = (b - a for a, b in zip(start, end, strict=True))
    return max(0.0, busy - own) / wall


def environment(device: torch.device) -> dict[str, Any]:
    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
        models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        name = models[0] if models else platform.processor() or platform.machine()
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "device_name": name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None
        else None,
    }


def verdict(q: dict[str, float] | None) -> str:
    """A paired ratio against the target <= 1: met, not distinguishable from 1, or missed."""
    if q is None:
        return "n/a"
    if q["median"] <= 1:
        return "yes"
    return "within noise" if q["low"] <= 1 else "no"


def fmt(q: dict[str, float] | None) -> str:
    if q is None:
        return "n/a"
    return f"{q['median']:.3f} [{q['low']:.3f}, {q['high']:.3f}] ({verdict(q)})"


def header(result: dict[str, Any], detail: str) -> list[str]:
    """The machine and run lines that open every benchmark's table."""
    env = result["environment"]
    load = env.get("other_load_cores_during_run")
    return [f"### {env['device']}: {env['device_name']}",
            f"torch {env['torch']}, Python {env['python']}, {env['torch_threads']} threads, "
            f"{env['date']}, commit {(env['git_commit'] or '?')[:10]}, {detail}; other load "
            "during the run: " + (f"{load:.2f} cores." if load is not None else "not measured."),
            ""]


def markdown(result: dict[str, Any]) -> str:
    """The tables of one run: times per model and route, then the targets."""
    lines = [*header(result, f"median of {result['settings']['repeats']} repeats"),
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
              "over all rounds of the per-round ratio with a 95% interval from a bootstrap "
              "over processes and rounds (target <= 1; \"within noise\": the median is above 1 "
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
        lines.append(f"| {name} | " + " | ".join(fmt(q.get(k)) for k in keys) + " | "
                     + (fmt(control).rsplit(" (", 1)[0] if control else "n/a") + " |")
    lines += ["", "Not targets: a row-major m = 8 block (one strided gather per column) against "
              "8 single products, reuse; and the per-vector time at m = 8 over m = 1 from the "
              "blocks group (medians of different rounds):", "",
              "| model | row-major m=8 block / 8 single | per vector m=8 / m=1: reuse | no reuse "
              "| fwd-rev |", "|---|---|---|---|---|"]
    for name, r in result["models"].items():
        q = r["paired_ratios"]
        cells = [q.get("reuse: m=8 row-major block / 8 single products"),
                 *(q[f"{label} per vector m=8 / m=1"] for label in CURVLAB)]
        lines.append(f"| {name} | " + " | ".join(fmt(c) for c in cells) + " |")
    differ = [f"{label} on {name} ({d:.1e})" for name, r in result["models"].items()
              for label, d in r["relative_difference_to_curvlab_reuse"].items() if d > 1e-4]
    lines += ["", "Products differing from curvlab's rev-rev by a relative 2-norm above 1e-4: "
              + (", ".join(differ) if differ else "none") + "."]
    return "\n".join(lines) + "\n"


def save(result: dict[str, Any], start: Any, out: Path, markdown_of: Callable[[dict], str],
         write_readme: Callable[[], None]) -> None:
    """Record the other load since ``start``, write ``out`` (JSON) and its ``.md`` table, print
    the table, and refresh the README section when ``out`` is a full run in ``results/``."""
    # Other work on the machine during the run; well above 0.1 cores makes the timings noisy.
    result["environment"]["other_load_cores_during_run"] = other_load(start)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown_of(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    if out.resolve().parent == (HERE / "results").resolve() and not result["settings"]["quick"]:
        write_readme()


def write_section(name: str, title: str, intro: str, markdown_of: Callable[[dict], str]) -> None:
    """Regenerate one benchmark's section of benchmarks/README.md from every full-run
    ``results/<name>_*.json``; other sections are kept (markers ``<!-- <name>.py:start -->``
    and ``<!-- <name>.py:end -->``)."""
    runs = [json.loads(p.read_text()) for p in sorted((HERE / "results").glob(f"{name}_*.json"))]
    body = "\n".join(markdown_of(r) for r in runs if not r["settings"]["quick"])
    start, end = f"<!-- {name}.py:start -->", f"<!-- {name}.py:end -->"
    section = f"{start}\n## {title}\n\n{intro}\n\n{body}{end}\n"
    readme = HERE / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    readme.write_text(text)


def write_readme() -> None:
    write_section("hvp", "Hessian-vector products",
                  "Generated by `benchmarks/hvp.py` from `results/hvp_<device>.json`; rerun with "
                  "`python benchmarks/hvp.py` (options: `--device`, `--repeats`, `--threads`, "
                  "`--quick`, `--out`). Ratios compare timings of one run, paired by round.",
                  markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 25; 3)")
    parser.add_argument("--target-rounds", type=int, default=None,
                        help="rounds of each target pair in each process (default 40; 3); the "
                        "m = 8 pairs take a quarter of them")
    parser.add_argument("--processes", type=int, default=None,
                        help="fresh processes that time the targets (default 8; 1 with --quick)")
    parser.add_argument("--targets-of", choices=MODELS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc's malloc as it is (see keep_freed_memory)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's; 1 with --quick)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/hvp_<device>[_quick].json)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 25)
    args.target_rounds = args.target_rounds or (3 if args.quick else 40)
    args.processes = args.processes or (1 if args.quick else 8)
    malloc = None if args.no_malloc_tuning else keep_freed_memory()
    device = torch.device(args.device)
    if args.threads or args.quick:  # a smoke run must not stall next to other work
        torch.set_num_threads(args.threads or 1)
    if args.targets_of:  # a child of targets_in_processes
        args.out.write_text(json.dumps(time_targets(args.targets_of, args, device)))
        return
    suffix = "_quick" if args.quick else ""
    out = args.out or HERE / "results" / f"hvp_{device.type}{suffix}.json"
    models, start = {}, busy_seconds()
    for name in args.models:
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        models[name] = bench_model(name, args, device)
    result = {"settings": {"repeats": args.repeats, "target_rounds": args.target_rounds,
                           "target_processes": args.processes,
                           "malloc": malloc, "warmup": args.warmup, "quick": args.quick,
                           "blocks": list(BLOCKS), "dtype": "float32", "models": args.models},
              "environment": environment(device), "models": models}
    save(result, start, out, markdown, write_readme)


if __name__ == "__main__":
    main()
