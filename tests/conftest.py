import os

import pytest
import torch


# tests never touch the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests.

    Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads per process (plus
    the subprocesses some tests start) oversubscribe the cores and make such runs several times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
