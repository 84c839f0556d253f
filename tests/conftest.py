import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def fresh_dynamo():
    """For tests that compile models of one class: dynamo keeps graphs per code object, up to its
    recompile limit, and past it runs the forward without any backend. Start (and end) afresh."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
