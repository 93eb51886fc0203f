"""Shared test setup: offline hub, no progress bars, the repository root on sys.path, and the
paper's data (if present)."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no tqdm bars, in this process and the runs it starts: a failure shows its reason and traceback,
# not a screen of progress updates before them (tqdm reads TQDM_* when it is first imported)
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The paper's released data sits beside the checkout in CI (../shared/data/arpo); a user's clone
# lacks it.
SHARED_DATA = Path(os.environ.get("AEPO_SHARED_DATA", ROOT.parent / "shared" / "data" / "arpo"))


@pytest.fixture
def arpo_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the paper's released data is not at {SHARED_DATA} "
                    "(set AEPO_SHARED_DATA to its folder)")
    return SHARED_DATA
