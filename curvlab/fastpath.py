"""The reverse-mode fast path: tensor swaps by slot and a vjp without per-call Python checks.

Both do what a plain torch call does (``functional_call``, ``torch.autograd.grad``) with the
fixed Python cost of each call removed, which matters where a product is called many times on a
small batch. They are exact, tested against the plain calls (tests/test_func.py), and used only by
the Hessian's reverse-over-reverse route (:func:`curvlab.products.make_hvp_revrev`) and the
operators that build it; everything else goes through the plain path of :mod:`curvlab.func`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.batches import call_model
from curvlab.func import unwrap_compiled


class Reparametrized:
    """``model(inputs)`` with named parameters and buffers replaced, as ``functional_call`` does.

    ``functional_call`` (``torch.nn.utils.stateless``) puts each tensor into its module's
    ``_parameters`` or ``_buffers`` slot for the call and the original back afterwards; this class
    does exactly that, with the module and slot of every name looked up once at construction
    instead of on every call. Only for models without tied tensors (:func:`has_tied_tensors`),
    whose aliases ``functional_call`` resolves; the module structure is the one at construction.

    Why: ``functional_call`` finds every slot again on each call, a fixed cost that dominates
    small batches (measurements in benchmarks/README.md, History).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> call = Reparametrized(model, ["weight", "bias"])
        >>> call({"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, torch.ones(3, 2)).flatten()
        tensor([2., 2., 2.])
        >>> model.bias.requires_grad  # the originals are back
        True
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.model, self.names = model, tuple(names)
        self._slots: list[tuple[dict[str, Any], str]] = []
        inner = unwrap_compiled(model)  # a compiled wrapper is called; its module holds the slots
        for name in self.names:
            owner, _, attr = name.rpartition(".")
            module = inner.get_submodule(owner)
            table = module._parameters if attr in module._parameters else module._buffers
            if attr not in table:
                raise ValueError(f"Reparametrized: {name!r} is neither a parameter nor a buffer "
                                 f"of the model; pass names from named_parameters() or "
                                 "named_buffers()")
            self._slots.append((table, attr))

    def __call__(self, tensors: Mapping[str, Tensor], inputs: Any) -> Any:
        slots = self._slots
        originals = [table[attr] for table, attr in slots]
        try:
            for (table, attr), name in zip(slots, self.names, strict=True):
                table[attr] = tensors[name]
            return call_model(self.model, inputs)
        finally:
            for (table, attr), original in zip(slots, originals, strict=True):
                table[attr] = original


# The engine call inside torch.autograd.grad (torch >= 2.3); None where a torch lacks it.
_ENGINE_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None)


def vjp_unchecked(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    *,
    retain_graph: bool,
    create_graph: bool = False,
) -> tuple[Tensor, ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True,
    materialize_grads=True)``: one tensor per input, zeros where it does not reach the outputs.

    ``grad_outputs[k]`` must have the shape, dtype and device of ``outputs[k]``. The products
    build theirs from the layout, so this calls the engine that ``torch.autograd.grad`` calls
    without its Python checks of each grad_output (shape through the symbolic-shape helpers,
    dtype, nesting), a fixed cost per grad_output (benchmarks/README.md, History). Tensor subclasses
    with ``__torch_function__``, and a torch without the engine function, go through
    ``torch.autograd.grad`` itself.
    """
    if _ENGINE_RUN_BACKWARD is None or torch.overrides.has_torch_function((*outputs, *inputs)):
        return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
                                   create_graph=create_graph, allow_unused=True,
                                   materialize_grads=True)
    result = _ENGINE_RUN_BACKWARD(tuple(outputs), tuple(grad_outputs), retain_graph,
                                  create_graph, tuple(inputs), True, accumulate_grad=False)
    return tuple(r if r is not None else torch.zeros_like(x, requires_grad=create_graph)
                 for r, x in zip(result, inputs, strict=True))
