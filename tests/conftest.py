import os
import sys

import pytest
import torch

# Tests import the project's modules from the repository root, the experiment scripts (compare_methods,
# depth_study) from experiments/, and the helpers they share (random_gpt, max_diff) from tests/helpers.py.
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for folder in (TESTS, os.path.join(ROOT, "experiments"), ROOT):  # ROOT ends up first
    sys.path.insert(0, folder)

# Torch threads for the whole run. The default, 1, suits the tiny test models (extra threads only add
# overhead, and stall on a busy machine); ATP_TEST_THREADS=2 runs everything on 2 threads instead, to
# check that no result depends on how the CPU splits its sums:
#   ATP_TEST_THREADS=2 python -m pytest -q
THREADS = int(os.environ.get("ATP_TEST_THREADS", "1"))


@pytest.fixture(autouse=True, scope="session")
def torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)
