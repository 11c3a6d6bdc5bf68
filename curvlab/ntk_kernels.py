"""The three exact methods behind :func:`curvlab.empirical_ntk`, and their cost model.

Every method returns ``J(x1) D J(x2)^T`` in one of the output layouts of :mod:`curvlab.ntk`
(``"full"`` ``(n1, n2, k, k)``, ``"trace"`` ``(n1, n2)``, ``"diagonal"`` ``(n1, n2, k)``);
they differ only in cost. The methods, with the cost model of Novak et al. 2022
(arXiv:2206.08720), ``N`` examples, ``O`` outputs, ``[FP]`` one forward pass of one example,
``P`` parameters:

- ``"jacobian"``: per-example Jacobians by ``vmap(jacrev)``, contracted: ``N O [FP] + N^2 O^2 P``
  flops and ``N O P`` memory. A forward with data-dependent control flow, which ``vmap`` over
  examples cannot run (Hugging Face's padding masks), is looped over the examples instead.
- ``"ntvp"``: NTK-vector products, ``J1 (D (J2^T e_jb))`` for every column: ``N^2 O [FP]``.
- ``"structured"``: per layer, for ``y = W h + b`` the kernel is ``<h(x), h(x')> <g_a(x), g_b(x')>``
  (plus ``<g_a, g_b>`` for ``b``), ``g_a`` the backward vector of output ``a`` at the layer output
  (one backward per output, summed over tokens and repeated calls): ``N O [FP] + N^2 O^2 sum_l
  (d_in + d_out) T^2``, no per-example Jacobian. Linear layers only (and only with scales that are
  constant per tensor); every other parameter falls back to per-example Jacobians.
- ``"auto"``: the smallest of these estimates (``[FP]`` taken as ``2 P`` flops).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2).double()
    >>> s = KernelSetup(model, torch.eye(3, dtype=torch.float64), None, None, None, "example")
    >>> sorted(method_costs(s, "full"))
    ['jacobian', 'ntvp', 'structured']
    >>> structured_kernel(s, "trace", None)  # 2 (<x, x'> + 1) for 2 outputs
    tensor([[4., 2., 2.],
            [2., 4., 2.],
            [2., 2., 4.]], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp, vmap

from curvlab import func
from curvlab.batches import Output, pick_output
from curvlab.curvature import select_params

_tree_map = torch.utils._pytree.tree_map


def reduce_kernel(K: Tensor, outputs: str) -> Tensor:
    """``(n1, n2, k, k)`` to the requested reduction."""
    if outputs == "full":
        return K
    diag = torch.diagonal(K, dim1=2, dim2=3)  # (n1, n2, k)
    return diag if outputs == "diagonal" else diag.sum(-1)


def contract(A: Tensor, B: Tensor, outputs: str) -> Tensor:
    """Kernel of per-example features ``A (n1, k, F)``, ``B (n2, k, F)`` in the output layout."""
    if outputs == "full":
        return torch.einsum("iaf,jbf->ijab", A, B)  # (n1, n2, k, k)
    diag = torch.einsum("iaf,jaf->ija", A, B)  # (n1, n2, k)
    return diag if outputs == "diagonal" else diag.sum(-1)


class KernelSetup:
    """Validated inputs shared by the methods: parameters, scales, a functional model.

    ``x2=None`` means the symmetric kernel on ``x1``; ``call`` names the entry point in errors.
    """

    def __init__(self, model: nn.Module, x1: Any, x2: Any, params: Iterable[str] | None,
                 scales: Tensor | None, call: str, output: Output = "auto") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{call}: model must be a torch.nn.Module, got {type(model).__name__}")
        model = func.unwrap_compiled(model)  # the eager module: vmap and hooks need it
        self.output = output
        batchnorm = [n for n, m in model.named_modules()
                     if isinstance(m, func.BATCHNORM) and m.training]
        if batchnorm:
            raise ValueError(f"{call}: BatchNorm modules {batchnorm[:4]} are in training mode, "
                             "where one example's output depends on the others and per-example "
                             "Jacobians would be wrong; call model.eval() first")
        self.model, self.call = model, call
        self.params = {n: p.detach() for n, p in select_params(model, params, call).items()}
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if n not in self.params}
        self.frozen.update({n: b.detach() for n, b in model.named_buffers()})
        self.layout = func.ParamLayout.from_params(self.params)
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.scales = self._split_scales(scales, first)
        self.x1, self.x2 = x1, x1 if x2 is None else x2
        self.symmetric = x2 is None
        self.k = self.outputs(self.params, self.x1, "x1").shape[1]
        if not self.symmetric:
            self.outputs(self.params, self.x2, "x2")

    def _split_scales(self, scales: Tensor | None, like: Tensor) -> dict[str, Tensor] | None:
        if scales is None:
            return None
        P = self.layout.numel
        if not isinstance(scales, Tensor) or scales.shape != (P,):
            got = tuple(scales.shape) if isinstance(scales, Tensor) else type(scales).__name__
            raise ValueError(f"{self.call}: scales must be a tensor of shape ({P},), got {got}")
        return self.layout.unravel(scales.to(like))

    def context(self) -> Any:
        return func.forward_context(self.model, train_mode=False, seed=0, device=self.device)

    def forward(self, params: dict[str, Tensor], x: Any,
                base: dict[str, Tensor] | None = None) -> Tensor:
        """``f(x; params)`` as ``(n, k)``: the tensor ``output`` picks, trailing dims flattened
        (a language model's ``(n, T, V)`` logits become ``(n, T V)``)."""
        tensors = {**(self.frozen if base is None else base), **params}
        f = pick_output(func.functional_forward(self.model, tensors, x), self.output, self.call)
        return f.reshape(f.shape[0], -1) if f.ndim > 2 else f  # (n, k)

    def outputs(self, params: dict[str, Tensor], x: Any, name: str = "x") -> Tensor:
        """``f(x; params)`` ``(n, k)`` with a clear error for inputs the model cannot take."""
        try:
            with self.context():
                f = self.forward(params, x)
        except RuntimeError as err:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.call}: the model cannot be applied to {name} of shape "
                             f"{shape} ({err}); pass a batch of inputs as the model expects"
                             ) from err
        if f.ndim != 2:
            raise ValueError(f"{self.call}: the model must return outputs of shape (n, k) (or "
                             f"(n, ...), flattened), got {tuple(f.shape)}; pick another tensor "
                             "with output=")
        return f

    def jacobians(self, x: Any, names: Iterable[str], chunk_size: int | None) -> Tensor:
        """Per-example Jacobians for ``names``, flattened and scaled by sqrt(D): ``(n, k, F)``."""
        names = list(names)
        sub = {n: self.params[n] for n in names}
        rest = {**self.frozen, **{n: p for n, p in self.params.items() if n not in sub}}

        def single(p: dict[str, Tensor], xi: Any) -> Tensor:
            xi = _tree_map(lambda t: t.unsqueeze(0), xi)
            return self.forward(p, xi, base=rest)[0]  # (k,)

        def take_row(tree: Any, i: int) -> Any:  # example i without its batch dimension
            return _tree_map(lambda t: t[i], tree)

        n = func.batch_size(x)
        with self.context():
            try:
                J = vmap(jacrev(single), in_dims=(None, 0), chunk_size=chunk_size)(sub, x)
            except RuntimeError as err:  # data-dependent control flow, e.g. HF's padding masks
                if "vmap" not in str(err):
                    raise
                rows = [jacrev(single)(sub, take_row(x, i)) for i in range(n)]  # name -> (k, ...)
                J = {name: torch.stack([r[name] for r in rows]) for name in names}  # (n, k, ...)
        flat = [self._scaled(name, J[name]).reshape(n, self.k, -1) for name in names]
        return torch.cat(flat, dim=2)  # (n, k, F)

    def _scaled(self, name: str, J: Tensor) -> Tensor:
        return J if self.scales is None else J * self.scales[name].sqrt()


