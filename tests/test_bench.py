"""`curvlab bench hvp|eigs`: the side-by-side front ends over benchmarks/, on quick settings."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from curvlab import cli

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import compare_hvp  # noqa: E402
import hvp  # noqa: E402

QUICK = argparse.Namespace(quick=True, dtype="float32", repeats=2, warmup=1, no_memory=True)


def test_bench_hvp_checks_times_and_measures_every_installed_library(tmp_path, capsys) -> None:
    out = tmp_path / "hvp.json"
    assert cli.main(["bench", "hvp", "--quick", "--models", "transformer", "gpt2",
                     "--out", str(out)]) == 0
    models = json.loads(out.read_text())["models"]
    gpt = models["gpt2"]  # the GPU model, here at toy size: tied embeddings, token inputs
    assert gpt["float64_relative_difference"]["double backward"] <= compare_hvp.AGREE
    assert gpt["x_gradient"]["curvlab (default)"] > 1
    r = models["transformer"]
    have = compare_hvp.installed()
    checked = {"double backward", *(lib for lib in compare_hvp.LIBRARIES if have[lib])}
    assert set(r["float64_relative_difference"]) == checked
    assert r["missing"] == [lib for lib in compare_hvp.LIBRARIES if not have[lib]]
    agreeing = {k for k, d in r["float64_relative_difference"].items() if d <= compare_hvp.AGREE}
    assert {"double backward", "PyHessian", "hessian-eigenthings"} & checked <= agreeing
    timed = {"gradient", "curvlab (default)", *agreeing}
    assert set(r["seconds_per_product"]) == timed | {"curvlab (default) H @ V, m=8"}
    assert all(t > 0 for t in r["seconds_per_product"].values())
    assert set(r["peak_memory_bytes"]) == timed
    memory = r["peak_memory_bytes"]
    assert memory["curvlab (default)"] > memory["gradient"] > 0  # the kept graph costs memory
    assert "| transformer d=64" in capsys.readouterr().out


def test_a_library_that_disagrees_is_reported_and_not_timed(monkeypatch) -> None:
    def wrong(model, crit, x, y, v):  # curvlab's product, 0.1% off
        product = compare_hvp.curvlab_default(model, crit, x, y, v)
        return lambda: 1.001 * product()

    monkeypatch.setitem(compare_hvp.BUILDERS, "PyHessian", wrong)
    monkeypatch.setattr(compare_hvp, "installed", lambda: {
        "PyHessian": True, "curvlinops": False, "hessian-eigenthings": False})
    r = compare_hvp.bench_model("transformer", QUICK, compare_hvp.torch.device("cpu"))
    assert r["float64_relative_difference"]["PyHessian"] == pytest.approx(1e-3, rel=1e-6)
    assert "PyHessian" not in r["seconds_per_product"]
    assert r["fastest_library"] is None and r["curvlab_over_fastest_library"] is None
    result = {"settings": {"dtype": "float32", "repeats": 2}, "models": {"transformer": r},
              "environment": compare_hvp.environment(compare_hvp.torch.device("cpu"))}
    assert "| | PyHessian | NO (1e-03): not timed |" in compare_hvp.markdown(result)


def test_missing_libraries_are_reported_not_an_error(monkeypatch) -> None:
    monkeypatch.setattr(compare_hvp, "installed", lambda: dict.fromkeys(compare_hvp.LIBRARIES,
                                                                        False))
    r = compare_hvp.bench_model("transformer", QUICK, compare_hvp.torch.device("cpu"))
    assert r["missing"] == list(compare_hvp.LIBRARIES)
    assert set(r["seconds_per_product"]) == {"gradient", "curvlab (default)", "double backward",
                                             "curvlab (default) H @ V, m=8"}
    result = {"settings": {"dtype": "float32", "repeats": 2}, "models": {"transformer": r},
              "environment": compare_hvp.environment(compare_hvp.torch.device("cpu"))}
    assert "| | curvlinops | not installed |" in compare_hvp.markdown(result)


def test_bench_eigs_reaches_the_reference_with_fewer_products(tmp_path) -> None:
    out = tmp_path / "eigs.json"
    assert cli.main(["bench", "eigs", "--quick", "--models", "transformer",
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())["models"]["transformer"]
    ours = r["solvers"]["curvlab (default)"]
    assert ours["k=1"]["reached"] and ours["k=5"]["reached"]
    assert ours["k=1"]["error"] <= 1e-4  # the default tol of sharpness
    assert r["target"]["pass"], r["target"]
    for cells in r["solvers"].values():
        assert {"k=1", "k=5"} <= set(cells)


def test_bench_outside_a_source_checkout_says_what_to_do(monkeypatch, capsys) -> None:
    monkeypatch.setitem(cli.BENCHMARKS, "hvp", "no_such_script.py")
    assert cli.main(["bench", "hvp", "--quick"]) == 2
    assert "not in the installed package; clone it" in capsys.readouterr().err


def test_hvp_benchmark_times_every_target_head_to_head(tmp_path) -> None:
    out = tmp_path / "hvp.json"
    hvp.main(["--quick", "--models", "transformer", "--no-malloc-tuning", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["settings"]["malloc"] is None and result["settings"]["target_rounds"] == 3
    r = result["models"]["transformer"]
    targets = {"curvlab reuse / PyHessian cached", "curvlab rev-rev no reuse / double backward",
               "reuse: m=8 block / 8 single products", "no reuse: m=8 block / 8 single products",
               "reuse: m=8 row-major block / 8 single products", hvp.CONTROL}
    if not compare_hvp.installed()["PyHessian"]:
        targets.remove("curvlab reuse / PyHessian cached")
    assert targets <= set(r["paired_ratios"]) and set(r["target_median_s"]) == targets
    for q in r["paired_ratios"].values():
        assert 0 < q["low"] <= q["median"] <= q["high"]
    # The timed routes compute the same product (float32 rounding apart).
    assert r["relative_difference_to_curvlab_reuse"]["double backward"] < 1e-5
    assert "| transformer | " in out.with_suffix(".md").read_text()


def test_hvp_verdicts_and_malloc_setting() -> None:
    assert hvp.verdict({"median": 0.99, "low": 0.97, "high": 1.02}) == "yes"
    assert hvp.verdict({"median": 1.01, "low": 0.99, "high": 1.03}) == "within noise"
    assert hvp.verdict({"median": 1.05, "low": 1.02, "high": 1.08}) == "no"
    # Single products get every round; the m = 8 pairs a quarter, at least 3.
    assert hvp.rounds_of(hvp.CONTROL, 40) == 40
    assert hvp.rounds_of("reuse: m=8 block / 8 single products", 40) == 10
    assert hvp.rounds_of("no reuse: m=8 block / 8 single products", 3) == 3
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import hvp; " \
           "print(hvp.keep_freed_memory())"  # process-wide, so in a child process
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout.strip()
    expected = "{'M_TRIM_THRESHOLD': 2147483647, 'M_MMAP_THRESHOLD': 33554432}"
    assert printed == (expected if sys.platform == "linux" else "None")


PAGE_FAULTS = """
import ctypes, ctypes.util, resource, sys
import torch
sys.path.insert(0, sys.argv[2])
import hvp
hvp.keep_freed_memory()
if sys.argv[1] == "trim0":  # the old bug: 2**34 truncated to a C int
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-1, 0)

