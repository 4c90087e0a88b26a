"""What a user's fresh process pays for its first loss call: no heavy imports and little memory.

The fused ops are registered with the dispatcher directly (C++ ``TORCH_LIBRARY`` in ``ssl_fast._C``, a
``torch.library.Library`` fragment for the Triton ones; see ``ssl_fast/ops/_library.py``). A
``torch.library.custom_op`` would import sympy and torch._dynamo on its first call (~1 s, ~155 MiB).
Each check runs in a fresh subprocess and asserts what does not depend on the machine's load: the modules the
call imports, and the growth of resident memory (~5 MiB typical; bound 20 MiB). The first call's time is a
benchmark column (``first_call_ms`` of ``ssl-fast bench``), not a test.
"""

import json
import os
import subprocess
import sys

import pytest

from ssl_fast import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys
import torch
import ssl_fast

def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

fn = getattr(ssl_fast, sys.argv[1])
a = torch.randn(64, 32, requires_grad=True)
b = torch.randn(64, 32, requires_grad=True)
before = set(sys.modules)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark: VmHWM - VmRSS is then the growth over the call
rss0 = status_kib("VmRSS")
fn(a, b).backward()
grown = (status_kib("VmHWM") - rss0) / 1024.0
new = sorted(m for m in set(sys.modules) - before
             if m.split(".")[0] == "sympy" or m.startswith("torch._dynamo") or m.startswith("torch._inductor"))
print(json.dumps(dict(mib=grown, heavy=new, grad_ok=bool(torch.isfinite(a.grad).all()))))
"""


def _first_call(fn_name):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, fn_name], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _ext.HAS_EXT, reason="ssl_fast._C not built (the cpp backend serves CPU tensors)")
@pytest.mark.parametrize("fn_name", ["ntxent", "info_nce"])
def test_first_call_is_cheap(fn_name):
    r = _first_call(fn_name)
    assert r["heavy"] == [], f"the first call imported {r['heavy'][:5]}"
    assert r["grad_ok"]
    assert r["mib"] < 20.0, r
