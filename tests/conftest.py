"""pytest configuration: device and Triton interpreter setup, options, autouse fixtures. Helpers are in
tests/helpers.py.

Without CUDA, kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1 must be set before any
@triton.jit function is created, hence here, before tlv_fast.kernels is imported). With CUDA, the same tests run
the compiled kernels on the GPU.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TLV_FAST_POISON", "1")  # kernel outputs start as NaN: an unwritten element fails a test

from helpers import HAS_CUDA  # noqa: E402  (after the environment above)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")
    parser.addoption("--all-dtypes", action="store_true",
                     help="also run the bf16 cases under Triton's interpreter (bf16 dots upcast to fp32)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--slow")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --slow"))
        if "bf16_interp" in item.keywords and not config.getoption("--all-dtypes"):
            item.add_marker(pytest.mark.skip(reason="bf16 under Triton's interpreter (dots upcast): run with "
                                                    "--all-dtypes"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fixed_tiles_on_gpu(request):
    """On a GPU, tests pin one tile: autotuning compiles ~20 configs per kernel variant (minutes in all). Tests not
    marked `gpu` use 32 x 32, `gpu` tests 64 x 64; a test marked `autotune` runs the autotuner users get."""
    if HAS_CUDA and "autotune" not in request.keywords:
        from tlv_fast.kernels.common import force_blocks
        tile = (64, 64, 4, 3) if "gpu" in request.keywords else (32, 32)
        with force_blocks(*tile):
            yield
    else:
        yield
