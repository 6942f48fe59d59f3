import pytest
import torch


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA: CPU timings are not speed"))
