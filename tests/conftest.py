"""Shared fixtures: an isolated cache, the real data sets when this machine has them, and an
untrained demo-model checkpoint."""
import os

import hypothesis
import pytest
import torch
from detectron2.modeling import build_model
from real_data import REAL_DATA_ROOT

from nucseg_d2.predict.predictor import build_predict_cfg

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


torch.set_num_threads(min(2, os.cpu_count() or 1))

# The property tests draw the same examples on every run, so that a red CI run fails the same way
# again on anyone's machine; HYPOTHESIS_PROFILE=explore draws new ones (and prints how to replay).
hypothesis.settings.register_profile("reproducible", derandomize=True)
hypothesis.settings.register_profile("explore", print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))


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


@pytest.fixture(scope="session")
def untrained_demo_weights(tmp_path_factory):
    """An untrained demo-model checkpoint (outputs are random; the plumbing is what is tested)."""
    torch.manual_seed(0)
    model = build_model(build_predict_cfg(DEMO_CONFIG, ["MODEL.DEVICE", "cpu"]))
    path = str(tmp_path_factory.mktemp("weights") / "demo_untrained.pth")
    torch.save({"model": model.state_dict()}, path)
    return path
