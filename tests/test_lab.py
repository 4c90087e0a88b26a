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


def test_results_summary_and_readme(tmp_path):
    from ssl_fast.lab import LabResult, _save_result, load_results, update_readme, write_summary

    out = tmp_path / "docs" / "lab"
    for name, ok in (("normalization", True), ("mechanisms", False)):
        (out / name).mkdir(parents=True)
        rep = out / name / "report.md"
        rep.write_text("x")
        _save_result(LabResult(name, f"finding {name}", f"verdict | {name}", ok, report=str(rep), seconds=3),
                     str(out), quick=True, seed=0)
    res = load_results(str(out))
    assert [r.name for r in res] == ["mechanisms", "normalization"]  # EXPERIMENTS order
    text = open(write_summary([], str(out))).read()
    assert "[mechanisms](mechanisms/report.md)" in text and "**no**" in text and "verdict \\| normalization" in text
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- lab-verdicts:start -->\nold\n<!-- lab-verdicts:end -->\nend\n")
    update_readme(str(readme), str(out))
    new = readme.read_text()
    assert "old" not in new and "(docs/lab/normalization/report.md)" in new and new.endswith("end\n")
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme(str(tmp_path / "plain.md"), str(out))
