"""The optional packages the commands need: each is in the extra the CLI names, and a missing one stops the
command with one line naming that extra (not a traceback)."""

import os
import subprocess
import sys
import tomllib

import pytest

from ssl_fast import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `ssl-fast ARGS` in a child where importing `blocked` fails, as in an environment without that package.
CHILD = r"""
import sys
blocked = sys.argv[1]
sys.modules[blocked] = None
from ssl_fast.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _extras():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def test_every_optional_module_is_in_its_extra():
    extras = _extras()
    for module, (dist, extra) in cli.OPTIONAL_MODULES.items():
        names = [req.split(">")[0].split("<")[0].split("=")[0].split(";")[0].strip().lower() for req in extras[extra]]
        assert dist.lower() in names, f"{module}: {dist} is not in the [{extra}] extra {extras[extra]}"


@pytest.mark.parametrize("args", [["lab", "mechanisms", "--quick"], ["diagnose", "EMB"]], ids=["lab", "diagnose"])
def test_missing_matplotlib_names_the_extra(tmp_path, args):
    import torch

    emb = tmp_path / "emb.pt"
    torch.save(torch.randn(64, 8), emb)
    args = [str(emb) if a == "EMB" else a for a in args] + ["--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-c", CHILD, "matplotlib"] + args, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'ssl_fast[train]'" in lines[0] and "matplotlib" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
