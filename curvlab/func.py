"""torch.func building blocks: parameter layout, the functional loss, and HVP factories.

Everything above this module works on flat vectors ``v (P,)`` and blocks ``V (P, m)``; this is the
one place where they are converted to and from dicts of parameter tensors.

Two exact Hessian-vector product routes (docs/math.md section 1):

- forward-over-reverse, ``Hv = jvp(grad(L), (theta,), (v,))[1]`` (Pearlmutter 1994), which
  recomputes the forward and backward for every call;
- reverse-over-reverse, ``Hv = grad(<grad(L), v>)``: the first-order gradient is built once with
  ``create_graph=True`` and every product is one second backward through that graph.

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

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlab.batches import Output, batch_size, call_args, call_model, pick_output

Params = dict[str, Tensor]
Product = Callable[[Tensor], Tensor]  # V (P, m) -> (P, m)

# Modules whose forward depends on the training flag in a way that changes the measured function.
_BATCHNORM = nn.modules.batchnorm._BatchNorm
_DROPOUT = nn.modules.dropout._DropoutNd


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
    call: Reparametrized | None = None,
    output: Output = "auto",
) -> Callable[[Params], Tensor]:
    """``theta -> loss_fn(pick(model(inputs; theta, frozen)), targets)`` by ``functional_call``.

    ``pick`` is :func:`curvlab.batches.pick_output` with ``output``.

    ``frozen`` holds the buffers and the parameters that are not differentiated; ``theta`` the rest.
    ``tie_weights=False`` (only for models without tied tensors, see :func:`has_tied_tensors`)
    skips ``functional_call``'s search for aliases, a fixed cost of every call. ``call``, a
    :class:`Reparametrized` of ``model`` for the names of ``frozen`` and ``theta``, does the same
    swap with its name lookups done once (the Hessian's reverse-over-reverse route uses it; the
    ``torch.func`` routes keep ``functional_call``).
    """

    def loss(theta: Params) -> Tensor:
        if call is not None:
            outputs = call({**frozen, **theta}, inputs)
        else:
            outputs = functional_forward(model, {**frozen, **theta}, inputs,
                                         tie_weights=tie_weights)
        return loss_fn(pick_output(outputs, output), targets)

    return loss


class Reparametrized:
    """``model(inputs)`` with named parameters and buffers replaced, as ``functional_call`` does.

    ``functional_call`` (``torch.nn.utils.stateless``) puts each tensor into its module's
    ``_parameters`` or ``_buffers`` slot for the call and the original back afterwards; this class
    does exactly that, with the module and slot of every name looked up once at construction
    instead of on every call. Only for models without tied tensors (:func:`has_tied_tensors`),
    whose aliases ``functional_call`` resolves; the module structure is the one at construction.

    Measured at batch 1, where the fixed costs show (one thread, 1,000 calls): the forward of the
    transformer of benchmarks/hvp.py (16 tensors) costs 4 us more than ``model(x)`` this way and
    62 us more through ``functional_call(tie_weights=False)``.

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
        if m.training and (isinstance(m, _BATCHNORM | _DROPOUT) or attention_dropout):
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
    tracking = [m for m in modules if isinstance(m, _BATCHNORM) and m.track_running_stats]
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
    dtype, nesting): measured on a chain of 16 matmuls at batch 1, those checks cost 130 us of a
    990 us backward. Tensor subclasses with ``__torch_function__``, and a torch without the
    engine function, go through ``torch.autograd.grad`` itself.
    """
    if _ENGINE_RUN_BACKWARD is None or torch.overrides.has_torch_function((*outputs, *inputs)):
        return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
                                   create_graph=create_graph, allow_unused=True,
                                   materialize_grads=True)
    result = _ENGINE_RUN_BACKWARD(tuple(outputs), tuple(grad_outputs), retain_graph,
                                  create_graph, tuple(inputs), True, accumulate_grad=False)
    return tuple(r if r is not None else torch.zeros_like(x, requires_grad=create_graph)
                 for r, x in zip(result, inputs, strict=True))


def make_hvp_revrev(
    loss: Callable[[Params], Tensor],
    primals: Params,
    layout: ParamLayout,
    *,
    context: Callable[[], Any],
    check_loss: Callable[..., None],
    reuse: bool = True,
) -> Product:
    """Reverse-over-reverse HVP factory: one forward/backward now, one second backward per vector.

    The parameters enter the graph as leaves ``theta_i`` that share the memory of ``primals``;
    the first-order gradient is kept per parameter (``g_i = dL/dtheta_i``), and column ``j`` of
    the result is ``H v_j = d(sum_i <g_i, v_ji>)/dtheta``, concatenated straight into row ``j`` of
    an ``(m, P)`` buffer that is returned transposed, ``(P, m)`` with contiguous columns. The
    pieces ``v_ji`` are ``as_strided`` views of the column (:meth:`ParamLayout.pieces`).

    The ops are those of a plain double backward (torch.profiler on the transformer of
    benchmarks/hvp.py: 16 ``detach``, 6 ``as_strided`` and 2 ``item`` more per product, nothing
    else), so what separates the two is fixed Python cost per call, which batch 1 shows: paired
    against a plain double backward (one thread, 500-800 rounds) the product without reuse cost
    400-550 us more on that transformer and MLP, 1-2% of their full-size products. Two changes
    halved it (to 203 and 271 us): the model is called through :class:`Reparametrized`, whose
    slots are looked up once (``functional_call`` finds them on every call, 60-100 us), and the
    second backward goes through :func:`vjp_unchecked` (``torch.autograd.grad`` checks each of
    the 16 grad_outputs in Python, 130 us). At full size (4 fresh processes of 100 paired rounds)
    that made the product without reuse 1.003 [0.991, 1.015] of a double backward on the
    transformer and 1.001 [0.995, 1.009] on the MLP, against 1.021 and 1.016 before (the full
    run of benchmarks/hvp.py, 8 processes of 40 rounds: 1.005 [0.986, 1.022] and 0.997). Earlier
    measurements that still hold: leaves per parameter cost 30-280 us less than views of one flat
    leaf (whose split backward would return ``H v`` flat), and a single flat gradient (one more
    concatenation in the graph, so that the second backward takes ``v`` whole) was no faster
    (1.026 [1.019, 1.031] against 1.019 [1.012, 1.026]); the ``as_strided`` pieces of ``v`` cost a
    third of a split and reshape, and split views made once instead measured 0.993 [0.987, 1.002]
    (MLP) and 1.009 [0.992, 1.024] (transformer) of the product, within noise either way.

    The ``(m, P)`` output is allocated after the first backward. Allocated before it, the product
    measured 2% slower on that MLP, but only while glibc handed freed memory back to the kernel
    at every free (the benchmark's malloc setting was broken then): with freed memory kept, the
    order makes no difference (1.002 [0.993, 1.011]). Allocating after costs nothing, and it may
    help where the allocator returns memory, which glibc does by default for large blocks.

    The first-order graph (activations and the gradient's own graph, roughly two to three times
    the memory of a training step) is held by the returned closure until it is dropped. With
    ``reuse=False`` the product may be called once: its last backward frees the graph as it goes
    (as a plain double backward does), which is measurably faster than retaining it.
    """
    leaves = [p.detach().requires_grad_(True) for p in primals.values()]  # the primals' memory
    with torch.enable_grad():
        with context():
            value = loss(dict(zip(layout.names, leaves, strict=True)))
        check_loss(value)
        grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:  # the gradient does not depend on the parameters: H = 0
        return lambda V: V.new_zeros(V.shape)
    outputs = [grads[i] for i in live]

    def grad_outputs(column: Tensor) -> list[Tensor]:  # column (P,) -> v_i of the live g_i
        pieces = layout.pieces(column)
        return pieces if len(live) == len(pieces) else [pieces[i] for i in live]

    def product(V: Tensor) -> Tensor:
        m = V.shape[1]

        def backward(j: int) -> tuple[Tensor, ...]:  # the pieces of H v_j, one per parameter
            # A column of a row-major block is copied once (free when V = W.T for W (m, P), the
            # layout this function returns).
            return vjp_unchecked(outputs, leaves, grad_outputs(V[:, j].contiguous()),
                                 retain_graph=reuse or j < m - 1)

        parts = backward(0)
        out = V.new_empty(m, V.shape[0])  # (m, P); allocated after a backward, see the docstring
        for j in range(m):
            if j:
                parts = backward(j)
            torch.cat([h.reshape(-1) for h in parts], out=out[j])  # row j: one concatenation
        return out.T  # (P, m)

    return product


def make_hvp_fwdrev(
    loss: Callable[[Params], Tensor],
    primals: Params,
    layout: ParamLayout,
    *,
    context: Callable[[], Any],
    check_loss: Callable[..., None],
    batched: bool = True,
) -> Product:
    """Forward-over-reverse HVP factory: ``jvp(grad(loss))``, ``vmap``-ed over the columns of V.

    Each call recomputes the forward and backward with dual numbers; ``batched=False`` loops the
    columns instead of ``vmap``. The vmapped route is tested against dense Hessians on LayerNorm
    models, where torch 2.13's forward-mode derivative of a vmapped *vjp* is wrong; vmap outside
    ``jvp(grad)`` is exact there.
    """

    def checked_loss(theta: Params) -> Tensor:
        value = loss(theta)
        check_loss(value, finite=False)  # values inside transforms cannot be read
        return value

    gradient = grad(checked_loss)

    def hvp(v: Params) -> Params:
        return jvp(gradient, (primals,), (v,))[1]

    def column(v: Tensor) -> Tensor:
        with context():  # a fresh context per forward: the same Dropout masks every time
            return layout.ravel(hvp(layout.unravel(v)))

    def product(V: Tensor) -> Tensor:
        if batched and V.shape[1] > 1:
            with context():  # randomness="same": one mask for all columns, as unbatched
                out = vmap(hvp, randomness="same")(layout.unravel_columns(V))  # each (m, *shape)
            return layout.ravel_columns(out)  # (P, m)
        return torch.stack([column(V[:, j]) for j in range(V.shape[1])], dim=1)  # (P, m)

    return product


def make_ggnvp_revrev(
    outputs: Callable[[Params], Tensor],
    loss_of_outputs: Callable[[Tensor], Tensor],
    primals: Params,
    layout: ParamLayout,
    *,
    context: Callable[[], Any],
    check_loss: Callable[..., None],
) -> Product:
    """Gauss-Newton-vector products ``J^T H_f J v`` by reverse mode only (graph kept between calls).

    ``J v`` comes from the double-vjp trick: ``u -> J^T u`` is linear in ``u``, so differentiating
    ``<J^T u, v>`` with respect to ``u`` gives ``J v``. ``H_f``, the Hessian of the batch loss with
    respect to the outputs, is applied by a second backward through ``loss_of_outputs``.
    """
    leaves = [p.detach().requires_grad_(True) for p in primals.values()]
    with torch.enable_grad():
        with context():
            f = outputs(dict(zip(layout.names, leaves, strict=True)))  # (n, k)
        f_leaf = f.detach().requires_grad_(True)
        value = loss_of_outputs(f_leaf)
        check_loss(value)
        grad_f = torch.autograd.grad(value, f_leaf, create_graph=True)[0]  # (n, k)
        u = torch.zeros_like(f, requires_grad=True)  # dummy cotangent (n, k)
        jtu = torch.autograd.grad(f, leaves, grad_outputs=u, create_graph=True, allow_unused=True)
    jtu_live = [(t, n) for t, n in zip(jtu, layout.names, strict=True) if t is not None]

    def product(V: Tensor) -> Tensor:
        out = V.new_zeros(V.shape[1], V.shape[0])  # (m, P)
        for j in range(V.shape[1]):
            vs = layout.unravel(V[:, j].contiguous())  # one column at a time, as in the HVP
            jv = torch.autograd.grad([t for t, _ in jtu_live], u,
                                     grad_outputs=[vs[n] for _, n in jtu_live],
                                     retain_graph=True, allow_unused=True)[0]  # (n, k)
            if jv is None or not grad_f.requires_grad:  # outputs constant, or loss linear in them
                continue
            hjv = torch.autograd.grad(grad_f, f_leaf, grad_outputs=jv, retain_graph=True)[0]
            jthjv = torch.autograd.grad(f, leaves, grad_outputs=hjv, retain_graph=True,
                                        allow_unused=True, materialize_grads=True)
            torch.cat([h.reshape(-1) for h in jthjv], out=out[j])  # (P,)
        return out.T  # (P, m)

    return product


def make_ggnvp_fwdrev(
    outputs: Callable[[Params], Tensor],
    loss_of_outputs: Callable[[Tensor], Tensor],
    primals: Params,
    layout: ParamLayout,
    *,
    context: Callable[[], Any],
    check_loss: Callable[..., None],
) -> Product:
    """Gauss-Newton-vector products with ``J v`` by forward mode and ``J^T w`` by one vjp.

    The forward is run once per call (``vjp``) plus once per vector (``jvp``, vmapped over V).
    """

    def loss_grad(f: Tensor) -> Tensor:
        value = loss_of_outputs(f)
        check_loss(value, finite=False)
        return value

    grad_f = grad(loss_grad)

    def product(V: Tensor) -> Tensor:
        # Each forward starts from a freshly seeded context, so Dropout masks agree between the
        # vjp forward and the (vmapped, randomness="same") jvp forwards.
        with context():
            f, vjp_fn = torch.func.vjp(outputs, primals)[:2]  # f (n, k)

        def ggnvp(v: Params) -> Params:
            jv = jvp(outputs, (primals,), (v,))[1]  # (n, k)
            hjv = jvp(grad_f, (f,), (jv,))[1]  # (n, k)
            return vjp_fn(hjv)[0]

        with context():
            out = vmap(ggnvp, randomness="same")(layout.unravel_columns(V))  # each (m, *shape)
        return layout.ravel_columns(out)  # (P, m)

    return product
