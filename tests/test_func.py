"""The reverse-mode building blocks of curvlab.fastpath: the tensor swap and the unchecked vjp."""

from __future__ import annotations

import pytest
import torch
from cases import ZOO, case

from curvlab import fastpath, func


def _replacements(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, perturbed, so that a call that ignored one would differ."""
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    g = torch.Generator().manual_seed(3)
    return {n: t.detach() + 0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype)
            if t.is_floating_point() else t.detach().clone() for n, t in named.items()}


@pytest.mark.parametrize("name", ZOO)
def test_reparametrized_equals_functional_call_and_puts_the_originals_back(name: str) -> None:
    c = case(name)
    model = c.model
    batch = c.data if isinstance(c.data, tuple) else c.data[0]
    tensors = _replacements(model)
    before = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    call = fastpath.Reparametrized(model, tensors)
    torch.testing.assert_close(call(tensors, batch[0]),
                               func.functional_forward(model, tensors, batch[0]), rtol=0, atol=0)
    after = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)  # the very same tensor objects


def test_reparametrized_puts_the_originals_back_when_the_forward_raises() -> None:
    class Failing(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("forward failed")

    model = Failing(2, 1)
    weight = model.weight
    call = fastpath.Reparametrized(model, ["weight"])
    with pytest.raises(RuntimeError, match="forward failed"):
        call({"weight": torch.zeros(1, 2)}, torch.ones(3, 2))
    assert model.weight is weight


def test_reparametrized_rejects_a_name_that_is_no_parameter_or_buffer() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"'0\.scale' is neither a parameter nor a buffer"):
        fastpath.Reparametrized(model, ["0.weight", "0.scale"])


def _graph() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """First-order gradients ``g`` of a loss in three leaves, the third unused by the loss."""
    g = torch.Generator().manual_seed(0)
    a, b, unused = (torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
                    for s in ((3, 4), (4,), (2,)))
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    loss = torch.tanh(x @ a + b).pow(2).sum()
    grads = torch.autograd.grad(loss, [a, b], create_graph=True)
    vs = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in grads]
    return list(grads), [a, b, unused], vs


@pytest.mark.parametrize("engine", [True, False])
@pytest.mark.parametrize("create_graph", [False, True])
def test_vjp_unchecked_equals_autograd_grad(monkeypatch: pytest.MonkeyPatch, engine: bool,
                                            create_graph: bool) -> None:
    if not engine:  # a torch without the engine function: the public route
        monkeypatch.setattr(fastpath, "_ENGINE_RUN_BACKWARD", None)
    grads, leaves, vs = _graph()
    want = torch.autograd.grad(grads, leaves, vs, retain_graph=True, create_graph=create_graph,
                               allow_unused=True, materialize_grads=True)
    got = fastpath.vjp_unchecked(grads, leaves, vs, retain_graph=False, create_graph=create_graph)
    assert len(got) == 3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
        assert g.requires_grad == create_graph
    assert torch.equal(got[2], torch.zeros(2, dtype=torch.float64))  # the unused leaf
