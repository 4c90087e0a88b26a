"""The layering of the package, as contracts: ``[tool.importlinter]`` in pyproject.toml (import-linter, run here
on the source tree), plus what import-linter cannot see: bench/ (scripts, not a package), imports of the
installed name ``ssl_fast.kernels`` and of the compiled ``ssl_fast._C``, and the C++ sources' includes.

The intended direction: cli > lab > train > methods | optim > nn | data | diagnostics > functional > ops > kernels / _C,
with ``ssl_fast.reference`` importing nothing of the package. A broken contract fails this file (and with it
``bash scripts/test.sh``); :func:`test_a_violation_fails` shows that it can.
"""

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("importlinter")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LINT = ("import sys\n"
        "from importlinter.cli import lint_imports\n"
        "sys.path.insert(0, '.')\n"
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))\n")

# Where bench/ may still reach below functional, and why. Each entry is a debt: remove it with the import.


def _lint(cwd):
    proc = subprocess.run([sys.executable, "-c", LINT], cwd=cwd, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_import_contracts_kept():
    rc, out = _lint(ROOT)
    assert rc == 0, out[-6000:]
    assert re.search(r"Contracts: \d+ kept, 0 broken", out), out[-3000:]


def test_a_violation_fails(tmp_path):
    """The contracts can fail: an ops module importing ssl_fast.nn, in a copy of the source tree."""
    for name in ("ssl_fast", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_C*"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    (tmp_path / "ssl_fast" / "ops" / "_violation.py").write_text("from ..nn import NTXentLoss  # noqa: F401\n")
    rc, out = _lint(tmp_path)
    assert rc != 0, out[-3000:]
    assert "ssl_fast.ops._violation -> ssl_fast.nn" in out, out[-3000:]
    assert "ops never import nn, methods, train" in out and "BROKEN" in out, out[-3000:]


def _imports(path):
    """(line, module) of every import in a Python file, relative imports resolved against the file's package."""
    rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
    package = rel[:-3].split("/")[:-1]
    if rel.startswith("kernels/"):
        package = ["ssl_fast"] + package  # installed as ssl_fast.kernels
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # from ssl_fast import ops: ssl_fast.ops
    return out


def _py_files(top):
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def _below(module, prefix):
    return module == prefix or module.startswith(prefix + ".")


# The one exception: the Triton tile sweep reads the kernels' own launch tables (it tunes them; it measures
# through the public API like every other benchmark).
BENCH_KERNEL_READERS = {"bench/tune.py": "ssl_fast.kernels"}


def test_bench_goes_through_the_public_api():
    """bench/ measures ssl_fast as users call it: never ssl_fast.ops, ssl_fast.kernels or ssl_fast._C."""
    bad = []
    for path in _py_files("bench"):
        allowed = BENCH_KERNEL_READERS.get(os.path.relpath(path, ROOT).replace(os.sep, "/"))
        for line, mod in _imports(path):
            if allowed and _below(mod, allowed):
                continue
            if any(_below(mod, p) for p in ("ssl_fast.ops", "ssl_fast.kernels", "ssl_fast._C")):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_only_ops_reach_the_kernels():
    """The Triton kernels (installed as ssl_fast.kernels, invisible to import-linter in a source tree) and the
    compiled ssl_fast._C are reached through ssl_fast.ops (and ssl_fast._ext, which loads _C) only."""
    bad = []
    for path in _py_files("ssl_fast"):
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        for line, mod in _imports(path):
            if _below(mod, "ssl_fast.kernels") and not rel.startswith("ssl_fast/ops/"):
                bad.append(f"{rel}:{line} imports {mod}")
            if _below(mod, "ssl_fast._C") and rel != "ssl_fast/_ext.py":
                bad.append(f"{rel}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_csrc_knows_nothing_above_it():
    """C++ sources include only torch / the standard library / each other, and never import Python modules."""
    bad = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for f in files:
            path = os.path.join(dirpath, f)
            text = open(path).read()
            for m in re.finditer(r'#include\s+"([^"]+)"', text):
                if not os.path.isfile(os.path.join(dirpath, m.group(1))):
                    bad.append(f"{os.path.relpath(path, ROOT)} includes {m.group(1)} from outside csrc/")
            if re.search(r"py::module_?::import|PyImport_Import", text):
                bad.append(f"{os.path.relpath(path, ROOT)} imports a Python module")
    assert not bad, "\n".join(bad)