def rounds(k):
    for _ in range(k):
        a, b = torch.ones(1 << 21), torch.ones(1 << 20)  # 8 MiB and 4 MiB
        del a, b

rounds(5)  # the heap grows over the first rounds
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults() -> None:
    # Freed temporaries must be reused. One round allocates, fills and frees 8 MiB and 4 MiB, 3,072
    # pages. With the tuning, twenty rounds together fault in fewer pages than one round would
    # (0 in most runs; the heap may still grow once, 1,024 pages). The control is the old bug, a
    # trim threshold of 0: glibc returns memory at frees, and twenty rounds fault about 10,000
    # pages in or more.
    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode, str(BENCHMARKS)],
                                  capture_output=True, text=True, check=True).stdout.strip())

    one_round = 3072  # pages
    assert faults("tuned") < one_round
    assert faults("trim0") > 2 * one_round


def test_keep_freed_memory_rejects_values_beyond_a_c_int() -> None:
    # Raised before any mallopt call, so this process's malloc is left as it was.
    with pytest.raises(ValueError, match=r"keep_freed_memory: M_TRIM_THRESHOLD must fit a C int"):
        hvp.keep_freed_memory(trim=2**34)
    with pytest.raises(ValueError, match=r"M_MMAP_THRESHOLD must fit a C int .* got -2147483649"):
        hvp.keep_freed_memory(mmap=-(2**31) - 1)


def test_warm_floor_is_never_above_the_stopping_rule(tmp_path) -> None:
    """The floor from a start is the fewest products at which the space holds the top
    eigenvalue to tol; the rule, from the same start, stops only once it does."""
    import warm_floor

    out = tmp_path / "floor.json"
    warm_floor.main(["--quick", "--models", "mlp", "--steps", "10", "--out", str(out)])
    rows = json.loads(out.read_text())["models"]["mlp"]["rows"]["10"]
    assert len(rows) == 1
    row = rows[0]
    assert row["rule_error"] < warm_floor.TOL
    assert all(row["floor"][s] is not None for s in warm_floor.STARTS), row["floor"]
    assert row["floor"]["u1_u2"] <= row["rule_matvecs"], row
