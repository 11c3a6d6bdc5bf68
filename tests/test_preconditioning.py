"""Preconditioned operators and the scales read from real optimizers."""

from __future__ import annotations

import torch
from cases import assert_rel_close, case, hessian, vectors

import curvlab as cl


def test_preconditioned_equals_sqrt_d_h_sqrt_d() -> None:
    c, H_dense = case("cnn"), hessian("cnn")
    H = cl.HessianOperator(c.model, c.loss_fn, c.data)
    d = torch.rand(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d += 0.1
    S = cl.preconditioned(H, d)
    expected = d.sqrt()[:, None] * H_dense * d.sqrt()[None, :]  # (P, P)
    V = vectors(H.shape[0], 3)
    assert_rel_close(S @ V, expected @ V)
    assert_rel_close(S @ V[:, 0], expected @ V[:, 0])
    assert S.num_matvecs == 4
    # Same eigenvalues as D H.
    top = torch.linalg.eigvalsh(expected)[-1]
    assert_rel_close(torch.linalg.eigvals(torch.diag(d) @ H_dense).real.max(), top, tol=1e-9)


def test_lr_scales_from_param_groups() -> None:
    c = case("mlp_tanh")
    m = c.model
    opt = torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.4},
                           {"params": list(m[2].parameters()) + list(m[4].parameters())}], lr=0.1)
    d = cl.lr_scales(opt, m)
    n0 = sum(p.numel() for p in m[0].parameters())
    torch.testing.assert_close(d[:n0], torch.full((n0,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(d[n0:], torch.ones(d.numel() - n0, dtype=torch.float64))
    torch.testing.assert_close(cl.lr_scales(opt, m, base_lr=0.4)[0], torch.tensor(1.0).double())


def test_adam_scales_match_hand_computation_after_real_steps() -> None:
    """``P_t = (1 - beta1^(t+1)) (sqrt(v_t / (1 - beta2^(t+1))) + eps)`` (Cohen et al. 2022)."""
    c = cl.testing.make_case("mlp_tanh")
    m, (x, y) = c.model, c.data
    for optimizer, amsgrad in ((torch.optim.Adam, False), (torch.optim.Adam, True),
                               (torch.optim.AdamW, False)):
        opt = optimizer([{"params": m[0].parameters(), "lr": 3e-3},
                         {"params": list(m[2].parameters()) + list(m[4].parameters())}],
                        lr=1e-3, betas=(0.9, 0.99), eps=1e-6, amsgrad=amsgrad)
        for _ in range(5):
            opt.zero_grad()
            c.loss_fn(m(x), y).backward()
            opt.step()
        d = cl.adam_scales(opt, m)
        expected, without_beta1 = [], []
        for i, p in enumerate(m.parameters()):
            v = opt.state[p]["max_exp_avg_sq" if amsgrad else "exp_avg_sq"]
            scale = 3.0 if i < 2 else 1.0
            P = (1 - 0.9 ** 6) * ((v / (1 - 0.99 ** 6)).sqrt() + 1e-6)  # the 6th step's P
            expected.append((scale / P).reshape(-1))
            without_beta1.append((scale / ((v / (1 - 0.99 ** 5)).sqrt() + 1e-6)).reshape(-1))
        torch.testing.assert_close(d, torch.cat(expected), rtol=1e-14, atol=0)
        # The first-moment factor is large early: about 2.3x at step 5 (the old definition).
        ratio = (d / torch.cat(without_beta1)).median()
        assert 2.2 < float(ratio) < 2.4
