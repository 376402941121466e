"""Shared fixtures of the test suite.

- ``shared_data``: the real scans in ``../shared/data`` (skips when the folder is absent, as in a fresh checkout).
- ``synthetic_dataset``: a small synthetic BraTS-like dataset generated once per session; returns its manifest.
"""
from __future__ import annotations

from pathlib import Path

import pytest

SYNTHETIC_SHAPE = (40, 36, 32)  # a different size on every axis
SYNTHETIC_CASES = 4


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository; skip the test when it is missing."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is missing (present on the project's development machines only)")
    return path


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """Manifest (``manifest.csv``) of 4 synthetic cases of shape (40, 36, 32), seed 0, generated once per session.

    Treat the files as read-only: other tests share them.
    """
    from medseg.data.synthetic import SyntheticSpec, generate_dataset

    out = tmp_path_factory.mktemp("synthetic")
    return generate_dataset(out, n_cases=SYNTHETIC_CASES, spec=SyntheticSpec(shape=SYNTHETIC_SHAPE), seed=0)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: reductions are summed in one order, so a few-step training gives the same
    numbers whatever the machine's core count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
