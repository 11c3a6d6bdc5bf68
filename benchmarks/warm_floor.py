"""The floor of warm-started tracking: how few products can a measurement take at all?

``monitor.py`` reports, for each warm measurement of a tracking run, the oracle: the fewest
products after which the space built from that run's warm block holds the top eigenvalue to tol.
This script asks the same of the best warm information there could be. At each measured step
``t`` of a training run it computes the top two eigenpairs of the probe Hessian ``H(t)`` to 1e-6
(Lanczos), and, for measurements ``every`` steps apart, the fewest products from the *exact*
eigenvectors of ``H(t - every)``:

- ``[u1]``: the previous top eigenvector alone. ``subspace_eigs`` then builds the Krylov space
  ``K_n(H(t), u1)``, and no polynomial method (Lanczos, power iteration, Chebyshev) started from
  ``u1`` gets closer in ``n`` products: this is the Krylov floor of a warm start;
- ``[u1, u2]``: the previous top two;
- ``[u1, g]``: the top eigenvector and the probe gradient at ``t`` (the gradient lies mostly in
  the top Hessian eigenspace, Gur-Ari et al. 2018, arXiv:1812.04754; its product is counted).

It also runs the stopping rule itself (``subspace_eigs`` at tol from ``[u1, u2]``) and reports its
products and true errors, and the median relative change of the top eigenvalue between
measurements, which is what the warm start has to make up.

Models (float32, fixed seeds): ``mlp`` and ``gpt`` of ``monitor.py`` (full-batch GD; AdamW on one
fixed batch of random tokens, which the model memorizes), and ``gpt_stream``: the same GPT-2
trained by AdamW with a 20-step linear warm-up on a fresh batch every step from a fixed bigram
language (512 tokens, 8 successors each), measured on a fixed probe batch of 4 sequences.

Run ``python benchmarks/warm_floor.py`` (about 15 minutes on two cores; ``--quick`` for a smoke
run). Results: ``results/warm_floor_cpu.json`` and ``.md``, and the section of
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import harness as h
import monitor
import torch

import curvlab as cl
from curvlab.batches import first_examples

TOL = monitor.TOL
EVERY = {"mlp": (10,), "gpt": (2, 10), "gpt_stream": (2, 10)}
STARTS = ("u1", "u1_u2", "u1_g")


def bigram_language(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random bigram language: ``succ (vocab, 8)`` successors and their weights."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 8), generator=g)  # (V, 8)
    weights = torch.distributions.Dirichlet(torch.ones(8)).sample((vocab,))  # (V, 8)
    return succ, weights


def sample(lang: tuple[torch.Tensor, torch.Tensor], n: int, T: int,
           g: torch.Generator) -> torch.Tensor:
    """``(n, T)`` token ids drawn from the bigram language."""
    succ, weights = lang
    ids = torch.empty(n, T, dtype=torch.long)  # (n, T)
    ids[:, 0] = torch.randint(0, succ.shape[0], (n,), generator=g)
    for t in range(1, T):
        pick = torch.multinomial(weights[ids[:, t - 1]], 1, generator=g)[:, 0]  # (n,)
        ids[:, t] = succ[ids[:, t - 1], pick]
    return ids


def make(name: str, quick: bool) -> dict[str, Any]:
    """``monitor.make``'s problem, with ``next_batch`` (the training batch of a step) and
    ``probe`` (the batch the Hessian is measured on)."""
    problem = monitor.make("mlp" if name == "mlp" else "gpt", quick)
    problem["probe"] = first_examples(problem["batch"], problem["probe_size"], "warm_floor")[0]
    problem["next_batch"] = lambda: problem["batch"]
    problem["schedule"] = None
    if name == "gpt_stream":
        n, T = problem["batch"][0].shape
        lang, g = bigram_language(512), torch.Generator().manual_seed(1)
        ids = sample(lang, problem["probe_size"], T, torch.Generator().manual_seed(2))
        problem["probe"] = (ids, ids)

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            batch = sample(lang, n, T, g)  # (n, T)
            return batch, batch

        problem["next_batch"] = next_batch
        problem["schedule"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 20))
        problem["text"] = (f"GPT-2 2 layers d 128, a fresh {n} x {T} bigram batch per step, "
                           "AdamW lr 1e-3, 20-step warm-up")
    return problem


def probe_operator(problem: dict[str, Any], model: torch.nn.Module) -> Any:
    return cl.HessianOperator(model, problem["loss"], problem["probe"])


def probe_gradient(problem: dict[str, Any], model: torch.nn.Module) -> torch.Tensor:
    """``(P,)`` the gradient of the probe loss, in the operator's parameter order."""
    model.zero_grad(set_to_none=True)
    monitor.forward({**problem, "batch": problem["probe"]}, model).backward()
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return torch.cat(grads).detach()


