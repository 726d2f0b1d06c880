import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))  # tests import fakes and tiny as plain modules


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


def run_cli(*args, env=None, timeout=600):
    """Run `python -m repair ...` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "repair", *map(str, args)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd=ROOT,
    )
