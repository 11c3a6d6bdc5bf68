"""Shared test set-up: the tests folder on sys.path, and the ``slow`` marker.

Tests marked ``slow`` (the reproductions of ``examples/``, minutes each) run only with ``--slow``
(CI runs them after the default suite) unless they are also marked ``fast_subset``.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords and "fast_subset" not in item.keywords:
            item.add_marker(skip)
