"""The batch and output convention (curvlab.batches) and its errors."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import assert_rel_close, vectors
from torch import nn

import curvlab as cl
from curvlab.batches import (
    as_batches,
    batch_weight,
    call_model,
    check_weights,
    is_batch,
    pick_output,
    take,
    take_batch,
)
from curvlab.testing import mse


@dataclass
class Out:  # a ModelOutput-like dataclass: no logits field
    hidden: torch.Tensor
    extra: tuple


def test_pick_output_by_default_key_index_callable_and_none():
    t = torch.ones(2, 3)
    assert pick_output(t) is t
    assert pick_output(OrderedDict(loss=torch.zeros(()), logits=t)) is t  # .logits wins
    assert pick_output(Out(t, ())) is t  # the first tensor of a dataclass
    assert pick_output((None, t, torch.zeros(1))) is t  # the first tensor of a tuple
    pair = (torch.zeros(1), t)
    assert pick_output(pair, 1) is t and pick_output({"h": t}, "h") is t
    assert pick_output(Out(t, ()), "hidden") is t and pick_output(pair, lambda o: o[1]) is t
    assert pick_output(pair, None) is pair


def test_pick_output_errors():
    with pytest.raises(TypeError, match=r"output must be 'auto', a key or attribute name"):
        pick_output(torch.ones(1), 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"output='missing' found no tensor.*pass output="):
        pick_output({"h": torch.ones(1)}, "missing")
    with pytest.raises(ValueError, match=r"output='auto' found no tensor in the model's outputs"):
        pick_output(("text", 3))


def test_call_model_by_the_form_of_the_inputs():
    def f(*args, **kwargs):
        return args, kwargs

    x = torch.ones(2)
    assert call_model(f, x) == ((x,), {})
    assert call_model(f, (x, x)) == ((x, x), {})
    assert call_model(f, {"a": x}) == ((), {"a": x})
    assert call_model(f, ({"a": x},)) == (({"a": x},), {})  # a dict passed positionally


def test_take_slices_every_per_example_tensor_and_keeps_the_rest():
    inputs = {"ids": torch.arange(12).reshape(3, 4), "scale": torch.tensor(2.0),
              "table": torch.ones(5, 2)}
    cut = take(inputs, 2)
    assert cut["ids"].shape == (2, 4) and cut["scale"].ndim == 0 and cut["table"].shape == (5, 2)
    x, y = take_batch(((torch.ones(3, 2), torch.zeros(3)), torch.arange(3)), 1)
    assert x[0].shape == (1, 2) and x[1].shape == (1,) and y.tolist() == [0]


def test_is_batch_tells_one_batch_from_several():
    x, y = torch.ones(3, 2), torch.zeros(3)
    assert is_batch((x, y)) and is_batch(({"a": x}, y)) and is_batch(((x, x), y))
    assert not is_batch(((x, y), (x, y))) and not is_batch([(x, y)])


def test_tuple_inputs_are_positional_arguments_of_the_model():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, u, w):
            return self.a(u) * torch.tanh(self.b(w))

    torch.manual_seed(0)
    model = Two().double()
    u, w, y = (torch.randn(6, 3).double(), torch.randn(6, 4).double(), torch.randn(6, 2).double())
    H = cl.HessianOperator(model, mse, ((u, w), y))
    expected = cl.testing.dense_hessian(model, mse, ((u, w), y))
    V = vectors(H.shape[0], 2)
    assert_rel_close(H @ V, expected @ V)
    K = cl.empirical_ntk(model, (u, w))
    assert_rel_close(K[..., 0, 0].trace(), cl.testing.dense_jacobian(model, (u, w))[:, 0]
                     .pow(2).sum())


def test_weights_callables_and_their_errors():
    x, y = torch.ones(3, 2), torch.tensor([[1, -100], [2, 3], [-100, -100]])
    assert batch_weight(None, x, y, 0, "call") == 3
    assert batch_weight(cl.count_tokens(), x, y, 0, "call") == 3
    assert batch_weight(cl.count_tokens(shift=True), x, y, 0, "call") == 1
    assert batch_weight(cl.count_tokens(key="labels"), x, {"labels": y}, 0, "call") == 3
    with pytest.raises(ValueError, match=r"weights\(inputs, targets\) must give a finite count"):
        batch_weight(lambda i, t: -1, x, y, 2, "call")
    with pytest.raises(TypeError, match=r"weights must be None \(examples\) or a callable"):
        check_weights(3, "HessianOperator")
    with pytest.raises(TypeError, match=r"count_tokens: expected the targets to be a tensor"):
        cl.count_tokens()(x, {"labels": y})
    with pytest.raises(TypeError, match=r"HessianOperator: weights must be None"):
        cl.HessianOperator(nn.Linear(2, 1), mse, (x, torch.ones(3, 1)), weights="tokens")


def test_weighted_batches_give_the_weighted_mean_and_zero_weights_drop_out():
    """Against the dense Hessian of sum_b w_b L_b / sum_b w_b, computed by hand."""
    case = cl.testing.make_case("multibatch")
    weights = {7: 1.0, 3: 0.0, 12: 5.0}  # by batch size: the middle batch is left out
    weigh = lambda inputs, targets: weights[len(targets)]  # noqa: E731
    H = cl.HessianOperator(case.model, case.loss_fn, case.data, weights=weigh)
    parts = [cl.testing.dense_hessian(case.model, case.loss_fn, b) for b in case.data]
    expected = (1.0 * parts[0] + 5.0 * parts[2]) / 6.0
    V = vectors(H.shape[0], 3)
    assert_rel_close(H @ V, expected @ V)
    assert_rel_close(cl.testing.dense_hessian(case.model, case.loss_fn, case.data,
                                              weights=weigh), expected)
    with pytest.raises(ValueError, match="holds no batches of positive weight"):
        cl.HessianOperator(case.model, case.loss_fn, case.data, weights=lambda i, t: 0) @ V


def test_a_layer_input_can_be_named_and_equals_the_previous_output():
    from real_models import vit

    real = vit()
    batch = real.batches[0]
    r = cl.feature_speed(real.model, real.loss_fn, batch, lrs=0.01,
                         layers=["blocks.0", "blocks.1:in"])
    np.testing.assert_allclose(r.cos_theta[0], r.cos_theta[1], rtol=1e-12)
    np.testing.assert_allclose(r.feature_update_norm[0], r.feature_update_norm[1], rtol=1e-12)
    assert cl.layers.find_blocks(real.model) == ["blocks.0", "blocks.1"]
    own = cl.models.Transformer(16, depth=2)  # its attention is inline: no transformer default
    assert cl.layers.find_blocks(own) is None


def test_a_language_model_loss_over_a_dataloader_of_dict_batches():
    """A non-shuffling DataLoader of dict rows is batches of the convention."""
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(5, 4), nn.Linear(4, 5)

        def forward(self, input_ids, attention_mask):
            return {"logits": self.out(torch.tanh(self.emb(input_ids))) * attention_mask[..., None]}

    model = LM().double()
    ids = torch.randint(0, 5, (6, 3))
    rows = [({"input_ids": ids[i], "attention_mask": torch.ones(3)}, ids[i]) for i in range(6)]
    loader = torch.utils.data.DataLoader(rows, batch_size=2)
    assert as_batches(loader, "test")[1] is False

    def loss(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    H = cl.HessianOperator(model, loss, loader, weights=cl.count_tokens())
    whole = ({"input_ids": ids, "attention_mask": torch.ones(6, 3)}, ids)
    V = vectors(H.shape[0], 1)
    assert_rel_close(H @ V, cl.testing.dense_hessian(model, loss, whole) @ V)
