import pytest
import torch

# Tiny test models gain nothing from intra-op threads, and two threads on a busy 2-core machine are
# 20x slower than one (measured): run the suite single-threaded.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
