"""Shared test set-up.

Markers: `slow` marks every test that starts processes for a training job (tests/_dist.py `spawn`, the
`hetermoe launch` and `hetermoe demo` subprocesses, a training killed half-way). `pytest -m "not slow"` runs the
rest in under a minute; `spawn` refuses to run for a test that is not marked slow, so the split stays honest.

Helpers shared by test modules live in tests/_*.py (a test module never imports another test module):
`_assertions` (same losses, same weights), `_dist` (spawn W gloo processes), `_jobs` (a tiny Mixtral trained by
the stock Trainer), `_zebra_jobs` and `_reliability_jobs` (jobs run under the launcher).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLOW_ENV = "HETERMOE_TEST_IS_SLOW"  # read by tests/_dist.py


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture of the test is set up (module-scoped ones that spawn jobs included).
    os.environ[SLOW_ENV] = "1" if item.get_closest_marker("slow") is not None else "0"


def pytest_runtest_teardown(item: pytest.Item) -> None:
    os.environ.pop(SLOW_ENV, None)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where recipes/, benchmarks/ and hf_hetermoe/ are)."""
    return REPO
