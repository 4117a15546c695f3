import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `testbed` (reference models, offline data, noise) lives beside the package, not in it; scripts the tests
# launch (accelerate launch, the CLI) import it too.
_ROOT = str(Path(__file__).resolve().parents[1])
# The set-up modules the launched scripts share with the tests (tests/scripts/*_setup.py).
sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models run fastest on one thread; multi-threaded LAPACK stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
