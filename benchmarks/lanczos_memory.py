"""Peak memory of ``curvlab.lanczos`` against the number of parameters P.

Random-init ``transformers.GPT2LMHeadModel`` models from configs (float32, eval mode, eager
attention: double backward needs the math path; nothing downloaded) of about 1M, 10M, 30M and
124M parameters (the last is GPT-2 small), with 2 sequences of 32 random tokens from a seeded
``torch.Generator`` and the next-token cross-entropy of the logits (labels: the input tokens,
shifted by one inside the loss). The operator is ``cl.HessianOperator(model, loss, batch)``
(default route: rev-rev with the kept first-order graph).

Every measurement runs in a fresh process (this script with ``--child``), which builds the model,
data and operator, runs ``gc.collect()``, reads the baseline RSS (``VmRSS`` of
``/proc/self/status``), resets the peak (writing ``5`` to ``/proc/self/clear_refs`` sets
``VmHWM`` to the current RSS) and reports ``VmHWM`` minus the baseline after:

- "product": one ``H @ v`` with a random float32 ``v (P,)`` made before the baseline: the
  workspace ``W`` of one product (its output included);
- "lanczos": ``cl.lanczos(H, k, tol=1e-12, max_iters=m, basis_dtype=...)``, a tolerance that
  cannot be met, so that it takes exactly ``m`` steps (checked: ``num_matvecs == m``). The
  operator is passed through a transparent wrapper that also reads ``VmHWM`` after each product
  (reported as the peak through the last product, i.e. before the eigenvectors are formed).

The module docstring of ``curvlab/linalg/lanczos.py`` states that the basis holds ``m + 1``
vectors ``(P,)`` while iterating and at most ``max(m + 1, 2 k)`` while the ``k`` eigenvectors are
formed over it in place, besides one product's workspace. Checked here (the issue's acceptance,
for a float32 basis): the peak above the baseline is at most ``(m + 4) * b * P + W`` bytes,
with ``b = 4`` for a float32 basis (and ``b = 8`` for the float64 default, for contrast) and
``W`` from the product's own process,
measured the same way. What glibc's malloc keeps resident after a product has returned (reported
as "retained") is in neither ``W`` nor the basis but stays in the RSS while the eigenvectors are
formed; as a diagnostic, the models up to 30M are measured once more (product and float32
``k = 5``) with ``MALLOC_MMAP_THRESHOLD_=65536``, which returns every freed block above 64 KiB
to the kernel at once.

Run ``python3 benchmarks/lanczos_memory.py`` (27 minutes on two cores with another process busy on
one of them; the times in the table are not benchmarks) or ``--quick`` (the 1M model: one product,
float32 k = 1 and 5; under a minute on an idle machine, 1.4 minutes on that one). Results go to
``benchmarks/results/lanczos_memory_cpu.json`` and ``.md``; a full run regenerates the "Lanczos
peak memory" section of ``benchmarks/README.md`` (``--out`` writes elsewhere, without it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # curvlab from this checkout, when not installed
import harness as h  # noqa: E402
from problems import allow_model_libraries, lm_loss  # noqa: E402

import curvlab as cl  # noqa: E402

THREADS = 2
SEQUENCES, TOKENS = 2, 32
TOL = 1e-12  # below float32 rounding: never met, so lanczos takes exactly max_iters steps
MODELS: dict[str, dict[str, int]] = {  # GPT2Config arguments
    "gpt2-1m": {"n_embd": 128, "n_layer": 4, "n_head": 4, "vocab_size": 2048,
                "n_positions": 64},
    "gpt2-10m": {"n_embd": 256, "n_layer": 10, "n_head": 4, "vocab_size": 8192,
                 "n_positions": 64},
    "gpt2-30m": {"n_embd": 512, "n_layer": 8, "n_head": 8, "vocab_size": 8192,
                 "n_positions": 64},
    "gpt2-124m": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
                  "n_positions": 1024},
}
BYTES = {"float32": 4, "float64": 8}
# glibc's malloc: its defaults (a dynamic mmap threshold, up to 32 MiB, so that freed blocks
# below it stay in the heap) and, as a diagnostic, a fixed 64 KiB threshold (every larger block
# is its own mapping, returned to the kernel when freed).
MALLOC: dict[str, dict[str, str]] = {"default": {}, "mmap64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def grid(quick: bool) -> list[dict[str, Any]]:
    """The measurements, in order: per model and malloc setting one product, then the Lanczos
    runs (the fixed-mmap diagnostic: float32, the largest k, models up to 30M only)."""
    runs: list[dict[str, Any]] = []
    for name in ("gpt2-1m",) if quick else tuple(MODELS):
        big = name == "gpt2-124m"
        m, ks = (6, (1, 5)) if big else (10, (1, 5) if quick else (1, 2, 3, 4, 5))
        base = {"model": name, "malloc": "default"}
        runs.append({**base, "kind": "product"})
        runs += [{**base, "kind": "lanczos", "basis": "float32", "k": k, "m": m} for k in ks]
        if not quick:
            runs.append({**base, "kind": "lanczos", "basis": "float64", "k": 1, "m": m})
        if not big and not quick:
            diag = {**base, "malloc": "mmap64k"}
            runs += [{**diag, "kind": "product"},
                     {**diag, "kind": "lanczos", "basis": "float32", "k": ks[-1], "m": m}]
    return runs


def build(name: str) -> tuple[torch.nn.Module, tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """A seeded random-init GPT-2 of the named size (float32, eval) and its batch."""
    allow_model_libraries()
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(**MODELS[name], bos_token_id=0, eos_token_id=0,
                                     attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (SEQUENCES, TOKENS), generator=g)
    return model, ({"input_ids": ids}, ids)


def proc_status(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssFile``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return 1024 * int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> None:
    """Set ``VmHWM`` to the current RSS (Linux: ``5`` in ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Probe:
    """``H`` as it is, reading ``VmHWM`` after each product (no memory of its own)."""

    def __init__(self, H: Any) -> None:
        self.H, self.shape, self.dtype, self.device = H, H.shape, H.dtype, H.device
        self.hwm: list[int] = []

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        out = self.H @ v
        self.hwm.append(proc_status("VmHWM"))
        return out


def child(config: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process; see the module docstring."""
    torch.set_num_threads(config["threads"])
    model, batch = build(config["model"])
    H = cl.HessianOperator(model, lm_loss, batch)
    P = H.shape[0]
    v = torch.randn(P, generator=torch.Generator().manual_seed(1))  # float32, before baseline
    probe = Probe(H)
    gc.collect()
    files = proc_status("RssFile")
    baseline = proc_status("VmRSS")
    reset_peak()
    after_reset = proc_status("VmHWM")
    start = time.perf_counter()
    out: dict[str, Any] = {}
    if config["kind"] == "product":
        w = H @ v
        del w
    else:
        res = cl.lanczos(probe, config["k"], tol=TOL, max_iters=config["m"],
                         basis_dtype=getattr(torch, config["basis"]),
                         generator=torch.Generator().manual_seed(0))
        out = {"num_matvecs": res.num_matvecs, "eigenvalues": res.eigenvalues.tolist(),
               "iteration_peak_bytes": probe.hwm[-1] - baseline}
        del res
    seconds = time.perf_counter() - start
    hwm = proc_status("VmHWM")
    gc.collect()
    return {**config, "P": P, "baseline_bytes": baseline, "hwm_after_reset_bytes": after_reset,
            "hwm_bytes": hwm, "peak_bytes": hwm - baseline, "seconds": seconds,
            "rss_retained_bytes": proc_status("VmRSS") - baseline,
            "rss_file_growth_bytes": proc_status("RssFile") - files, **out}


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """Run ``config`` in a fresh process and return its JSON line."""
    env = {**os.environ, **MALLOC[config["malloc"]]}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                           json.dumps(config)], capture_output=True, text=True, check=False,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {config} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evaluate(row: dict[str, Any], W: int) -> dict[str, Any]:
    """Add the bound ``(m + 4) b P + W`` and the basis's share to a Lanczos row."""
    P, m, k, b = row["P"], row["m"], row["k"], BYTES[row["basis"]]
    bound = (m + 4) * b * P + W
    return {**row, "W_bytes": W, "bound_bytes": bound, "met": row["peak_bytes"] <= bound,
            "margin_bytes": bound - row["peak_bytes"],
            "matvecs_ok": row["num_matvecs"] == m,
            "basis_share_per_param": (row["peak_bytes"] - W) / P,
            "expected_iterating_per_param": (m + 1) * b, "expected_final_per_param": (m + k) * b}


def verdicts(rows: list[dict[str, Any]]) -> str:
    """The acceptance line: float32 basis, glibc's default malloc."""
    runs = [r for r in rows if r["basis"] == "float32" and r["malloc"] == "default"]
    bad = [r for r in runs if not r["met"]]
    text = (f"Acceptance (float32 basis, default malloc: peak <= (m+4) x 4 P + W): met in "
            f"{len(runs) - len(bad)} of {len(runs)} runs.")
    if bad:
        text += " Not met: " + "; ".join(f"{r['model']} k={r['k']} m={r['m']} by "
                                         f"{-r['margin_bytes'] / r['P']:.2f} B/P "
                                         f"({-r['margin_bytes'] / 2**20:.1f} MiB)" for r in bad)
        text += "."
    off = [r for r in rows if not r["matvecs_ok"]]
    return text + (" Every run took exactly m products." if not off else
                   f" {len(off)} runs did not take exactly m products (see the table).")


def markdown(result: dict[str, Any]) -> str:
    """The tables: one row per Lanczos run, then the products; bytes per parameter."""
    s = result["settings"]
    lines = [*h.header(result, f"{s['sequences']} sequences of {s['tokens']} tokens, float32 "
                             f"model, tol {s['tol']:g}; bytes per parameter (B/P)"),
             "| model | P | malloc | basis | k | m | products | W | peak | peak through last "
             "product | bound (m+4) b + W | met | (peak - W) / P | expected (m+1) b / (m+k) b "
             "| s |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in result["rows"]:
        P = r["P"]
        lines.append(
            f"| {r['model']} | {P:,} | {r['malloc']} | {r['basis']} | {r['k']} | {r['m']} "
            f"| {r['num_matvecs']} | {r['W_bytes'] / P:.2f} | {r['peak_bytes'] / P:.2f} "
            f"| {r['iteration_peak_bytes'] / P:.2f} | {r['bound_bytes'] / P:.2f} "
            f"| {'met' if r['met'] else 'NOT met'} | {r['basis_share_per_param']:.2f} "
            f"| {r['expected_iterating_per_param']} / {r['expected_final_per_param']} "
            f"| {r['seconds']:.1f} |")
    lines += ["", "One product in its own process (W: its peak; retained: RSS above the baseline "
              "after it returned and its result was freed):", "",
              "| model | P | malloc | W B/P | W MiB | retained MiB | s |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for r in result["products"].values():
        lines.append(f"| {r['model']} | {r['P']:,} | {r['malloc']} "
                     f"| {r['peak_bytes'] / r['P']:.2f} | {r['peak_bytes'] / 2**20:.1f} "
                     f"| {r['rss_retained_bytes'] / 2**20:.1f} | {r['seconds']:.1f} |")
    lines += ["", "Peak: VmHWM above the RSS just before the call (after building the operator and "
              "its kept first-order graph), each run in a fresh process; W: one product's peak "
              "measured the same way in its own process; malloc `mmap64k`: "
              "`MALLOC_MMAP_THRESHOLD_=65536` (a diagnostic: freed blocks above 64 KiB go back "
              "to the kernel at once). " + verdicts(result["rows"]),
              f"Total run time {s['total_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def write_readme() -> None:
    h.write_section("lanczos_memory", "Lanczos peak memory",
                    "Generated by `benchmarks/lanczos_memory.py`; rerun with "
                    "`python3 benchmarks/lanczos_memory.py`.", markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     parents=[h.options(device=False, threads=False)])
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (2)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    torch.set_num_threads(args.threads)
    start, t0 = h.busy_seconds(), time.perf_counter()
    rows, W = [], {}
    for config in grid(args.quick):
        config["threads"] = args.threads
        print(f"{config} ...", file=sys.stderr, flush=True)
        row = measure(config)
        if config["kind"] == "product":
            W[f"{config['model']} {config['malloc']}"] = row
        else:
            rows.append(evaluate(row, W[f"{config['model']} {config['malloc']}"]["peak_bytes"]))
            print(f"  peak {row['peak_bytes'] / row['P']:.2f} B/P, bound "
                  f"{rows[-1]['bound_bytes'] / row['P']:.2f} B/P", file=sys.stderr, flush=True)
    result = {"settings": {"quick": args.quick, "sequences": SEQUENCES, "tokens": TOKENS,
                           "tol": TOL, "threads": args.threads, "models": MODELS,
                           "malloc": MALLOC,
                           "loss": "next-token cross-entropy, labels = inputs shifted by one",
                           "total_s": time.perf_counter() - t0},
              "environment": h.environment("cpu"), "products": W, "rows": rows}
    h.save(result, start, h.out_path(args, "lanczos_memory"), markdown, write_readme)


if __name__ == "__main__":
    main()
