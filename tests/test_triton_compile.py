"""Ahead-of-time compile check of the Triton kernels (scripts/check_triton_compile.py) for sm_80 / sm_90.

The interpreter tests prove the math; this proves every kernel of kernels/infonce.py and kernels/infonce_rect.py
compiles for the GPU with the launch configurations the launchers use, without a GPU. The script runs in a subprocess (as
developers run it), in its --quick subset (~20-25 s per arch cold on 2 cores; the triton cache makes
reruns faster). Spills are warnings there, so only compile errors and unlaunched kernels fail this test.
Skipped when triton is missing or the installed triton's ahead-of-time API is not the one the script
speaks (it then says "unsupported triton version ..." and exits 0).
"""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_triton_compile.py")
KERNELS = [os.path.join(ROOT, "kernels", f) for f in ("infonce.py", "infonce_rect.py")]
UNSUPPORTED = "unsupported triton version for ahead-of-time compile check"
ARCHS = ("80", "90")


def _kernel_names():
    """The @triton.jit kernels of the files (helpers such as _mma / _rinv are not named *_kernel)."""
    names = []
    for path in KERNELS:
        with open(path) as f:
            found = re.findall(r"@triton\.jit\s*\ndef\s+(\w+_kernel)\s*\(", f.read())
        assert found, f"no @triton.jit *_kernel found in {path}"
        names += found
    return names


@pytest.fixture(scope="module")
def check_out():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # conftest sets it on CPU-only machines; the script drops it too
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--arch", *ARCHS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    if UNSUPPORTED in out:
        pytest.skip(out.strip().splitlines()[-1])
    if "not importable" in out and proc.returncode == 0:
        pytest.skip(out.strip().splitlines()[-1])
    return proc.returncode, out


def test_check_exits_zero(check_out):
    rc, out = check_out
    assert rc == 0, out[-6000:]
    assert re.search(r"0 error\(s\)", out), out[-3000:]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", _kernel_names())
def test_every_kernel_compiles(check_out, kernel, arch):
    _, out = check_out
    lines = [ln for ln in out.splitlines() if re.match(rf"(ok|WARN) +sm_{arch} +{kernel} ", ln)]
    assert lines, f"no compiled line for {kernel} on sm_{arch}:\n{out[-3000:]}"
    assert not re.search(rf"^FAIL +(sm_{arch} +)?{kernel}\b", out, re.M), out[-3000:]
    for ln in lines:  # a real compile: the register count came back from the cubin
        assert re.search(r"regs +\d+|regs \? \(no cuobjdump\)", ln), ln


def test_16bit_dots_use_tensor_cores(check_out):
    """bf16 / fp16 dot kernels get wgmma on sm_90 and mma.sync on sm_80 (a layout regression that falls
    back to FMA would be a 10x slowdown the interpreter cannot see)."""
    _, out = check_out
    dot_lines = [ln for ln in out.splitlines() if re.match(r"(ok|WARN) +sm_\d+ +\w+ +(bf16|fp16) ", ln)
                 and "| tc -" not in ln]
    assert dot_lines, out[-3000:]
    for ln in dot_lines:
        want = "wgmma" if " sm_90 " in ln else "mma"
        assert f"tc {want} x" in ln, ln
