"""Train a small character-level GPT as people do, with curvlab watching.

A nanoGPT-style model (token and position embeddings, pre-LN blocks of causal self-attention and
an MLP, a head tied to the token embedding, dropout 0.1) learns the text of Python's own help
topics (``pydoc_data.topics``, shipped with CPython: nothing is downloaded), trained by AdamW
(betas 0.9/0.99, weight decay 0.1) with a linear warm-up and a cosine schedule, gradient clipping
at 1.0, dropout on, and bf16 autocast where the device supports it. Every ``--every`` steps a
``cl.Monitor`` logs, on a fixed probe of training sequences:

- ``loss``, the probe's token-mean loss;
- ``sharpness_adam``, the top eigenvalue of ``P^-1/2 H P^-1/2`` with Adam's preconditioner
  ``P = diag(sqrt(v_hat) + eps)`` times the step's LR scale (Cohen et al. 2022, "Adaptive Gradient
  Methods at the Edge of Stability", arXiv:2207.14484), with the threshold ``38 / eta``
  (``(2 + 2 beta1) / ((1 - beta1) eta)`` at ``beta1 = 0.9``, ``eta`` the peak LR);
- ``feature_*``, the feature speed of the residual stream: embedding output, every block and the
  final norm (found without naming modules; Chizat & Netrapalli 2023, arXiv:2311.18718).

The measurements run in eval mode and float32 (dropout off, no autocast), fork the RNG and never
touch the optimizer, so training follows the same trajectory as without them. The figures are
drawn by ``curvlab plot``.

Commands (from the repository root)::

    python examples/train_gpt.py             # 400 steps, under a minute on 2 CPU cores
    python examples/train_gpt.py --quick     # smoke test, seconds
    python examples/train_gpt.py --hf        # the same as GPT2LMHeadModel in transformers'
                                             # Trainer, with curvlab.callbacks.hf (the hf extra)

Writes ``docs/reproductions/train_gpt.{h5,json}`` and ``train_gpt_{sharpness,loss,feature}.png``
(``--out DIR`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvlab as cl
from curvlab import cli

NAME = "train_gpt"
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- data


def corpus() -> str:
    """Python's help topics, in a fixed order (shipped with CPython)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def encode(text: str) -> tuple[Tensor, list[str]]:
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), chars


def windows(tokens: Tensor, starts: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets ``(n, T)`` for sequences starting at ``starts``."""
    rows = starts[:, None] + torch.arange(T + 1)  # (n, T + 1)
    chunk = tokens[rows]  # (n, T + 1)
    return chunk[:, :-1], chunk[:, 1:]


# ----------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.resid = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:  # h (n, T, d)
        n, T, d = h.shape
        q, k, v = self.qkv(h).split(d, dim=-1)  # each (n, T, d)
        q, k, v = (t.view(n, T, self.heads, -1).transpose(1, 2)
                   for t in (q, k, v))  # each (n, heads, T, d / heads)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid(self.proj(a.transpose(1, 2).reshape(n, T, d)))  # (n, T, d)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d),
                                 nn.Dropout(dropout))

    def forward(self, h: Tensor) -> Tensor:  # h (n, T, d), the residual stream
        h = h + self.attn(self.ln1(h))  # (n, T, d)
        return h + self.mlp(self.ln2(h))  # (n, T, d)


class GPT(nn.Module):
    def __init__(self, vocab: int, T: int, d: int, depth: int, heads: int,
                 dropout: float) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * depth) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: Tensor) -> Tensor:  # idx (n, T) -> logits (n, T, vocab)
        pos = torch.arange(idx.shape[1], device=idx.device)  # (T,)
        h = self.drop(self.wte(idx) + self.wpe(pos))  # (n, T, d)
        for block in self.blocks:
            h = block(h)  # (n, T, d)
        return self.head(self.ln_f(h))  # (n, T, vocab)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over target tokens (``-100`` ignored)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def lr_lambda(warmup: int, steps: int, floor: float = 0.1):
    """Linear warm-up from ``1 / warmup`` to 1, then cosine decay to ``floor`` (nanoGPT's)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ----------------------------------------------------------------------------- training


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """bf16 where the device supports it (``--amp auto``), else full precision."""
    if amp == "off":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16  # CPU autocast supports bf16 on every x86-64 and arm64 build


def measurements(every: int) -> list[cl.callbacks.Measurement]:
    return [cl.Loss(every=every),
            cl.Sharpness(every=every, preconditioned="adam", tol=1e-3, max_iters=60),
            cl.FeatureSpeed(every=every)]


def train_plain(args: argparse.Namespace, out: Path) -> Path:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens, chars = encode(corpus())
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = GPT(len(chars), args.T, args.width, args.depth, args.heads, 0.1).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps))
    top = len(tokens) - args.T - 1
    probe = tuple(t.to(device) for t in windows(tokens, torch.randint(0, top, (args.probe,),
                                                                       generator=g), args.T))
    amp = autocast_dtype(device, args.amp)
    config = {"model": "gpt-char", "width": args.width, "depth": args.depth, "lr": args.lr,
              "optimizer": "adamw", "steps": args.steps, "batch": args.batch, "T": args.T,
              "amp": str(amp), "seed": args.seed, "parametrization": "sp"}
    path = out / f"{NAME}.h5"
    with cl.RunLogger(path, config, mode="w") as log:
        mon = cl.Monitor(model, lm_loss, probe, log, measurements(args.every), optimizer=opt)
        model.train()
        mon.on_train_start()
        for step in range(1, args.steps + 1):
            x, y = (t.to(device) for t in windows(tokens, torch.randint(0, top, (args.batch,),
                                                                         generator=g), args.T))
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = lm_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            log.log(step, train_loss=loss.item(), lr=sched.get_last_lr()[0])
            mon.on_train_batch_end(step)
        mon.on_train_end()
    return path


