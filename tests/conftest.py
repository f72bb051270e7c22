"""Shared fixtures: an isolated cache, and the real data sets when this machine has them."""
import os

import pytest
import torch
from real_data import REAL_DATA_ROOT


torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Keep caches (synthetic tiles, record annotations) out of the user's home during tests."""
    if "NUCSEG_CACHE" not in os.environ:
        os.environ["NUCSEG_CACHE"] = str(tmp_path_factory.mktemp("nucseg_cache"))
    yield


@pytest.fixture(scope="session")
def real_data_root():
    """``../shared/data`` (TNBC + Kumar) or skip: tests on real data each have a synthetic twin."""
    if not (REAL_DATA_ROOT / "tnbc").is_dir() or not (REAL_DATA_ROOT / "kumar").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA_ROOT}")
    return REAL_DATA_ROOT
