"""curvlab on models built by transformers, timm and torchvision (random init, from configs).

Products are checked against a plain double backward of the objective on the concatenated data
(the token mean for GPT-2, the example mean otherwise); the NTK against ``vmap(jacrev)`` on the
chosen output. Every entry point runs on each model without an adapter class.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import assert_rel_close, vectors
from real_models import BUILDERS, Real, lm_loss, reference_hvp
from torch.func import functional_call, jacrev, vmap

import curvlab as cl

NAMES = tuple(BUILDERS)


def _real(name: str, dtype: torch.dtype = torch.float64) -> Real:
    return BUILDERS[name](dtype)


@pytest.mark.parametrize("name", NAMES)
def test_products_equal_double_backward_on_the_concatenated_data(name: str) -> None:
    real = _real(name)
    H = cl.HessianOperator(real.model, real.loss_fn, real.batches, weights=real.weights)
    V = vectors(H.shape[0], 2)  # (P, 2)
    assert_rel_close(H @ V, reference_hvp(real, V), 1e-10)
    assert H.method == "rev-rev" and not any(n.startswith("_orig_mod") for n in H.param_names)


@pytest.mark.parametrize("name", ["gpt2", "resnet18"])
def test_float32_products_match_to_1e6_relative(name: str) -> None:
    real = _real(name, torch.float32)
    H = cl.HessianOperator(real.model, real.loss_fn, real.batches, weights=real.weights)
    V = vectors(H.shape[0], 1, dtype=torch.float32)  # (P, 1)
    expected = reference_hvp(real, V)
    error = torch.linalg.vector_norm(H @ V - expected) / torch.linalg.vector_norm(expected)
    assert error < 1e-6


def test_token_weights_give_the_token_mean_and_example_weights_do_not() -> None:
    """With padding, weighting batches by sequences is the Hessian of another objective."""
    real = _real("gpt2")
    V = vectors(sum(p.numel() for p in real.model.parameters()), 1)
    expected = reference_hvp(real, V)
    by_examples = cl.HessianOperator(real.model, real.loss_fn, real.batches) @ V
    assert torch.linalg.vector_norm(by_examples - expected) > 0.01 * torch.linalg.vector_norm(
        expected)
    by_tokens = cl.HessianOperator(real.model, real.loss_fn, real.batches,
                                   weights=cl.count_tokens(shift=True)) @ V
    assert_rel_close(by_tokens, expected, 1e-10)
    G = cl.GGNOperator(real.model, real.loss_fn, real.batches, weights=real.weights)
    assert_rel_close(G @ V, cl.testing.dense_ggn(real.model, real.loss_fn, real.concat) @ V,
                     1e-10)


OUTPUTS = {"gpt2": lambda out: out.logits[:, -1]}  # the next-token logits at the last position


def _reference_ntk(real: Real, x: object, output: object, loop: bool = False) -> torch.Tensor:
    """``J J^T`` ``(n, n, k, k)`` from per-example Jacobians by ``vmap(jacrev)``, or by a loop
    of ``jacrev`` over the examples (``loop``: HF's attention masks are data-dependent control flow,
    which vmap cannot run)."""
    params = {n: p.detach() for n, p in real.model.named_parameters()}
    buffers = dict(real.model.named_buffers())

    def single(p: dict, xi: object) -> torch.Tensor:
        xi = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), xi)
        args, kwargs = cl.batches.call_args(xi)
        out = functional_call(real.model, {**p, **buffers}, args, kwargs)
        return cl.batches.pick_output(out, output)[0].reshape(-1)  # (k,)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        if loop:
            n = cl.batches.batch_size(x)
            rows = [jacrev(single)(params, {key: t[i] for key, t in x.items()})
                    for i in range(n)]
            J = {name: torch.stack([r[name] for r in rows]) for name in params}
        else:
            J = vmap(jacrev(single), in_dims=(None, 0))(params, x)  # name -> (n, k, *shape)
    n, k = next(iter(J.values())).shape[:2]
    flat = torch.cat([j.reshape(n, k, -1) for j in J.values()], dim=2)  # (n, k, P)
    return torch.einsum("iap,jbp->ijab", flat, flat)  # (n, n, k, k)


@pytest.mark.parametrize("name", NAMES)
def test_ntk_matches_vmap_jacrev_on_the_chosen_output(name: str) -> None:
    real = _real(name, torch.float32 if name == "resnet18" else torch.float64)
    x = cl.batches.take(real.batches[0][0], 2)
    output = OUTPUTS.get(name, "auto")
    K = cl.empirical_ntk(real.model, x, output=output)  # (2, 2, k, k)
    expected = _reference_ntk(real, x, output, loop=isinstance(x, dict) and "attention_mask" in x)
    assert_rel_close(K, expected, 1e-10 if name != "resnet18" else 1e-4)
    eigs = cl.ntk_eigenvalues(real.model, x, output=output)
    n, k = expected.shape[1], expected.shape[2]
    dense = torch.linalg.eigvalsh(expected.permute(0, 2, 1, 3).reshape(n * k, n * k).double())
    assert_rel_close(eigs, dense.flip(0), 1e-8 if name != "resnet18" else 1e-4)


DEFAULT_LAYERS = {
    "gpt2": ("transformer.h.0:in", "transformer.h.0", "transformer.h.1", "transformer.ln_f"),
    "bert": ("bert.encoder.layer.0:in", "bert.encoder.layer.0", "bert.encoder.layer.1"),
    "vit": ("blocks.0:in", "blocks.0", "blocks.1", "norm"),
}


def test_gpt2_ntk_without_a_mask_matches_vmap_jacrev() -> None:
    real = _real("gpt2")
    x = {"input_ids": real.batches[0][0]["input_ids"]}  # no padding mask: vmap runs
    output = OUTPUTS["gpt2"]
    for method in ("jacobian", "ntvp"):
        K = cl.empirical_ntk(real.model, x, output=output, method=method)
        assert_rel_close(K, _reference_ntk(real, x, output), 1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_feature_speed_and_change_find_the_residual_stream(name: str) -> None:
    real = _real(name)
    batch = real.batches[1]
    r = cl.feature_speed(real.model, real.loss_fn, batch, lrs=0.01)
    if name in DEFAULT_LAYERS:
        assert r.layers == DEFAULT_LAYERS[name]
    assert r.cut is not None and np.isfinite(r.cos_theta).all()
    assert (r.cos_theta > 0).all()  # a gradient step moves every feature downhill
    # The formula is exact on cuts; GPT-2's stream is none (the embedding is tied to the head).
    assert (r.cut.any() if name != "gpt2" else not r.cut[1:].any())
    np.testing.assert_allclose(r.predicted_update_norm[r.cut], r.feature_update_norm[r.cut],
                               rtol=1e-8)
    opt = torch.optim.AdamW(real.model.parameters(), lr=1e-3)
    change = cl.feature_change(real.model, real.loss_fn, batch, opt)
    assert change.layers == r.layers and (change.change_rms > 0).all()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "resnet18"
                                  else n for n in NAMES])  # resnet18: a minute, in test-slow
def test_a_monitor_with_every_measurement_runs_without_an_adapter(name: str, tmp_path) -> None:
    real = _real(name, torch.float32)
    model = real.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    budget = {"tol": 1e-2, "max_iters": 8}  # the wiring is under test here, not convergence
    measurements = [cl.Loss(every=1), cl.Sharpness(every=2, **budget),
                    cl.Sharpness(every=2, preconditioned="adam", **budget),
                    cl.HessianSpectrum(every=2, k=2, num_probes=1, num_iters=6, **budget),
                    # GPT-2: the NTK of the last position's logits; the loss gets all of them
                    cl.NTKSpectrum(every=2, k=3, size=2, output=OUTPUTS.get(name)),
                    cl.FeatureSpeed(every=2), cl.FeatureChange(every=2)]
    with cl.RunLogger(tmp_path / "run.h5", {"model": name}) as log:
        mon = cl.Monitor(model, real.loss_fn, real.batches, log, measurements, optimizer=opt,
                         weights=real.weights)
        mon.on_train_start()
        for step in range(1, 3):
            for inputs, targets in real.batches:
                opt.zero_grad()
                out = cl.batches.pick_output(cl.batches.call_model(model, inputs))
                real.loss_fn(out, targets).backward()
                opt.step()
            mon.on_train_batch_end(step)
        mon.on_train_end()
    run = cl.load_run(tmp_path / "run.h5")
    for metric in ("loss", "sharpness", "sharpness_adam", "hessian_top", "ntk_top",
                   "feature_cos_theta", "feature_change_rms"):
        assert np.isfinite(run[metric].value).all(), metric
    assert run["sharpness"].step.tolist() == [0, 2] and run["sharpness_adam"].step.tolist() == [2]
    assert run["loss"].step.tolist() == [0, 1, 2]


def test_lm_loss_is_the_models_own_loss() -> None:
    """The hand-written loss of real_models is what GPT2LMHeadModel computes from labels."""
    real = _real("gpt2")
    inputs, labels = real.concat
    out = real.model(**inputs, labels=labels)  # transformers computes its loss in float32
    torch.testing.assert_close(lm_loss(out.logits, labels).float(), out.loss, rtol=1e-6, atol=0)
