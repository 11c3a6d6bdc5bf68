"""HVP cost on models that other libraries build: GPT-2 and BERT (transformers), a ViT (timm),
resnet18 (torchvision), and a compiled GPT-2, each as a ratio to one gradient.

Random-init models from configs, float32, eval mode, one batch (nothing downloaded):

- GPT-2 (``GPT2LMHeadModel``, d 128, 4 layers, 4 heads, vocabulary 256), 16 sequences of 64
  tokens with padding, token-mean causal-LM loss, ``weights=cl.count_tokens(shift=True)``;
- BERT (``BertForSequenceClassification``, d 128, 4 layers), 16 sequences of 64, 3 classes;
- ViT (timm ``VisionTransformer``, 32 x 32 images, patch 4, d 128, 4 layers), batch 32;
- resnet18 (torchvision, 10 classes, 11.2 M parameters), batch 16 of 64 x 64 images;
- GPT-2 through ``torch.compile`` (inductor), where ``method="auto"`` takes forward-over-reverse.

Routes, each timed per call against ``gradient`` (forward and backward of the loss) in the same
rounds (interleaved, rotating order, after warm-up): ``rev-rev reuse`` (the default for one
batch: a second backward through the kept first-order graph), ``rev-rev`` (double backward,
graph rebuilt) and ``fwd-rev`` (``jvp`` of ``grad``). Reported: median ms and the median over
rounds of the per-round ratio to the gradient, with a 95% interval (order statistics;
``--stats bootstrap`` for a bootstrap).

Run ``python benchmarks/real_models.py`` (a few minutes on two cores; ``--quick`` for a smoke run).
Results go to ``benchmarks/results/real_models_cpu.json`` and ``.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

import harness as h
import torch
import torch.nn.functional as F
from problems import allow_model_libraries, lm_loss

import curvlab as cl


def build(name: str, quick: bool) -> tuple[torch.nn.Module, Any, Any, dict[str, Any]]:
    """``(model, loss_fn, batch, operator kwargs)`` with seeded weights and data."""
    allow_model_libraries()
    import timm
    import torchvision
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, T, d, layers = (4, 16, 32, 2) if quick else (16, 64, 128, 4)
    if name.startswith("gpt2"):
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=256, n_positions=T, n_embd=d, n_layer=layers, n_head=4, bos_token_id=0,
            eos_token_id=0))
        ids = torch.randint(1, 256, (n, T), generator=g)
        mask = (torch.arange(T)[None] < torch.randint(T // 2, T + 1, (n, 1), generator=g)).long()
        batch = ({"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100))
        extra = {"weights": cl.count_tokens(shift=True)}
        if name == "gpt2-compiled":
            model = torch.compile(model)
        return model.eval(), lm_loss, batch, extra
    if name == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=256, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=4 * d, max_position_embeddings=T, num_labels=3))
        ids = torch.randint(1, 256, (n, T), generator=g)
        batch = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                 torch.randint(0, 3, (n,), generator=g))
        return model.eval(), F.cross_entropy, batch, {}
    if name == "vit":
        model = timm.models.VisionTransformer(img_size=32, patch_size=4, num_classes=10,
                                              embed_dim=d, depth=layers, num_heads=4)
        batch = (torch.randn(2 * n, 3, 32, 32, generator=g), torch.randint(0, 10, (2 * n,),
                                                                           generator=g))
        return model.eval(), F.cross_entropy, batch, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.resnet18(num_classes=10)
    side = 32 if quick else 64
    batch = (torch.randn(n, 3, side, side, generator=g), torch.randint(0, 10, (n,), generator=g))
    return model.eval(), F.cross_entropy, batch, {}


MODELS = ("gpt2", "bert", "vit", "resnet18", "gpt2-compiled")


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model, loss_fn, batch, extra = build(name, args.quick)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs, targets = batch

    def gradient() -> Any:
        out = cl.batches.pick_output(cl.batches.call_model(model, inputs))
        return torch.autograd.grad(loss_fn(out, targets), params)

    routes: dict[str, Any] = {"gradient": gradient}
    compiled = name.endswith("compiled")
    P = sum(p.numel() for p in params)
    v = torch.randn(P, generator=torch.Generator().manual_seed(1))
    for route, kw in (("rev-rev reuse", {"method": "rev-rev", "reuse_graph": True}),
                      ("rev-rev", {"method": "rev-rev", "reuse_graph": False}),
                      ("fwd-rev", {"method": "fwd-rev"}), ("auto", {})):
        if compiled and route.startswith("rev-rev"):
            continue  # aot_autograd has no double backward
        H = cl.HessianOperator(model, loss_fn, batch, **kw, **extra)
        routes[route] = lambda H=H: H @ v
        if route == "auto":
            method = H.method
    samples = h.time_interleaved(routes, args.repeats, args.warmup)
    rows = {r: {"ms": 1e3 * h.median(s), "summary_s": h.summary(s),
                "x_gradient": h.paired_ratio(s, samples["gradient"], stats=args.stats)}
            for r, s in samples.items()}
    return {"P": P, "auto_method": method, "routes": rows}


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [*h.header(result, f"float32, {s['repeats']} interleaved rounds after {s['warmup']} "
                             "warm-up"),
             "| model | P | `auto` takes | route | ms per product | x gradient [95% CI] |",
             "|---|---:|---|---|---:|---|"]
    for name, r in result["models"].items():
        for i, (route, row) in enumerate(r["routes"].items()):
            q = row["x_gradient"]
            first = (f"{name} | {r['P']:,} | {r['auto_method']}" if i == 0 else " | |")
            lines.append(f"| {first} | {route} | {row['ms']:.2f} | {q['median']:.2f} "
                         f"[{q['low']:.2f}, {q['high']:.2f}] |")
    return "\n".join(lines) + "\n"


def write_readme() -> None:
    h.write_section("real_models", "Products on models from transformers, timm and torchvision",
                    "Generated by `benchmarks/real_models.py`; rerun with "
                    "`python benchmarks/real_models.py`.", markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     parents=[h.options(repeats=(15, 3), device=False, stats=True)])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    args = parser.parse_args(argv)
    malloc = h.setup(args)
    start = h.busy_seconds()
    models = {}
    for name in args.models.split(","):
        print(f"{name} ...", file=sys.stderr, flush=True)
        models[name] = bench_model(name, args)
    result = {"settings": {"repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
                           "stats": args.stats, "malloc": malloc},
              "environment": h.environment("cpu"), "models": models}
    h.save(result, start, h.out_path(args, "real_models"), markdown, write_readme)


if __name__ == "__main__":
    main()
