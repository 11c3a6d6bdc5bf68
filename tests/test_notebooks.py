"""The tutorial notebooks: committed without outputs, and each one runs top to bottom."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = [
    "01_hvp_and_top_eigenvalues.ipynb",
    "02_spectral_density.ipynb",
    "03_empirical_ntk.ipynb",
    "04_feature_speed.ipynb",
    "05_width_sweeps_and_super_consistency.ipynb",
    "06_callbacks_in_your_own_loop.ipynb",
]


def test_the_six_notebooks_exist() -> None:
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    executed = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
                and (cell.outputs or cell.execution_count is not None)]
    assert not executed, (f"{path.name}: code cells {executed} have outputs or execution counts; "
                          "clear them before committing (e.g. jupyter nbconvert "
                          "--ClearOutputPreprocessor.enabled=True --inplace)")
    assert "widgets" not in nb.metadata, f"{path.name}: drop the widget state from the metadata"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first cell that fails
    stderr = [out.text for cell in nb.cells if cell.cell_type == "code"
              for out in cell.outputs if out.output_type == "stream" and out.name == "stderr"]
    assert not stderr, f"{path.name} printed to stderr (warnings?):\n" + "".join(stderr)
    assert not list(tmp_path.iterdir()), f"{path.name} left files in its working directory"
