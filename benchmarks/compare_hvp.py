"""Side by side: curvlab's default Hessian-vector product against PyHessian, curvlinops and
hessian-eigenthings (``curvlab bench hvp``).

For each model (the MLP 784-512-512-10 at batch 1024, the CNN and the one-block transformer of
``problems.py``; on CUDA also a GPT-2-small-sized transformer) and one seeded batch and vector:

1. **Agreement first.** In float64 (a copy of the model), every library's ``H v`` is compared with
   curvlab's; a library whose relative 2-norm difference exceeds 1e-8 is reported and not timed.
2. **Time.** In the run's dtype (float32 by default; ``--dtype bfloat16``), the gradient, curvlab's
   default product (``HessianOperator(model, loss, (x, y)) @ v``: reverse-over-reverse on the kept
   first-order graph), plain double backward and each library's product are timed interleaved
   (round robin, rotating order, ``harness.time_interleaved``) after a warm-up; operators and graphs
   are built outside the timing, as each library documents its use. Reported: median ms per
   product, the multiple of one gradient, products per second (also for curvlab's ``H @ V`` at
   m = 8, per vector), and curvlab's time over the fastest library's, paired by round with a 95%
   interval (order statistics; ``--stats bootstrap`` for a bootstrap), target <= 1.
3. **Peak memory** of building each method and running three products: on CPU in a fresh
   subprocess per method (``VmHWM`` after resetting it, minus the resident size before), on CUDA
   ``torch.cuda.max_memory_allocated`` minus the allocation before.

A library that is not installed (the ``compare`` extra) is reported as missing. Run
``curvlab bench hvp`` or ``python benchmarks/compare_hvp.py`` (``--quick``: small batches, 3
repeats, under two minutes). Results go to ``benchmarks/results/compare_hvp_<device>.json`` and
``.md`` (``--out`` to change); the section of ``benchmarks/README.md`` is regenerated from every
full-run JSON there.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness as h
import torch
from harness import environment
from problems import make_problem
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvlab as cl
from curvlab.testing import TransformerBlock

MODELS = ("mlp", "cnn", "transformer", "gpt2")
LIBRARIES = ("PyHessian", "curvlinops", "hessian-eigenthings")
AGREE = 1e-8  # relative 2-norm difference allowed in float64
Builder = Callable[[nn.Module, nn.Module, Any, Any, torch.Tensor], Callable[[], torch.Tensor]]


class GPT(nn.Module):
    """Token and position embeddings, ``depth`` pre-LayerNorm blocks with an MLP 4x wide, a final
    LayerNorm and a head tied to the token embedding. Inputs ``(n, T)`` token ids; outputs the
    next-token logits flattened to ``(n * T, vocab)``."""

    def __init__(self, vocab: int, d_model: int, heads: int, depth: int, context: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, heads, mlp_ratio=4)
                                    for _ in range(depth))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx (n, T)
        positions = torch.arange(idx.shape[1], device=idx.device)  # (T,)
        h = self.tok(idx) + self.pos(positions)  # (n, T, d)
        for block in self.blocks:
            h = block(h)  # (n, T, d)
        return self.head(self.ln(h)).flatten(0, 1)  # (n * T, vocab)


def problem(name: str, quick: bool, device: torch.device,
            dtype: torch.dtype) -> tuple[nn.Module, Any, Any, str]:
    """``(model, inputs, targets, description)`` in ``dtype``; the GPT is GPT-2 small's size
    (12 layers, d 768, 12 heads, vocab 50257, 124M parameters) at batch 8 x 256 tokens, or a
    2-layer toy with ``quick``."""
    if name != "gpt2":
        model, x, y, text = make_problem(name, quick, device)
        return model.to(dtype), x.to(dtype), y, text
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vocab, d, heads, depth, n, T = (256, 64, 4, 2, 4, 32) if quick else (50257, 768, 12, 12, 8, 256)
    model = GPT(vocab, d, heads, depth, context=T)
    tokens = torch.randint(0, vocab, (n, T + 1), generator=gen)  # (n, T + 1)
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].reshape(-1).to(device)  # (n, T), (n * T,)
    text = f"GPT {depth} layers, d={d}, {heads} heads, vocab {vocab}, batch {n}x{T} tokens"
    return model.to(device, dtype).eval(), x, y, text


def _flat(parts: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in parts])


def _params_and_vectors(model: nn.Module, v: torch.Tensor) -> tuple[list, list]:
    params = [p for p in model.parameters() if p.requires_grad]
    chunks = v.split([p.numel() for p in params])
    return params, [c.view_as(p) for c, p in zip(chunks, params, strict=True)]


def gradient(model: nn.Module, crit: nn.Module, x: Any, y: Any, v: torch.Tensor) -> Callable:
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda: _flat(torch.autograd.grad(crit(model(x), y), params))


def curvlab_default(model: nn.Module, crit: nn.Module, x: Any, y: Any, v: torch.Tensor) -> Callable:
    H = cl.HessianOperator(model, crit, (x, y))  # defaults: rev-rev, the graph kept
    return lambda: H @ v


def double_backward(model: nn.Module, crit: nn.Module, x: Any, y: Any, v: torch.Tensor) -> Callable:
    params, v_list = _params_and_vectors(model, v)

    def product() -> torch.Tensor:
        g = torch.autograd.grad(crit(model(x), y), params, create_graph=True)
        return _flat(torch.autograd.grad(g, params, grad_outputs=v_list))

    return product


def pyhessian(model: nn.Module, crit: nn.Module, x: Any, y: Any, v: torch.Tensor) -> Callable:
    import pyhessian
    from pyhessian.utils import hessian_vector_product

    _, v_list = _params_and_vectors(model, v)
    with warnings.catch_warnings():  # its backward(create_graph=True) warns of a grad cycle
        warnings.simplefilter("ignore", UserWarning)
        h = pyhessian.hessian(model, crit, data=(x, y), cuda=v.device.type == "cuda")  # a graph
    return lambda: _flat(hessian_vector_product(h.gradsH, h.params, v_list))


def curvlinops(model: nn.Module, crit: nn.Module, x: Any, y: Any, v: torch.Tensor) -> Callable:
    from curvlinops import HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, crit, params, [(x, y)], check_deterministic=False)
    return lambda: H @ v


def eigenthings(model: nn.Module, crit: nn.Module, x: Any, y: Any, v: torch.Tensor) -> Callable:
    import hessian_eigenthings as he

    H = he.HessianOperator(model, [(x, y)], he.supervised_loss(crit))
    return lambda: H.matvec(v)


BUILDERS: dict[str, Builder] = {
    "gradient": gradient, "curvlab (default)": curvlab_default, "double backward": double_backward,
    "PyHessian": pyhessian, "curvlinops": curvlinops, "hessian-eigenthings": eigenthings}
MODULES = {"PyHessian": "pyhessian", "curvlinops": "curvlinops",
           "hessian-eigenthings": "hessian_eigenthings"}


def installed() -> dict[str, bool]:
    found = {}
    for label, module in MODULES.items():
        try:
            __import__(module)
            found[label] = True
        except ImportError:
            found[label] = False
    return found


def release(model: nn.Module) -> None:
    model.zero_grad(set_to_none=True)  # PyHessian keeps its graph in the .grad fields


def agreement(name: str, quick: bool, labels: list[str]) -> dict[str, float]:
    """Relative 2-norm difference of each method's ``H v`` from curvlab's, in float64 on CPU."""
    model, x, y, _ = problem(name, quick, torch.device("cpu"), torch.float64)
    crit = nn.CrossEntropyLoss()
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    diffs = {}
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels lack double backward
        reference = curvlab_default(model, crit, x, y, v)()
        for label in labels:
            out = BUILDERS[label](copy.deepcopy(model), crit, x, y, v)()
            diffs[label] = float((out - reference).norm() / reference.norm())
    return diffs


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def memory_child(name: str, label: str, quick: bool, dtype: torch.dtype) -> None:
    """Print the peak resident memory (bytes) of building ``label`` and three products."""
    model, x, y, _ = problem(name, quick, torch.device("cpu"), dtype)
    crit, P = nn.CrossEntropyLoss(), sum(p.numel() for p in model.parameters())
    v = torch.randn(P, generator=torch.Generator().manual_seed(1)).to(dtype)
    with sdpa_kernel(SDPBackend.MATH):
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current size
        fn = BUILDERS[label](model, crit, x, y, v)
        for _ in range(3):
            fn()
        peak = _status_kb("VmHWM")
    print(json.dumps({"peak_bytes": 1024 * (peak - before)}))


def peak_memory(name: str, label: str, args: argparse.Namespace, device: torch.device,
                model: nn.Module, x: Any, y: Any, v: torch.Tensor) -> float | None:
    """Bytes above the starting allocation while building ``label`` and running 3 products."""
    if device.type == "cuda":
        release(model)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn = BUILDERS[label](model, nn.CrossEntropyLoss(), x, y, v)
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del fn
        release(model)
        return float(peak)
    cmd = [sys.executable, __file__, "--memory-child", name, label, "--dtype", args.dtype]
    cmd += ["--quick"] * args.quick + ["--malloc-tuning"] * getattr(args, "malloc_tuning", False)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        print(f"  memory of {label} failed: {out.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    have = installed()
    libraries = [lib for lib in LIBRARIES if have[lib]]
    diffs = agreement(name, args.quick, ["double backward", *libraries]) \
        if name != "gpt2" or args.quick else {}
    model, x, y, text = problem(name, args.quick, device, dtype)
    crit, P = nn.CrossEntropyLoss(), sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    V8 = torch.randn(P, 8, generator=gen).to(device, dtype)  # (P, 8)
    v = V8[:, 0].contiguous()  # (P,)
    timed = ["gradient", "curvlab (default)", "double backward",
             *(lib for lib in libraries if diffs.get(lib, 0.0) <= AGREE)]
    with sdpa_kernel(SDPBackend.MATH):
        fns = {label: BUILDERS[label](model, crit, x, y, v) for label in timed}
        H = cl.HessianOperator(model, crit, (x, y))
        fns["curvlab (default) H @ V, m=8"] = lambda H=H: H @ V8
        samples = h.time_interleaved(fns, args.repeats, args.warmup, device)
        del fns, H
        release(model)
        memory = {label: peak_memory(name, label, args, device, model, x, y, v)
                  for label in timed} if not args.no_memory else {}
    per_product = {label: h.median(s) / (8 if label.endswith("m=8") else 1)
                   for label, s in samples.items()}
    fastest = min((lib for lib in libraries if lib in samples), key=lambda k: per_product[k],
                  default=None)
    stats = getattr(args, "stats", "simple")  # callers may pass a bare Namespace
    target = None if fastest is None else h.paired_ratio(samples["curvlab (default)"],
                                                         samples[fastest], stats=stats)
    return {"description": text, "num_params": P, "dtype": args.dtype,
            "missing": [lib for lib in LIBRARIES if not have[lib]],
            "float64_relative_difference": diffs, "seconds_per_product": per_product,
            "x_gradient": {k: t / per_product["gradient"] for k, t in per_product.items()},
            "products_per_s": {k: 1 / t for k, t in per_product.items() if k != "gradient"},
            "summary_s_per_call": {k: h.summary(s) for k, s in samples.items()},
            "peak_memory_bytes": memory, "fastest_library": fastest,
            "curvlab_over_fastest_library": target}


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [*h.header(result, f"{s['dtype']}, median of {s['repeats']} interleaved repeats"),
             "| model | method | agrees (float64 rel. diff.) | ms per product | x gradient | "
             "products/s | peak memory MB (x gradient) |", "|---|---|---|---:|---:|---:|---:|"]
    for r in result["models"].values():
        mem, grad_mem = r["peak_memory_bytes"], r["peak_memory_bytes"].get("gradient")
        first = f"{r['description']} (P = {r['num_params']:,})"
        for label, t in r["seconds_per_product"].items():
            d = r["float64_relative_difference"].get(label)
            agree = "" if d is None else f"{'yes' if d <= AGREE else 'NO'} ({d:.0e})"
            m = mem.get(label)
            mcell = "" if m is None else f"{m / 2**20:.0f}" + (
                f" ({m / grad_mem:.1f})" if grad_mem else "")
            pps = r["products_per_s"].get(label)
            lines.append(f"| {first} | {label} | {agree} | {1e3 * t:.2f} | "
                         f"{r['x_gradient'][label]:.2f} | {'' if pps is None else f'{pps:.1f}'} "
                         f"| {mcell} |")
            first = ""
        for label, d in r["float64_relative_difference"].items():
            if d > AGREE:
                lines.append(f"| | {label} | NO ({d:.0e}): not timed | | | | |")
        for lib in r["missing"]:
            lines.append(f"| | {lib} | not installed | | | | |")
    lines += ["", "curvlab's default product over the fastest library's, paired by round "
              "(target <= 1):", ""]
    for name, r in result["models"].items():
        lines.append(f"- {name}: {r['fastest_library'] or 'no library'}: "
                     f"{h.fmt(r['curvlab_over_fastest_library'])}")
    return "\n".join(lines) + "\n"


def write_readme() -> None:
    h.write_section("compare_hvp", "Side by side: Hessian-vector products",
                    "Generated by `curvlab bench hvp` (`benchmarks/compare_hvp.py`) from "
                    "`results/compare_hvp_<device>.json`.", markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="curvlab bench hvp", description=__doc__.splitlines()[0],
                                     parents=[h.options(repeats=(15, 3), stats=True)])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None,
                        help="default: mlp cnn transformer, plus gpt2 on CUDA")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "METHOD"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    malloc = h.setup(args)
    if args.memory_child:
        return memory_child(*args.memory_child, args.quick, getattr(torch, args.dtype))
    device = torch.device(args.device)
    models = args.models or [*MODELS[:3], *(["gpt2"] if device.type == "cuda" else [])]
    out = h.out_path(args, "compare_hvp", device.type,
                     "" if args.dtype == "float32" else f"_{args.dtype}")
    start, results = h.busy_seconds(), {}
    for name in models:
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        results[name] = bench_model(name, args, device)
    result = {"settings": {"repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
                           "dtype": args.dtype, "models": models, "agree_tol": AGREE,
                           "stats": args.stats, "malloc": malloc},
              "environment": environment(device), "models": results}
    h.save(result, start, out, markdown, write_readme)


if __name__ == "__main__":
    main()
