"""Data-parallel curvature on torch.distributed (gloo, 2 and 3 processes) against one process.

The ranks hold unequal shards (and unequal batches); every estimator must equal the one-process
value on the concatenated data to 1e-10 relative and be bit-identical on every rank.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dist_workers import (
    CASES,
    NTK_CASES,
    abort_at_exit,
    ddp_training_worker,
    measure,
    measure_ntk,
    run_ranks,
    spawn,
    train,
    training_data,
    vectors,
)
from torch.utils._pytree import tree_map

import curvlab as cl
from curvlab.testing import make_case

torch.distributed.is_available() or pytest.skip("torch.distributed is unavailable",
                                                allow_module_level=True)


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory) -> list[dict[str, Any]]:
    return spawn(request.param, tmp_path_factory.mktemp(f"world{request.param}"))


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    return {name: measure(name, make_case(name).data) for name in CASES}


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> None:
    scale = b.abs().max().item()
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name", CASES)
def test_sharded_estimators_equal_one_process(ranks, single, name: str) -> None:
    ours, ref = ranks[0][name], single[name]
    assert set(ours) == set(ref)
    for key in ref:
        close(ours[key], ref[key])


@pytest.mark.parametrize("name", CASES)
def test_every_rank_gets_the_same_bits(ranks, name: str) -> None:
    for other in ranks[1:]:
        for key, value in ranks[0][name].items():
            assert torch.equal(other[name][key], value), (name, key)


def test_ddp_model_is_unwrapped_and_its_training_unaffected(ranks, single) -> None:
    close(ranks[0]["ddp"]["ddp_Hv"], single["mlp_tanh"]["Hv"])
    for other in ranks[1:]:  # DDP's all-reduce ran: every rank took the same step
        assert torch.equal(other["ddp"]["after_step"], ranks[0]["ddp"]["after_step"])


def test_one_process_without_a_group_is_unchanged() -> None:
    c = make_case("mlp_tanh")
    H = cl.HessianOperator(c.model, c.loss_fn, c.data)
    assert H._shards is None
    V = vectors(H.shape[0])
    dense = cl.testing.dense_hessian(c.model, c.loss_fn, c.data)
    close(H @ V, dense @ V)
    halves = [tree_map(lambda t: t[:5], c.data), tree_map(lambda t: t[5:], c.data)]
    close(cl.HessianOperator(c.model, c.loss_fn, halves) @ V, dense @ V)


@pytest.mark.parametrize("name", NTK_CASES)
def test_ntk_over_sharded_inputs_equals_one_process(ranks, name: str) -> None:
    ref = measure_ntk(name, make_case(name).data[0])
    for r in ranks:
        for key, value in ref.items():
            close(r["ntk"][name][key], value)


def test_ddp_training_with_a_monitor(tmp_path) -> None:
    """One file, from rank 0, equal to one process on the global batches; training unchanged."""
    for with_monitor in (True, False):
        run_ranks(ddp_training_worker, 2, tmp_path, f"train{int(with_monitor)}", with_monitor)
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["run.h5"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or "tmp" in p.name]
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"params_1_{rank}.pt"),
                           torch.load(tmp_path / f"params_0_{rank}.pt"))
    run = cl.load_run(tmp_path / "run.h5")
    assert run.env["world_size"] == "2" and run.env["backend"] == "gloo"
    model = make_case("mlp_tanh").model
    with cl.RunLogger(tmp_path / "single" / "run.h5", {"lr": 0.05}) as logger:
        train(model, training_data(), 10, logger)
    single = cl.load_run(tmp_path / "single" / "run.h5")
    for name in ("sharpness", "loss"):
        assert run.metrics[name].step.tolist() == [0, 5, 10]
        torch.testing.assert_close(torch.as_tensor(run.metrics[name].value),
                                   torch.as_tensor(single.metrics[name].value), rtol=1e-8, atol=0)


def test_a_crash_in_teardown_only_warns_and_one_during_the_work_raises(tmp_path) -> None:
    with pytest.warns(UserWarning, match=r"rank 1 died by SIGABRT in torch.distributed's teardown"):
        run_ranks(abort_at_exit, 2, tmp_path, "exit", False)
    with (pytest.warns(UserWarning, match="died by SIGABRT during its work; running every rank"),
          pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGABRT")):
        run_ranks(abort_at_exit, 2, tmp_path, "work", True)
