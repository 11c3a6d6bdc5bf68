"""Exact curvature-vector product factories: Hessian (two routes) and Gauss-Newton (two routes).

Each factory takes the functional loss (or outputs) of :mod:`curvlab.func`, the primal parameter
tensors and their :class:`~curvlab.func.ParamLayout`, and returns a product ``V (P, m) -> (P, m)``.
The operators of :mod:`curvlab.operators` choose a route and wrap it.

Two exact Hessian-vector product routes (docs/math.md section 1):

- forward-over-reverse, ``Hv = jvp(grad(L), (theta,), (v,))[1]`` (Pearlmutter 1994), which
  recomputes the forward and backward for every call;
- reverse-over-reverse, ``Hv = grad(<grad(L), v>)``: the first-order gradient is built once with
  ``create_graph=True`` and every product is one second backward through that graph.

and two Gauss-Newton-vector product routes, ``G v = J^T H_f J v`` with ``J`` the Jacobian of the
outputs and ``H_f`` the Hessian of the loss with respect to the outputs (docs/math.md section 1).

Example:
    >>> import torch
    >>> from curvlab.func import ParamLayout, make_functional_loss
    >>> from contextlib import nullcontext
    >>> model = torch.nn.Linear(3, 1, bias=False)
    >>> x = torch.eye(3)
    >>> primals = {n: p.detach() for n, p in model.named_parameters()}
    >>> loss = make_functional_loss(model, lambda f, y: 0.5 * (f ** 2).sum(), {}, x, None)
    >>> hvp = make_hvp_fwdrev(loss, primals, ParamLayout.from_params(primals),
    ...                       context=nullcontext, check_loss=lambda *a, **k: None)
    >>> hvp(torch.eye(3))  # H = x^T x = I
    tensor([[1., 0., 0.],
            [0., 1., 0.],
            [0., 0., 1.]])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from curvlab.fastpath import vjp_unchecked
from curvlab.func import ParamLayout, Params, Product


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

    Two choices keep the fixed cost per call at that of a plain double backward (measurements in
    benchmarks/README.md, History): the operators build ``loss`` on a
    :class:`curvlab.fastpath.Reparametrized` of the model, whose slots are looked up once, and
    the second backward goes through :func:`curvlab.fastpath.vjp_unchecked`. Leaves per
    parameter (rather than views of one flat leaf) and the ``as_strided`` pieces of ``v`` were
    measured faster than the alternatives.

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
        out = V.new_empty(m, V.shape[0])  # (m, P), allocated after the first backward
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
