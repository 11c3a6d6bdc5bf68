"""Models other libraries build, random-init from configs (nothing downloaded), with their data.

Each builder returns a :class:`Real`: the model (eval mode), the loss as users write it, several
unequal batches in the model's own input form, and ``concat``, the same examples as one batch, on
which the reference objective is the plain mean the user trains. ``weights`` is the batch weight
that makes curvlab's operator the Hessian of that objective (``None``: examples).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision_compat  # noqa: F401  (before transformers/timm import torchvision)
from torch import Tensor, nn

import curvlab as cl

VOCAB, SEQ = 32, 6


@dataclass
class Real:
    name: str
    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor]
    batches: list[tuple[Any, Any]]
    concat: tuple[Any, Any]
    weights: Any = None


def _generator(seed: int) -> torch.Generator:
    torch.manual_seed(seed)  # module initializers draw from the global generator
    return torch.Generator().manual_seed(seed)


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The causal-LM loss of ``GPT2LMHeadModel``: mean over target tokens, padding ignored."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


def _concat(batches: list[tuple[Any, Any]]) -> tuple[Any, Any]:
    xs, ys = zip(*batches, strict=True)
    if isinstance(xs[0], dict):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}, torch.cat(ys)
    return torch.cat(xs), torch.cat(ys)


def gpt2(dtype: torch.dtype = torch.float64, seed: int = 0) -> Real:
    """Tiny ``GPT2LMHeadModel`` (tied embeddings), batches of 2, 3 and 1 padded sequences."""
    import transformers

    transformers.logging.set_verbosity_error()
    g = _generator(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).to(dtype).eval()
    batches = []
    for n, lengths in ((2, (6, 3)), (3, (4, 6, 2)), (1, (5,))):
        ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        mask = (torch.arange(SEQ)[None] < torch.tensor(lengths)[:, None]).long()  # (n, SEQ)
        labels = ids.masked_fill(mask == 0, -100)  # padding is never a target
        batches.append(({"input_ids": ids, "attention_mask": mask}, labels))
    return Real("gpt2", model, lm_loss, batches, _concat(batches),
                cl.count_tokens(shift=True))


def bert(dtype: torch.dtype = torch.float64, seed: int = 0) -> Real:
    """Tiny ``BertForSequenceClassification``, dict inputs, batches of 3 and 2."""
    import transformers

    transformers.logging.set_verbosity_error()
    g = _generator(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config).to(dtype).eval()
    batches = []
    for n in (3, 2):
        ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "token_type_ids": torch.zeros_like(ids)}
        batches.append((inputs, torch.randint(0, 3, (n,), generator=g)))
    return Real("bert", model, F.cross_entropy, batches, _concat(batches))


def vit(dtype: torch.dtype = torch.float64, seed: int = 0) -> Real:
    """A timm ``VisionTransformer`` on 8 x 8 images (patches of 4), batches of 3 and 2."""
    import timm

    g = _generator(seed)
    model = timm.models.VisionTransformer(img_size=8, patch_size=4, num_classes=3, embed_dim=16,
                                          depth=2, num_heads=2).to(dtype).eval()
    batches = [(torch.randn(n, 3, 8, 8, generator=g, dtype=dtype),
                torch.randint(0, 3, (n,), generator=g)) for n in (3, 2)]
    return Real("vit", model, F.cross_entropy, batches, _concat(batches))


def resnet18(dtype: torch.dtype = torch.float64, seed: int = 0) -> Real:
    """torchvision ``resnet18`` (11 M parameters, eval-mode BatchNorm), 16 x 16 images."""
    import torchvision

    g = _generator(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.resnet18(num_classes=3).to(dtype)
    with torch.no_grad():  # non-trivial running statistics
        model.train()(torch.randn(8, 3, 16, 16, generator=g, dtype=dtype))
    model.eval()
    batches = [(torch.randn(n, 3, 16, 16, generator=g, dtype=dtype),
                torch.randint(0, 3, (n,), generator=g)) for n in (2, 3)]
    return Real("resnet18", model, F.cross_entropy, batches, _concat(batches))


BUILDERS = {"gpt2": gpt2, "bert": bert, "vit": vit, "resnet18": resnet18}


def reference_hvp(real: Real, V: Tensor) -> Tensor:
    """``H V`` of the objective on the concatenated data by plain double backward ``(P, m)``."""
    params = [p for p in real.model.parameters() if p.requires_grad]
    inputs, targets = real.concat
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = cl.batches.call_model(real.model, inputs)
        loss = real.loss_fn(cl.batches.pick_output(out), targets)
        grads = torch.autograd.grad(loss, params, create_graph=True)
    columns = []
    for j in range(V.shape[1]):
        pieces = torch.split(V[:, j], [p.numel() for p in params])
        hv = torch.autograd.grad(grads, params, [c.view_as(p) for c, p in
                                                 zip(pieces, params, strict=True)],
                                 retain_graph=True)
        columns.append(torch.cat([h.reshape(-1) for h in hv]))
    return torch.stack(columns, dim=1)  # (P, m)
