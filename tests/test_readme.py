"""The README's tour runs as written."""

import re
from pathlib import Path


def test_readme_tour_runs() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python tour"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["res"].converged


def test_readme_training_loop_tour_runs() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2, "the README has no training-loop tour"
    namespace: dict = {}
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    assert namespace["run"].metrics["sharpness"].step.tolist() == [0, 10, 20]
    assert len(namespace["fs"].layers) == 5


def test_readme_real_models_tour_runs() -> None:
    import torchvision_compat  # noqa: F401  (transformers imports torchvision)

    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3, "the README has no tour of models from other libraries"
    namespace: dict = {}
    exec(compile(blocks[2], "README.md", "exec"), namespace)
    assert namespace["fs"].layers == ("transformer.h.0:in", "transformer.h.0", "transformer.h.1",
                                      "transformer.ln_f")
    assert namespace["K"].shape == (5, 5, 64, 64) and namespace["top"][0] > 0
