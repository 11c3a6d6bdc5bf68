"""Loaded by pytest before any test or doctest module (see tests/torchvision_compat.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "tests"))

import torchvision_compat  # noqa: F401  (before anything imports torchvision)
