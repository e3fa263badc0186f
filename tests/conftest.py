"""Shared by every test: one intra-op torch thread.

The models and tensors in the tests are tiny: a second thread buys nothing, and on a busy 2-core
machine spinning threads make each step 10-20x slower. Restored after each module. (Live servers
started by tests get OMP_NUM_THREADS=1 for the same reason.)
"""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
