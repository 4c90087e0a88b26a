"""Shared test set-up: seeds, the ``requires_cuda`` marker, the Triton interpreter on CPU-only machines.

Nothing here touches CUDA at import beyond ``torch.cuda.is_available()``. On a machine without a GPU,
``TRITON_INTERPRET=1`` is set before anything imports triton, so the Triton kernels run (slowly) on CPU
tensors at small shapes.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
