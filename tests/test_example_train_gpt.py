"""examples/train_gpt.py: a character-level GPT trained with AdamW, warm-up, cosine schedule,
clipping, dropout and bf16 autocast, watched by a Monitor (slow: the run's numbers)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torchvision_compat  # noqa: F401  (the --hf run imports transformers)

import curvlab as cl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import train_gpt

BLOCKS = ["blocks.0:in", "blocks.0", "blocks.1", "ln_f"]


@pytest.mark.slow
def test_adam_preconditioned_sharpness_approaches_its_threshold_from_below(tmp_path):
    result = train_gpt.main(["--out", str(tmp_path)])
    ratio = np.asarray(result["ratio"])  # sharpness_adam / (38 / eta), every 20 steps
    # AdamW's line, (1 + beta1)(2 - eta w) / ((1 - beta1) eta): 38 / eta less eta w / 2
    assert result["threshold"] == pytest.approx(1.9 * (2 - 3e-3 * 0.1) / (0.1 * 3e-3))
    assert ratio[0] < 0.3  # well below at the start of training
    assert 0.5 <= ratio.max() <= 1.05  # rises toward the threshold, never far past it
    assert np.argmax(ratio) < len(ratio) - 1  # and falls again as the schedule lowers the LR
    run = cl.load_run(tmp_path / "train_gpt.h5")
    assert run["sharpness_adam"].step.tolist() == list(range(20, 401, 20))
    assert list(run["feature_cos_theta"].labels) == BLOCKS
    assert np.isfinite(run["feature_cos_theta"].value).all()
    loss = run["loss"].value
    assert loss[-1] < 0.6 * loss[0]  # it learns


def test_train_gpt_quick_and_through_the_hf_trainer(tmp_path):
    result = train_gpt.main(["--quick", "--out", str(tmp_path)])
    assert result["feature_layers"] == BLOCKS
    assert result["steps"] == [3, 6] and np.isfinite(result["ratio"]).all()
    for fig in result["figures"]:
        assert Path(fig).stat().st_size > 10_000
    saved = json.loads((tmp_path / "train_gpt.json").read_text())
    assert saved["threshold"] == result["threshold"]
    hf = train_gpt.main(["--quick", "--hf", "--out", str(tmp_path / "hf")])
    assert hf["feature_layers"][0] == "transformer.h.0:in" and hf["steps"] == [3, 6]
    assert np.isfinite(hf["ratio"]).all()