def reference(problem: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """The top two eigenpairs of the probe Hessian now, to 1e-6 (eval mode)."""
    model.eval()
    ref = cl.lanczos(probe_operator(problem, model), 2, tol=1e-6, max_iters=200, keep=2,
                     generator=torch.Generator().manual_seed(1))
    model.train()
    return {"value": ref.eigenvalues[0].item(), "vectors": ref.eigenvectors}  # vectors (P, 2)


def floors(problem: dict[str, Any], model: torch.nn.Module, now: dict[str, Any],
           before: dict[str, Any]) -> dict[str, Any]:
    """From the exact eigenvectors of the reference ``before`` (``every`` steps back): the
    fewest products per start, and the stopping rule's products and true error."""
    u = before["vectors"]  # (P, 2)
    model.eval()
    blocks = {"u1": u[:, :1], "u1_u2": u,
              "u1_g": torch.stack([u[:, 0], probe_gradient(problem, model)], 1)}  # (P, j)
    probe_problem = {**problem, "batch": problem["probe"],
                     "probe_size": problem["probe"][0].shape[0]}
    floor = {s: monitor.fewest_products(probe_problem, model, blocks[s], now["value"])
             for s in STARTS}  # leaves the model in train mode
    model.eval()
    rule = cl.subspace_eigs(probe_operator(problem, model), 1, start=u, tol=TOL,
                            basis_dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    model.train()
    value = now["value"]
    return {"floor": floor, "rule_matvecs": rule.num_matvecs,
            "rule_error": abs(rule.eigenvalues[0].item() - value) / abs(value),
            "change": abs(value - before["value"]) / abs(value), "value": value}


def run(name: str, quick: bool, steps: int, spacing: list[int] | None = None) -> dict[str, Any]:
    problem = make(name, quick)
    model = problem["model"]
    opt = problem["opt"](model)
    schedule = problem["schedule"](opt) if problem["schedule"] else None
    every = spacing or (EVERY[name][:2] if quick else EVERY[name])
    every = [e for e in every if e <= steps]
    refs = {0: reference(problem, model)}
    rows: dict[int, list[dict[str, Any]]] = {e: [] for e in every}
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        monitor.forward({**problem, "batch": problem["next_batch"]()}, model).backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        due = [e for e in every if step % e == 0]
        if not due:
            continue
        refs[step] = reference(problem, model)
        for e in due:
            rows[e].append(floors(problem, model, refs[step], refs[step - e]))
        for old in [s for s in refs if s < step - max(every) + 1]:
            del refs[old]
        print(f"{name} step {step}: {refs[step]['value']:.4g}", file=sys.stderr, flush=True)
    return {"text": problem["text"], "every": {str(e): summarize(rows[e]) for e in every},
            "rows": {str(e): rows[e] for e in every}}


def median_of(values: list[int | None]) -> float:
    return statistics.median(float("inf") if v is None else v for v in values)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"measurements": len(rows),
            "floor_median": {s: median_of([r["floor"][s] for r in rows]) for s in STARTS},
            "rule_median": statistics.median(r["rule_matvecs"] for r in rows),
            "rule_max_error": max(r["rule_error"] for r in rows),
            "change_median": statistics.median(r["change"] for r in rows)}


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [*h.header(result, f"{s['steps']} steps, tol {s['tol']:g}")]
    lines += ["| model | every | measurements | top eigenvalue change, median | floor from "
              "[u1] / [u1, u2] / [u1, g], median products | rule from [u1, u2]: median products, "
              "max true error |", "|---|---:|---:|---:|---|---|"]
    for r in result["models"].values():
        for e, m in r["every"].items():
            f = m["floor_median"]
            lines.append(f"| {r['text']} | {e} | {m['measurements']} | "
                         f"{100 * m['change_median']:.1f}% | "
                         + " / ".join(f"{f[k]:g}" for k in STARTS)
                         + f" | {m['rule_median']:g}, {m['rule_max_error']:.1e} |")
    return "\n".join(lines) + "\n"


def write_readme() -> None:
    h.write_section("warm_floor", "The floor of warm-started tracking",
                    "Generated by `benchmarks/warm_floor.py`; rerun with "
                    "`python benchmarks/warm_floor.py`. Floor: the fewest products after which the "
                    "space built from the exact eigenvectors of the previous measurement holds "
                    "the top eigenvalue to tol (1e-3); `[u1]` is the Krylov floor of every "
                    "polynomial method started from the previous top vector. Rule: "
                    "`subspace_eigs` at tol from the previous top two.", markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     parents=[h.options(device=False)])
    parser.add_argument("--steps", type=int, default=None, help="steps (default 100; quick 10)")
    parser.add_argument("--models", nargs="+", choices=tuple(EVERY), default=list(EVERY))
    parser.add_argument("--every", nargs="+", type=int, default=None,
                        help="spacings to measure (default: per model, EVERY)")
    args = parser.parse_args(argv)
    steps = args.steps or (10 if args.quick else 100)
    h.setup(args)
    start = h.busy_seconds()
    models = {name: run(name, args.quick, steps, args.every) for name in args.models}
    result = {"settings": {"steps": steps, "quick": args.quick, "tol": TOL,
                           "every": {k: args.every or list(EVERY[k]) for k in args.models}},
              "environment": h.environment("cpu"), "models": models}
    h.save(result, start, h.out_path(args, "warm_floor"), markdown, write_readme)


if __name__ == "__main__":
    main()
