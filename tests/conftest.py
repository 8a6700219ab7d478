"""Test harness: Triton interpreter on CPU-only machines, a seed per test, poisoned kernel outputs, the gpu marker.

``pytest -m "not gpu"`` is the CPU suite (CI); ``pytest -m gpu`` is the GPU suite.
"""

import os

import pytest
import torch

# The interpreter must be on before Triton defines any kernel, i.e. before faithful_vit.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from faithful_vit.kernels import _utils  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# Fresh random inputs on every run, reproducible from the seed in the report header: FAITHFUL_VIT_TEST_SEED=<seed>.
SESSION_SEED = int(os.environ.get("FAITHFUL_VIT_TEST_SEED", int.from_bytes(os.urandom(4), "little") % 10**6))


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    return f"faithful-vit: FAITHFUL_VIT_TEST_SEED={SESSION_SEED}, TRITON_INTERPRET={interp}, cuda={HAS_CUDA}"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_poison(request):
    """Seed every test from the session seed and its name, and poison every kernel output buffer."""
    seed = (SESSION_SEED * 1_000_003 + sum(map(ord, request.node.nodeid))) % (2**31)
    torch.manual_seed(seed)
    _utils.set_poison(True)
    yield
    _utils.set_poison(False)
