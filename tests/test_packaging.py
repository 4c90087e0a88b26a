"""A non-editable install ships ssl_fast.kernels, and ssl_fast imports and falls back without ssl_fast._C."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pure_wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, SSL_FAST_NO_EXT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                    "--disable-pip-version-check", "-w", str(out), str(ROOT)], check=True, env=env,
                   cwd=str(out))
    (wheel,) = out.glob("ssl_fast-*.whl")
    return wheel


def test_wheel_ships_kernels(pure_wheel):
    names = set(zipfile.ZipFile(pure_wheel).namelist())
    for required in ("ssl_fast/__init__.py", "ssl_fast/kernels/__init__.py", "ssl_fast/kernels/infonce.py",
                     "ssl_fast/ops/infonce.py", "ssl_fast/reference.py", "ssl_fast/nn/__init__.py"):
        assert required in names, f"{required} missing from {pure_wheel.name}"


def test_import_without_extension(pure_wheel, tmp_path):
    target = tmp_path / "site"
    with zipfile.ZipFile(pure_wheel) as zf:
        zf.extractall(target)
    code = (
        "import sys\n"
        # an editable install of the repo (the dev set-up) would map ssl_fast._C to the built one
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "import warnings, torch, ssl_fast\n"
        "assert ssl_fast.__file__.startswith(sys.argv[1]), ssl_fast.__file__\n"
        "assert not ssl_fast.HAS_EXT, 'extension unexpectedly present'\n"
        "import ssl_fast.kernels\n"
        "z1, z2 = torch.randn(8, 4), torch.randn(8, 4)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    loss = ssl_fast.ntxent(z1, z2)\n"
        "    ssl_fast.ntxent(z1, z2)\n"
        "msgs = [str(x.message) for x in w if 'torch backend' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "torch.testing.assert_close(loss, ssl_fast.reference.ntxent_reference(z1, z2, 0.5))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    res = subprocess.run([sys.executable, "-c", code, str(target)], env=env, cwd=str(tmp_path), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
