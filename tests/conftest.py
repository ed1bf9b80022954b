import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Under pytest-xdist each worker takes its share of the cores (unless OMP_NUM_THREADS says otherwise): OpenMP
# threads of two processes on the same cores wait for each other.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_dynamo():
    """Start from an empty torch.compile cache: the flex tests compile one kernel per configuration, and
    past PyTorch's recompile limit FlexAttention would run unfused (those tests turn that warning into an
    error, so they prove the fused kernel ran)."""
    torch._dynamo.reset()
    yield
