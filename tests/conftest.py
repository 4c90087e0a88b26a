"""Shared test set-up: seeds, the ``requires_cuda`` marker, the Triton interpreter on CPU-only machines, and
the build check of CI.

Nothing here touches CUDA at import beyond ``torch.cuda.is_available()``. On a machine without a GPU,
``TRITON_INTERPRET=1`` is set before anything imports triton, so the Triton kernels run (slowly) on CPU
tensors at small shapes.

With ``CI=true`` or ``SSL_FAST_REQUIRE_EXT=1`` (``.ci/run`` sets it) a build whose ``ssl_fast._C`` does not load,
or an environment without triton, stops the session before any test: otherwise the tests of the C++ and
Triton backends would skip and the run would be green. (The pure-Python package without the extension has
its own test, tests/test_packaging.py.)
"""

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# hypothesis profiles (tests/test_fuzz.py): "ci", the default, is derandomized (the same examples on every run) with
# bounded counts; "long" (``pytest tests/test_fuzz.py --hypothesis-profile long``) draws fresh random examples, 10x as
# many. Timing is not a property: no deadline.
try:
    from hypothesis import HealthCheck, settings

    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, database=None,
                              suppress_health_check=_quiet, print_blob=True)
    settings.register_profile("long", max_examples=1000, derandomize=False, deadline=None,
                              suppress_health_check=_quiet, print_blob=True)
    settings.load_profile("ci")  # --hypothesis-profile NAME (the hypothesis pytest plugin) loads another after this
except ImportError:  # tests/test_fuzz.py skips without hypothesis
    pass
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("SSL_FAST_REQUIRE_EXT") == "1"


def pytest_sessionstart(session):
    if not _required():
        return
    from ssl_fast import _ext

    problems = []
    if not _ext.HAS_EXT:
        problems.append(f"the C++ extension ssl_fast._C did not load ({_ext.IMPORT_ERROR})")
    if importlib.util.find_spec("triton") is None:
        problems.append("triton is not installed")
    if problems:
        pytest.exit("CI build check (CI=true / SSL_FAST_REQUIRE_EXT=1): " + "; ".join(problems), returncode=3)


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
