import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


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
