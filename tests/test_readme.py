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