def jacobian_kernel(s: KernelSetup, outputs: str, chunk_size: int | None,
                     names: Iterable[str] | None = None) -> Tensor:
    names = list(s.params if names is None else names)
    J1 = s.jacobians(s.x1, names, chunk_size)  # (n1, k, F)
    J2 = J1 if s.symmetric else s.jacobians(s.x2, names, chunk_size)  # (n2, k, F)
    return contract(J1, J2, outputs)


def ntvp_kernel(s: KernelSetup, outputs: str, chunk_size: int | None) -> Tensor:
    def f1(p: dict[str, Tensor]) -> Tensor:
        return s.forward(p, s.x1)  # (n1, k)

    def f2(p: dict[str, Tensor]) -> Tensor:
        return s.forward(p, s.x2)  # (n2, k)

    n2, k = func.batch_size(s.x2), s.k
    with s.context():
        pullback = vjp(f2, s.params)[1]
        eye = torch.eye(n2 * k, dtype=s.dtype, device=s.device).view(n2 * k, n2, k)

        def column(e: Tensor) -> Tensor:  # e (n2, k) -> J1 D J2^T e (n1, k)
            (u,) = pullback(e)
            if s.scales is not None:
                u = {n: t * s.scales[n] for n, t in u.items()}
            return jvp(f1, (s.params,), (u,))[1]

        cols = vmap(column, chunk_size=chunk_size)(eye)  # (n2 k, n1, k)
    K = cols.view(n2, k, -1, k).permute(2, 0, 3, 1)  # (n1, n2, k_a, k_b)
    return reduce_kernel(K, outputs)


