import os

import pytest
import torch

# Without a GPU, Triton kernels run through its interpreter (must be set before triton.jit).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny networks gain nothing from more, and on a busy 2-core machine
    OpenMP's spinning threads slow every step down many times over."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
