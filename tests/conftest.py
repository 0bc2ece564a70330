"""Test setup: Triton kernels run on the CPU through the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any Triton kernel is imported, so it is set here, before
the test modules import segnext_kernels.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--run-benchmarks", action="store_true", default=False,
                     help="run the pytest-benchmark tests (marked 'benchmark_suite')")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "benchmark_suite: timing tests, run with --run-benchmarks")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_bench = pytest.mark.skip(reason="timing tests run only with --run-benchmarks")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "benchmark_suite" in item.keywords and not config.getoption("--run-benchmarks"):
            item.add_marker(skip_bench)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def threads():
    """Set torch's thread count for one test (``threads(n)``), restoring it afterwards."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)