def weight_multiplier(m: nn.Module) -> float | None:
    """``c`` for a module computing ``c W h + b``; ``None`` for anything else.

    ``nn.Linear`` itself: 1. A Linear subclass that overrides ``forward`` says what it computes
    with a method ``weight_multiplier() -> c`` (curvlab's ``ScaledLinear`` does); without one its
    kernel comes from per-example Jacobians, which are exact for any forward.
    """
    if not isinstance(m, nn.Linear):
        return None
    if type(m).forward is nn.Linear.forward:
        return 1.0
    declared = getattr(m, "weight_multiplier", None)
    return float(declared()) if callable(declared) else None


def structured_layers(s: KernelSetup) -> dict[str, nn.Linear]:
    """Linear modules whose parameters are all selected, with scales constant per tensor."""
    layers = {}
    for name, m in s.model.named_modules():
        if weight_multiplier(m) is None:
            continue
        names = [f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)]
        if not all(n in s.params for n in names):
            continue
        if s.scales is not None and any((s.scales[n] != s.scales[n].flatten()[0]).any()
                                        for n in names):
            continue  # scales vary inside the tensor: the factorization does not hold
        layers[name] = m
    return layers


def layer_features(s: KernelSetup, x: Any, layers: dict[str, nn.Linear]
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer: inputs ``h (n, U, d_in)`` and backward vectors ``g (n, k, U, d_out)``.

    ``U`` stacks tokens and repeated calls of the layer (both add up in its gradient).
    """
    if not layers:
        return {}
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
    hooks = [m.register_forward_hook(
        lambda mod, args, out, name=name: calls[name].append((args[0].detach(), out)))
        for name, m in layers.items()]
    leaves = {n: p.detach().requires_grad_(True) for n, p in s.params.items()}
    try:
        with torch.enable_grad(), s.context():
            f = s.forward(leaves, x)  # (n, k)
    finally:
        for hook in hooks:
            hook.remove()
    n = f.shape[0]
    ys = [y for name in layers for _, y in calls[name]]
    grads = [torch.autograd.grad(f[:, a].sum(), ys, retain_graph=True, allow_unused=True)
             for a in range(s.k)]  # examples are independent in eval mode: sum, then split
    features, i = {}, 0
    for name in layers:
        hs, gs = [], []
        for h, y in calls[name]:
            hs.append(h.reshape(n, -1, h.shape[-1]))  # (n, U_c, d_in)
            g = torch.stack([torch.zeros_like(y) if gr[i] is None else gr[i] for gr in grads], 1)
            gs.append(g.reshape(n, s.k, -1, y.shape[-1]))  # (n, k, U_c, d_out)
            i += 1
        features[name] = (torch.cat(hs, 1), torch.cat(gs, 2))
    return features


def structured_kernel(s: KernelSetup, outputs: str, chunk_size: int | None) -> Tensor:
    layers = structured_layers(s)
    covered = {f"{name}.{p}" if name else p
               for name, m in layers.items() for p, _ in m.named_parameters(recurse=False)}
    rest = [n for n in s.params if n not in covered]
    F1 = layer_features(s, s.x1, layers)
    F2 = F1 if s.symmetric else layer_features(s, s.x2, layers)
    K = jacobian_kernel(s, outputs, chunk_size, rest) if rest else 0.0
    b, out = ("b", "ijab") if outputs == "full" else ("a", "ija")
    for name, m in layers.items():
        (h1, g1), (h2, g2) = F1[name], F2[name]
        prefix = f"{name}." if name else ""
        c = weight_multiplier(m) or 1.0  # y = c W h + b: the weight's kernel carries c^2
        d_w = c * c * (1.0 if s.scales is None else s.scales[prefix + "weight"].flatten()[0])
        d_b = 0.0 if m.bias is None else (
            1.0 if s.scales is None else s.scales[prefix + "bias"].flatten()[0])
        if h1.shape[1] == h2.shape[1] == 1:  # one token, one call: add into K by row blocks
            if isinstance(K, float):
                K = torch.zeros(kernel_shape(g1.shape[0], g2.shape[0], s.k, outputs),
                                dtype=g1.dtype, device=g1.device)
            rows = max(1, g1.shape[0] // 8)  # transient memory: an eighth of the kernel
            for i in range(0, g1.shape[0], rows):
                block = contract(g1[i : i + rows, :, 0], g2[:, :, 0], outputs)  # <g_a, g_b>
                factor = d_w * (h1[i : i + rows, 0] @ h2[:, 0].T) + d_b  # (rows, n2)
                K[i : i + rows].addcmul_(block, factor.view(*factor.shape,
                                                            *[1] * (block.ndim - 2)))
            continue
        else:
            Kh = torch.einsum("iud,jvd->ijuv", h1, h2)  # (n1, n2, U1, U2)
            term = torch.einsum(f"ijuv,iaue,j{b}ve->{out}", Kh, g1, g2)  # (n1, n2, k[, k])
            term = d_w * (term if outputs == "full" else reduce_pairs(term, outputs))
            if m.bias is not None:
                term += d_b * contract(g1.sum(2), g2.sum(2), outputs)
        K = term if isinstance(K, float) else K.add_(term)
    return K  # type: ignore[return-value]


def kernel_shape(n1: int, n2: int, k: int, outputs: str) -> tuple[int, ...]:
    return {"full": (n1, n2, k, k), "diagonal": (n1, n2, k), "trace": (n1, n2)}[outputs]


def reduce_pairs(term: Tensor, outputs: str) -> Tensor:
    """``term (n1, n2, k)`` holds the diagonal already; sum it for ``"trace"``."""
    return term if outputs == "diagonal" else term.sum(-1)


def method_costs(s: KernelSetup, outputs: str) -> dict[str, float]:
    """The flop estimates of the module docstring for this model and these inputs."""
    n1, n2 = func.batch_size(s.x1), func.batch_size(s.x2)
    N, O, P = n1 + (0 if s.symmetric else n2), s.k, s.layout.numel
    O2 = O * O if outputs == "full" else O
    FP = 2.0 * P
    layers = structured_layers(s)
    one = _tree_map(lambda t: t[:1], s.x1)
    tokens = {name: h.shape[1] for name, (h, _) in layer_features(s, one, layers).items()}
    covered = sum(p.numel() for m in layers.values() for p in m.parameters(recurse=False))
    per_pair = sum(tokens[name] ** 2 * (m.in_features + m.out_features + 1)
                   for name, m in layers.items())
    return {
        "jacobian": N * O * FP + n1 * n2 * O2 * P,
        "ntvp": n2 * O * (n1 + n2) * FP,
        "structured": N * O * FP + n1 * n2 * O2 * (per_pair + P - covered),
    }
