"""Which module outputs count as a network's "layers", and how to record them.

Feature-learning diagnostics (``curvlab.features``) look at the output ``f_l`` of chosen modules.
The feature speed identity ``<-b_l, df_l> = sum_{k<=l} eta_k ||dL/dw_k||^2`` (docs/math.md
section 5) holds exactly when ``f_l`` is a *cut* of the computation graph: every path from the
parameters upstream of ``f_l`` to the loss passes through ``f_l``. The pre-activations of an MLP
or CNN, the residual stream after a residual block and the network output are cuts; a branch
inside a residual block is not (the skip connection bypasses it).

Default layers: the output of every submodule that holds trainable parameters, runs once per
forward, returns a tensor and is a cut, in forward order. When a container's output is the same
tensor as one of its children's (``nn.Sequential``), the innermost name is kept.

Transformers (:func:`find_blocks`: a ``ModuleList`` or ``Sequential`` of at least two blocks of
one class, each holding an attention module, as in GPT-2's ``transformer.h``, BERT's
``encoder.layer`` and timm ViT's ``blocks``) get the residual stream instead: the input of the
first block (the embedding output, named ``"<first block>:in"``), the output of every block and
the output of a final norm that runs after the last block (GPT-2's ``ln_f``, ViT's ``norm``).
These need not be cuts: with tied input and output embeddings the embedding matrix also reaches
the loss through the head. A module returning a tuple contributes its first tensor, and a name
``"<module>:in"`` (here or in ``layers=``) means the first tensor argument of that module.

Example:
    >>> import torch, curvlab as cl
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
    >>> loss = lambda out, t: ((out - t) ** 2).mean()
    >>> [name for name, _ in default_layers(model, loss, x, y)]
    ['0', '2']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from curvlab.batches import call_model, pick_output

Graph = Any  # a torch.autograd.graph.Node


class Recorder:
    """Forward hooks that keep the output of named modules, one call per forward.

    ``outputs[name]`` is the last output of module ``name``; ``calls[name]`` counts its calls, and
    ``order`` lists names in the order their forwards finished.
    """

    def __init__(self) -> None:
        self.outputs: dict[str, Any] = {}
        self.calls: dict[str, int] = {}
        self.order: list[str] = []

    def hook(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.outputs[name] = _first_tensor(output)
            self.order.append(name)

        return record

    def pre_hook(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, kwargs: Any) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.outputs[name] = _first_tensor((*args, *kwargs.values()))
            self.order.append(name)

        return record

    def features(self, names: Sequence[str], call: str) -> list[Tensor]:
        """The recorded outputs of ``names``, checked: each ran exactly once and gave a tensor."""
        found = []
        for name in names:
            count = self.calls.get(name, 0)
            if count != 1:
                what = "did not run" if count == 0 else f"ran {count} times"
                raise ValueError(f"{call}: layer {name!r} {what} in one forward; a layer must run "
                                 "exactly once (for a module applied several times, e.g. shared "
                                 "weights, choose the module that encloses all its calls)")
            out = self.outputs[name]
            if not isinstance(out, Tensor):
                raise TypeError(f"{call}: layer {name!r} returns {type(out).__name__}, not a "
                                "tensor; choose a module whose output is one tensor")
            found.append(out)
        return found


INPUT = ":in"  # suffix of a layer name that means the module's first tensor argument


def _first_tensor(value: Any) -> Any:
    """``value`` itself, or the first tensor of a tuple or list (a block's hidden states)."""
    if isinstance(value, tuple | list):
        return next((v for v in value if isinstance(v, Tensor)), value)
    return value


@contextmanager
def recording(model: nn.Module, names: Sequence[str]) -> Iterator[Recorder]:
    """Record the outputs (or, for ``"name:in"``, the first tensor argument) of the submodules
    ``names`` of ``model`` during the ``with`` block."""
    modules = dict(model.named_modules())
    rec = Recorder()
    handles = [modules[name[:-len(INPUT)]].register_forward_pre_hook(rec.pre_hook(name),
                                                                      with_kwargs=True)
               if name.endswith(INPUT) else modules[name].register_forward_hook(rec.hook(name))
               for name in names]
    try:
        yield rec
    finally:
        for handle in handles:
            handle.remove()


def check_layers(model: nn.Module, layers: Sequence[str] | str, call: str) -> list[str]:
    """Validate user-given layer names against ``model.named_modules()``."""
    if isinstance(layers, str):
        layers = [layers]
    names = [name for name, _ in model.named_modules() if name]
    unknown = [name for name in layers if name.removesuffix(INPUT) not in names]
    if unknown:
        raise ValueError(f"{call}: unknown layer names {unknown}; expected names from "
                         f"model.named_modules(), e.g. {names[:8]}")
    if not layers:
        raise ValueError(f"{call}: layers is empty; pass module names or None for the default")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{call}: layers has duplicates: {list(layers)}")
    return list(layers)


def _parents(node: Graph) -> Iterator[Graph]:
    for parent, _ in node.next_functions:
        if parent is not None:
            yield parent


def _leaves(roots: Sequence[Graph | None], blocked: Graph | None = None) -> Iterator[int]:
    """``id``s of the leaf tensors (parameters) reachable from ``roots`` in the autograd graph,
    never passing through the node ``blocked``."""
    seen: set[Graph] = {blocked} if blocked is not None else set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            yield id(variable)
        stack.extend(_parents(node))


def upstream_params(root: Graph | None) -> set[int]:
    """``id``s of the leaf tensors (parameters) that the graph node ``root`` depends on."""
    return set(_leaves([root]))


def is_cut(loss: Tensor, feature: Tensor) -> bool:
    """Whether every path from the parameters upstream of ``feature`` to ``loss`` passes through
    ``feature`` (so the loss depends on those parameters only through ``feature``)."""
    upstream = upstream_params(feature.grad_fn)
    return not any(i in upstream for i in _leaves([loss.grad_fn], blocked=feature.grad_fn))


def candidates(model: nn.Module) -> list[str]:
    """Names of the submodules (not the root) that hold trainable parameters."""
    return [name for name, m in model.named_modules()
            if name and any(p.requires_grad for p in m.parameters())]


def select_default(loss: Tensor, rec: Recorder) -> list[tuple[str, Tensor]]:
    """The default layers among the recorded candidates (see the module docstring)."""
    chosen: list[tuple[str, Tensor]] = []
    for name in dict.fromkeys(rec.order):  # forward order, each name once
        out = rec.outputs[name]
        if rec.calls[name] != 1 or not isinstance(out, Tensor) or out.grad_fn is None:
            continue
        if any(out is kept for _, kept in chosen):
            continue
        if is_cut(loss, out):
            chosen.append((name, out))
    return chosen


def find_blocks(model: nn.Module) -> list[str] | None:
    """Names of the blocks of a transformer's main stack, or ``None`` (see the module docstring).

    The stack is a ``ModuleList`` or ``Sequential`` of at least two modules of one class, each
    holding trainable parameters and an attention module (``nn.MultiheadAttention`` or a class
    whose name contains ``Attention``); the one with the most parameters wins.
    """
    best: tuple[int, list[str]] | None = None
    for name, module in model.named_modules():
        children = list(module.named_children())
        if not isinstance(module, nn.ModuleList | nn.Sequential) or len(children) < 2:
            continue
        if len({type(c) for _, c in children}) != 1:
            continue
        if not all(_has_attention(c) for _, c in children):
            continue
        size = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if size and (best is None or size > best[0]):
            best = (size, [f"{name}.{c}" if name else c for c, _ in children])
    return None if best is None else best[1]


def _has_attention(module: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__
               for m in module.modules())


def transformer_candidates(model: nn.Module, blocks: Sequence[str]) -> list[str]:
    """The residual-stream layers to watch: the first block's input, every block, and the
    norm modules outside the stack (the final norm is picked among them after a forward)."""
    inside = tuple(f"{b}." for b in blocks)
    norms = [name for name, m in model.named_modules()
             if name and "Norm" in type(m).__name__ and not name.startswith(inside)
             and any(p.requires_grad for p in m.parameters())]
    return [blocks[0] + INPUT, *blocks, *norms]


def select_transformer(rec: Recorder, blocks: Sequence[str]) -> list[tuple[str, Tensor]]:
    """Embedding output, block outputs and the norm that runs right after the last block."""
    names = [blocks[0] + INPUT, *blocks]
    order = [n for n in rec.order if rec.calls.get(n) == 1]
    after = order[order.index(blocks[-1]) + 1:] if blocks[-1] in order else []
    final = [n for n in after if n not in names][:1]
    return [(n, rec.outputs[n]) for n in [*names, *final] if isinstance(rec.outputs.get(n), Tensor)
            and rec.calls.get(n) == 1]


def defaults(model: nn.Module) -> tuple[list[str], Callable[[Tensor, Recorder],
                                                              list[tuple[str, Tensor]]]]:
    """The modules to record for the default layers, and how to pick them after a forward:
    ``pick(loss, recorder) -> [(name, feature)]`` (see the module docstring)."""
    blocks = find_blocks(model)
    if blocks is None:
        return candidates(model), select_default
    return transformer_candidates(model, blocks), lambda loss, rec: select_transformer(rec, blocks)


def default_layers(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], inputs: Any,
                   targets: Any, output: Any = "auto") -> list[tuple[str, Tensor]]:
    """Run one forward and return the default ``(name, output)`` layers of ``model``."""
    watch, pick = defaults(model)
    with recording(model, watch) as rec:
        loss = loss_fn(pick_output(call_model(model, inputs), output), targets)
    return pick(loss, rec)
