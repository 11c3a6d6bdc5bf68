"""torch.func building blocks: the parameter layout and the model as a function of its tensors.

Everything above this module works on flat vectors ``v (P,)`` and blocks ``V (P, m)``; the
layout here is the one place where they are converted to and from dicts of parameter tensors.
The functional loss ``theta -> L(theta)`` and outputs ``theta -> f(theta)`` built here are what
the product factories of :mod:`curvlab.products` differentiate; :func:`forward_context` makes
each forward a fixed, side-effect-free function (eval mode or frozen BatchNorm statistics, seeded
Dropout, math attention). The reverse-mode fast path (slot swaps, the unchecked vjp) is apart, in
:mod:`curvlab.fastpath`.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> layout = ParamLayout.from_params(dict(model.named_parameters()))
    >>> layout.numel
    8
    >>> v = layout.ravel(dict(model.named_parameters()))
    >>> layout.unravel(v)["weight"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlab.batches import Output, batch_size, call_args, pick_output

Params = dict[str, Tensor]
Product = Callable[[Tensor], Tensor]  # V (P, m) -> (P, m)
ModelCall = Callable[[Mapping[str, Tensor], Any], Any]  # (tensors, inputs) -> model outputs

# Modules whose forward depends on the training flag in a way that changes the measured function.
BATCHNORM = nn.modules.batchnorm._BatchNorm
DROPOUT = nn.modules.dropout._DropoutNd


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and order of the parameters behind a flat vector of length ``P``."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_params(cls, params: Mapping[str, Tensor]) -> ParamLayout:
        return cls(tuple(params), tuple(p.shape for p in params.values()))

    @cached_property
    def sizes(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    @cached_property
    def _strided(self) -> list[tuple[torch.Size, tuple[int, ...], int]]:
        """``(shape, contiguous strides, offset)`` of each parameter's piece of a flat vector."""
        offsets = [0]
        for n in self.sizes[:-1]:
            offsets.append(offsets[-1] + n)
        return [(s, torch.empty(s, device="meta").stride(), o)
                for s, o in zip(self.shapes, offsets, strict=True)]

    def pieces(self, v: Tensor) -> list[Tensor]:
        """Views of a contiguous ``v (P,)`` with the parameter shapes, in layout order.

        One ``as_strided`` per parameter, a third of the cost of ``unravel``'s split and view.
        Only for vectors that stay outside autograd graphs (as_strided's backward is a scatter
        into a zero buffer of size P); use :meth:`unravel` for tensors that require grad.
        """
        base = v.storage_offset()  # as_strided's offsets count from the start of the storage
        return [v.as_strided(shape, stride, base + offset)
                for shape, stride, offset in self._strided]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def ravel(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate ``tensors[name]`` in layout order into one vector ``(P,)``."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unravel(self, v: Tensor) -> Params:
        """Split ``v (P,)`` into views with the parameter shapes."""
        chunks = torch.split(v, self.sizes)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def unravel_columns(self, V: Tensor) -> Params:
        """Split ``V (P, m)`` into tensors of shape ``(m, *shape)``, one per parameter."""
        Vt = V.T  # (m, P)
        chunks = torch.split(Vt, self.sizes, dim=1)  # each (m, numel)
        pieces = zip(self.names, chunks, self.shapes, strict=True)
        return {n: c.reshape(-1, *s) for n, c, s in pieces}

    def ravel_columns(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Inverse of :meth:`unravel_columns`: ``(m, *shape)`` tensors to ``V (P, m)``."""
        m = next(iter(tensors.values())).shape[0]
        return torch.cat([tensors[n].reshape(m, -1) for n in self.names], dim=1).T  # (P, m)


def ravel(params: Mapping[str, Tensor]) -> Tensor:
    """Flatten a parameter dict into one vector ``(P,)`` in the dict's order."""
    return ParamLayout.from_params(params).ravel(params)


def unravel(v: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split ``v (P,)`` into tensors shaped like the values of ``like`` (same order)."""
    return ParamLayout.from_params(like).unravel(v)


__all__ = ["batch_size"]  # re-exported: older code imports it from here


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The eager module inside a ``torch.compile`` wrapper (``OptimizedModule``), else ``model``.

    Names, slots and modes are read from it, so that parameter names carry no ``_orig_mod.``
    prefix; the calls still go through the compiled wrapper.
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) \
        else model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules runs through ``torch.compile``."""
    return any(type(m).__name__ == "OptimizedModule"
               or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def functional_forward(model: nn.Module, tensors: Mapping[str, Tensor], inputs: Any, *,
                       tie_weights: bool = True) -> Any:
    """``model(inputs)`` with the named tensors swapped in (``functional_call``); ``inputs`` as
    in :mod:`curvlab.batches`, names as :func:`unwrap_compiled` gives them."""
    if unwrap_compiled(model) is not model:
        tensors = {f"_orig_mod.{n}": t for n, t in tensors.items()}
    args, kwargs = call_args(inputs)
    return functional_call(model, dict(tensors), args, kwargs, tie_weights=tie_weights)


def make_functional_loss(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    frozen: Mapping[str, Tensor],
    inputs: Any,
    targets: Any,
    *,
    tie_weights: bool = True,
    call: ModelCall | None = None,
    output: Output = "auto",
) -> Callable[[Params], Tensor]:
    """``theta -> loss_fn(pick(model(inputs; theta, frozen)), targets)`` by ``functional_call``.

    ``pick`` is :func:`curvlab.batches.pick_output` with ``output``.

    ``frozen`` holds the buffers and the parameters that are not differentiated; ``theta`` the rest.
    ``tie_weights=False`` (only for models without tied tensors, see :func:`has_tied_tensors`)
    skips ``functional_call``'s search for aliases, a fixed cost of every call. ``call(tensors,
    inputs)``, e.g. a :class:`curvlab.fastpath.Reparametrized` of ``model`` for the names of
    ``frozen`` and ``theta``, replaces that swap (the Hessian's reverse-over-reverse route passes
    one, whose name lookups are done once; the ``torch.func`` routes keep ``functional_call``).
    """

    def loss(theta: Params) -> Tensor:
        if call is not None:
            outputs = call({**frozen, **theta}, inputs)
        else:
            outputs = functional_forward(model, {**frozen, **theta}, inputs,
                                         tie_weights=tie_weights)
        return loss_fn(pick_output(outputs, output), targets)

    return loss


def has_tied_tensors(model: nn.Module) -> bool:
    """Whether one parameter or buffer is registered under several names (tied weights)."""
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    return len({id(t) for _, t in named}) != len(named)


def make_functional_outputs(
    model: nn.Module, frozen: Mapping[str, Tensor], inputs: Any, output: Output = "auto"
) -> Callable[[Params], Tensor]:
    """``theta -> pick(model(inputs; theta, frozen))``, the network outputs ``(n, ...)``."""

    def outputs(theta: Params) -> Tensor:
        return pick_output(functional_forward(model, {**frozen, **theta}, inputs), output)

    return outputs


def stochastic_modules_in_train_mode(model: nn.Module) -> list[str]:
    """Names of BatchNorm, Dropout and attention-dropout modules that are in training mode."""
    found = []
    for name, m in model.named_modules():
        attention_dropout = isinstance(m, nn.MultiheadAttention) and m.dropout > 0
        if m.training and (isinstance(m, BATCHNORM | DROPOUT) or attention_dropout):
            found.append(name or type(m).__name__)
    return found


@contextmanager
def forward_context(
    model: nn.Module, *, train_mode: bool, seed: int, device: torch.device
) -> Iterator[None]:
    """Run forwards of ``model`` as a fixed, side-effect-free function, then restore everything.

    - ``train_mode=False``: the model is put in eval mode; ``True``: modes are left as they are,
      but train-mode BatchNorm stops tracking running statistics (its output, from batch
      statistics, is unchanged; its buffers are never written).
    - The global RNG (CPU and the model's CUDA device) is seeded with ``seed``, so every forward
      draws the same Dropout masks; the caller's generator states are saved before and set back
      after, so the caller's RNG is untouched.
    - Scaled dot-product attention uses the math backend (entered only when an enclosing
      ``sdpa_kernel`` has not already made it the only one): the fused CPU kernels implement
      neither forward-mode AD nor double backward.
    - The training flags this context changed (module by module) and ``track_running_stats``
      are restored exactly.
    """
    modules = list(model.modules())
    flags = [m.training for m in modules]
    tracking = [m for m in modules if isinstance(m, BATCHNORM) and m.track_running_stats]
    evaluate = not train_mode and any(flags)  # skip the walks when already in eval mode
    generators = [torch.default_generator]
    if device.type == "cuda":
        generators.append(torch.cuda.default_generators[device.index or 0])
    states = [g.get_state() for g in generators]
    module: nn.Module
    try:
        if evaluate:
            model.eval()
        for bn in tracking:
            bn.track_running_stats = bn.training is False  # eval mode still reads running stats
        for g in generators:
            g.manual_seed(seed)
        with nullcontext() if _math_sdpa_only() else sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for g, state in zip(generators, states, strict=True):
            g.set_state(state)
        if evaluate:
            for module, flag in zip(modules, flags, strict=True):
                module.training = flag
        for bn in tracking:
            bn.track_running_stats = True


def _math_sdpa_only() -> bool:
    """Whether attention already runs on the math backend alone (an enclosing ``sdpa_kernel``)."""
    b = torch.backends.cuda
    return b.math_sdp_enabled() and not (b.flash_sdp_enabled() or b.mem_efficient_sdp_enabled()
                                         or b.cudnn_sdp_enabled())