def train_hf(args: argparse.Namespace, out: Path) -> Path:
    """The same run as ``GPT2LMHeadModel`` from a config, in ``transformers.Trainer``."""
    import transformers

    from curvlab.callbacks.hf import CurvlabTrainerCallback

    tokens, chars = encode(corpus())
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(vocab_size=len(chars), n_positions=args.T, n_embd=args.width,
                                     n_layer=args.depth, n_head=args.heads, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    top = len(tokens) - args.T
    starts = torch.randint(0, top, (args.steps * args.batch,), generator=g)
    rows = [{"input_ids": tokens[s:s + args.T], "labels": tokens[s:s + args.T]} for s in starts]
    ids = tokens[torch.randint(0, top, (args.probe,), generator=g)[:, None]
                 + torch.arange(args.T)]  # (probe, T)

    def shifted_loss(logits: Tensor, labels: Tensor) -> Tensor:  # GPT2LMHeadModel's own loss
        return lm_loss(logits[:, :-1], labels[:, 1:])

    path = out / f"{NAME}.h5"
    log = cl.RunLogger(path, {"model": "gpt2-hf", "width": args.width, "depth": args.depth,
                              "lr": args.lr, "optimizer": "adamw"}, mode="w")
    mon = cl.Monitor(model, shifted_loss, ({"input_ids": ids}, ids), log,
                     measurements(args.every), weights=cl.count_tokens(shift=True))
    targs = transformers.TrainingArguments(
        output_dir=str(out / "hf_trainer"), max_steps=args.steps,
        per_device_train_batch_size=args.batch, learning_rate=args.lr, weight_decay=0.1,
        adam_beta2=0.99, warmup_steps=args.warmup, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, max_grad_norm=1.0, report_to=[],
        save_strategy="no", logging_strategy="no", seed=args.seed, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), bf16=autocast_dtype(
            torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.amp) is not None)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=rows,
                                   callbacks=[CurvlabTrainerCallback(mon)])
    try:
        trainer.train()
    finally:
        log.close()
    return path


def plot(path: Path, out: Path) -> list[Path]:
    """The figures, drawn by ``curvlab plot``."""
    figures = []
    for metric in ("sharpness_adam", "loss", "feature_cos_theta"):
        fig = out / f"{NAME}_{metric.split('_')[0]}.png"
        cli.main(["plot", str(path), "-o", str(fig), "--metric", metric])
        figures.append(fig)
    return figures


def summarize(path: Path, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    run = cl.load_run(path)
    sharp = run["sharpness_adam"]
    threshold = float(sharp.threshold)
    ratio = (sharp.value / threshold).tolist()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {"name": NAME, "settings": settings, "steps": sharp.step.tolist(),
            "sharpness_adam": sharp.value.tolist(), "threshold": threshold, "ratio": ratio,
            "loss": run["loss"].value.tolist(), "feature_layers": list(run["feature_cos_theta"]
                                                                        .labels or ()),
            "feature_cos_theta": run["feature_cos_theta"].value.tolist(),
            "max_ratio": max(ratio), "torch_version": torch.__version__,
            "wall_time_s": round(seconds, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--probe", type=int, default=16, help="sequences in the fixed probe")
    parser.add_argument("--T", type=int, default=64, help="sequence length")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--amp", choices=("auto", "off"), default="auto")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf", action="store_true", help="GPT2LMHeadModel in the HF Trainer")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few steps")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reproductions")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.warmup, args.probe, args.batch = 6, 3, 2, 4, 8
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    path = (train_hf if args.hf else train_plain)(args, args.out)
    result = summarize(path, args, time.perf_counter() - start)
    result["figures"] = [str(p) for p in plot(path, args.out)]
    (args.out / f"{NAME}{'_hf' if args.hf else ''}.json").write_text(
        json.dumps(result, indent=1) + "\n")
    print(f"{NAME}: max sharpness_adam / (38 / eta) = {result['max_ratio']:.3f} "
          f"in {result['wall_time_s']} s; figures in {args.out}")
    return result


if __name__ == "__main__":
    main()
