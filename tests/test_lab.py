"""The lab's experiments at their small budget: each must reproduce its published finding."""

import os

import pytest

from ssl_fast import lab
from ssl_fast.cli import main


_CACHE = {}


def _run(name, tmp_path_factory):
    """Each experiment runs once per session (several tests read its numbers)."""
    if name not in _CACHE:
        _CACHE[name] = lab.run(name, str(tmp_path_factory.mktemp("lab")), quick=True)
    return _CACHE[name]


@pytest.mark.parametrize("name", ["mechanisms", "normalization"])
def test_synthetic_lab_verdicts(name, tmp_path_factory):
    r = _run(name, tmp_path_factory)
    assert r.passed, r.verdict
    assert os.path.exists(r.report)
    text = open(r.report).read()
    assert "**Verdict: PASS" in text
    pngs = [f for f in os.listdir(os.path.dirname(r.report)) if f.endswith(".png")]
    assert pngs


def test_mechanisms_numbers(tmp_path_factory):
    r = _run("mechanisms", tmp_path_factory)
    assert r.numbers["a_collapsed"] == 6
    assert r.numbers["b_one_layer_min_rel_sv"] > 0.1
    assert r.numbers["b_two_layer_max_min_rel_sv"] < 1e-2


def test_normalization_numbers(tmp_path_factory):
    r = _run("normalization", tmp_path_factory)
    assert not r.numbers["l2_eta0.0"]["collapsed"] and r.numbers["l2_eta2.0"]["collapsed"]
    assert r.numbers["l2_eta2.0"]["w_norm_rel"] < 1e-3
    assert all(not r.numbers[f"cosine_eta{e}"]["collapsed"] for e in (0.0, 0.1, 0.5, 1.0, 2.0))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["projector", "noncontrastive", "swav", "alignment-uniformity"])
def test_image_lab_verdicts(name, tmp_path_factory):
    """The digits experiments at their small budget (about 20-80 s each on one busy core)."""
    r = _run(name, tmp_path_factory)
    assert r.passed, r.verdict
    assert "**Verdict: PASS" in open(r.report).read()


def test_lab_cli(tmp_path, capsys):
    assert main(["lab", "--list"]) == 0
    assert "normalization" in capsys.readouterr().out
    assert main(["lab", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown lab experiment"):
        lab.run("nope", str(tmp_path))
