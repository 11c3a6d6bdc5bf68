"""The README's tours run as written."""

import re
from pathlib import Path


def _run_block(index: int) -> dict:
    """Execute the README's python block ``index`` and return its namespace."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) > index, f"the README has no python block {index}"
    namespace: dict = {}
    exec(compile(blocks[index], "README.md", "exec"), namespace)
    return namespace


def test_readme_tour_runs() -> None:
    assert _run_block(0)["res"].converged


def test_readme_training_loop_tour_runs() -> None:
    namespace = _run_block(1)
    assert namespace["run"].metrics["sharpness"].step.tolist() == [0, 10, 20]
    assert len(namespace["fs"].layers) == 5


def test_readme_real_models_tour_runs() -> None:
    import torchvision_compat  # noqa: F401  (transformers imports torchvision)

    namespace = _run_block(2)
    assert namespace["fs"].layers == ("transformer.h.0:in", "transformer.h.0", "transformer.h.1",
                                      "transformer.ln_f")
    assert namespace["K"].shape == (5, 5, 64, 64) and namespace["top"][0] > 0
