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
@pytest.mark.parametrize("name", ["noncontrastive", "swav", "alignment-uniformity"])
def test_image_lab_verdicts(name, tmp_path_factory):
    """The digits experiments on ssl_fast.methods at their small budget (one seed; about 20-90 s each on one
    busy core): the published finding reproduces."""
    r = _run(name, tmp_path_factory)
    assert r.passed, r.verdict
    assert "**Verdict: PASS" in open(r.report).read()
    assert r.numbers["seeds"] == [0]


@pytest.mark.slow
def test_projector_lab_reproduces_and_verdict_is_computed_from_the_numbers(tmp_path_factory):
    """The projector experiment on SimCLR / DirectCLR with the lab's MLP encoder at the small budget (one seed):
    the DirectCLR paper's finding reproduces (no projector -> fewer dimensions), and the verdict follows the
    measured ranks."""
    from ssl_fast.lab import projector as P

    r = _run("projector", tmp_path_factory)
    per = r.numbers["per_variant"]
    assert set(P.QUICK) <= set(per) and r.numbers["seeds"] == [0]
    for name in P.QUICK:
        assert len(per[name]["rank"]) == 1 and 1 <= per[name]["rank"][0] <= P.DIM
        assert 0.5 < per[name]["knn"][0] <= 1.0  # every variant learns (random init: about 0.8)
        assert f"{name} {per[name]['rank'][0]}" in r.verdict
    base = per["no projector"]["rank"][0]
    for name in ("MLP projector", P.DIRECTCLR):
        key = next(k for k in r.numbers["checks"] if k.startswith(name))
        assert r.numbers["checks"][key] == (per[name]["rank"][0] >= P.MARGIN * base and per[name]["rank"][0] > base)
    assert r.passed == all(r.numbers["checks"].values())
    assert ("**Verdict: PASS" in open(r.report).read()) == r.passed
    assert r.passed, r.verdict


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


# -- the image experiments' variants are the product's methods with small changes ---------------------------


def _views(n=16, seed=0):
    from ssl_fast.lab import _image as I

    src = I.data(0)
    return I.views(2)(src.train_x[:n], __import__("torch").Generator().manual_seed(seed))


def test_projector_variants_are_product_methods():
    import torch

    from ssl_fast.lab import projector as P
    from ssl_fast.methods import DirectCLR, SimCLR

    for name in P.VARIANTS:
        m = P.build(name, 0)
        assert isinstance(m, DirectCLR if name == P.DIRECTCLR else SimCLR), name
        kinds = [type(mod) for mod in m.backbone]  # the lab's MLP encoder on flattened digits
        assert kinds.count(torch.nn.Linear) == 2 and torch.nn.Flatten in kinds, kinds
        assert m.backbone(_views()[0]).shape[1] == P.DIM
    assert isinstance(P.build("no projector", 0).projector, torch.nn.Identity)
    assert isinstance(P.build("MLP projector", 0).projector, torch.nn.Sequential)  # SimCLR's own MLP
    w = P.build("fixed low-rank projector", 0).projector.weight
    s = torch.linalg.svdvals(w.double())
    assert not w.requires_grad
    torch.testing.assert_close(s[:P.D0], torch.ones(P.D0, dtype=torch.float64), atol=1e-5, rtol=0)
    assert float(s[P.D0:].max()) < 1e-5
    loss, _ = P.build(P.DIAG, 0)(_views())
    loss.backward()


def test_noncontrastive_variants_change_only_what_they_name():
    import torch

    from ssl_fast.lab import noncontrastive as N
    from ssl_fast.methods import BYOL, SimSiam
    from ssl_fast.methods.base import teacher_of

    views = _views()
    a, b = N.build(dict(method="SimSiam"), 0), N.build(dict(method="SimSiam", stop_grad=False), 0)
    assert type(a) is SimSiam and isinstance(b, SimSiam)
    b.load_state_dict(a.state_dict())
    la, lb = a(views)[0], b(views)[0]
    torch.testing.assert_close(la, lb)  # the same value; only the gradient differs
    ga = torch.autograd.grad(la, list(a.projector.parameters()))
    gb = torch.autograd.grad(lb, list(b.projector.parameters()))
    assert any(not torch.allclose(x, y) for x, y in zip(ga, gb))

    c = N.Center(detach=True)
    x = torch.randn(8, 3, requires_grad=True)
    (c(x) * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(3.0).expand(8, 3))  # no gradient through the mean
    x.grad = None
    (N.Center(detach=False)(x) * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros(8, 3))

    m = N.build(dict(method="BYOL", pred="centering, detached mean", head_bn=False), 0)
    assert isinstance(m, BYOL)
    kinds = {type(mod).__name__ for mod in list(m.predictor.modules()) + list(m.online.projector.modules())}
    assert "Center" in kinds and "BatchNorm1d" not in kinds
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.backbone.modules())  # the encoder keeps BN
    teacher = {type(mod).__name__ for mod in teacher_of(m.teacher).projector.modules()}
    assert "BatchNorm1d" not in teacher  # the target was rebuilt from the changed network
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in N.build(
        dict(method="BYOL", backbone_bn=False), 0).backbone.modules())
    assert isinstance(N.build(dict(method="BYOL", no_predictor=True), 0).predictor, torch.nn.Identity)

    m0 = N.build(dict(method="BYOL", tau=0.0), 0)  # EMA momentum 0: the target is the online network
    opt = torch.optim.SGD([p for p in m0.parameters() if p.requires_grad], lr=0.1)
    loss, _ = m0(views, 0, 10)
    loss.backward()
    opt.step()
    m0.on_step_end(1, 10)
    for p, q in zip(m0.online.parameters(), teacher_of(m0.teacher).parameters()):
        torch.testing.assert_close(p, q)


def test_swav_softmax_codes_loss():
    import torch
    import torch.nn.functional as F

    from ssl_fast.lab import swav
    from ssl_fast.methods import SwAV

    g = torch.Generator().manual_seed(0)
    s0, s1 = torch.randn(32, 5, generator=g), torch.randn(32, 5, generator=g)
    crit = swav.SoftmaxCodesSwaVLoss(temperature=0.1, sinkhorn_epsilon=0.05)
    q0, q1 = F.softmax(s0 / 0.05, 1), F.softmax(s1 / 0.05, 1)
    want = -0.5 * ((q1 * F.log_softmax(s0 / 0.1, 1)).sum(1).mean() + (q0 * F.log_softmax(s1 / 0.1, 1)).sum(1).mean())
    torch.testing.assert_close(crit([s0, s1], []), want)
    m = swav.build("softmax", 0)
    assert isinstance(m, SwAV) and isinstance(m.criterion, swav.SoftmaxCodesSwaVLoss)
    assert type(swav.build("Sinkhorn", 0).criterion) is not swav.SoftmaxCodesSwaVLoss


def test_seed_statistics():
    from ssl_fast.lab import _image as I

    s = I.stats([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and abs(s["std"] - 1.0) < 1e-12 and (s["min"], s["max"], s["n"]) == (1.0, 3.0, 3)
    assert I.pm([1.0, 2.0, 3.0]) == "2 ± 1 (1..3)" and I.pm([0.5]) == "0.5"
    assert I.seeds(4, quick=False) == [4, 5, 6] and I.seeds(4, quick=True) == [4]
