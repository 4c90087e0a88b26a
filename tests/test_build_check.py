"""CI's build check (tests/conftest.py): with SSL_FAST_REQUIRE_EXT=1 a build whose ssl_fast._C does not load stops
the session with an error, instead of running with the C++ tests skipped."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# A child pytest session in which the extension cannot be imported (as after a failed or broken build).
CHILD = r"""
import sys
sys.modules["ssl_fast._C"] = None  # `from . import _C` raises ImportError, as for a missing or broken build
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", sys.argv[1]]))
"""


def _child(require: str):
    env = dict(os.environ, SSL_FAST_REQUIRE_EXT=require, CI="")
    return subprocess.run([sys.executable, "-c", CHILD, os.path.join(HERE, "test_packaging.py") + "::nothing"],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=300)


def test_missing_extension_fails_the_session_when_required():
    proc = _child("1")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ssl_fast._C did not load" in proc.stdout + proc.stderr


def test_missing_extension_is_allowed_when_not_required():
    proc = _child("0")
    # the session runs (the node id selects nothing: pytest's "no tests ran" / "not found" exit codes 4 or 5)
    assert proc.returncode in (4, 5), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ssl_fast._C did not load" not in proc.stdout + proc.stderr
