import os

import pytest

# before torch loads: OpenMP threads spinning at barriers make every small op slow on a
# shared 2-core machine (a tiny model's forward pass: 0.75 s spinning, 0.008 s passive)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


#: docstring examples that load the SmolLM2 model (20-30 s each): marked slow, so
#: `make test-fast` leaves them out and `make test` runs them (both report the count)
SLOW_DOCTESTS = ("kronlab.models", "kronlab.data")


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if isinstance(item, pytest.DoctestItem) and item.name in SLOW_DOCTESTS:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
