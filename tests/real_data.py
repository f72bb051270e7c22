"""Where the real TNBC/Kumar data lie for tests: ``$NUCSEG_TEST_DATA``, else ``$NUCSEG_DATASETS``,
else ``../shared/data`` beside the checkout. Tests using it skip when it is absent."""
import os
from pathlib import Path

REAL_DATA_ROOT = Path(
    os.environ.get("NUCSEG_TEST_DATA")
    or os.environ.get("NUCSEG_DATASETS")
    or Path(__file__).resolve().parents[2] / "shared" / "data"
)
