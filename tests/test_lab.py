"""The lab's experiments at their small budget.

What is asserted: every claim an experiment declares *asserted* at the quick budget is reproduced (its effect
beyond the noise band, 3 x the measured noise, on the seeds the suite runs); docs/lab/margins.md shows each of
them with a mean effect of at least 6 x noise and every measured seed x thread count beyond the band, and a test
here holds the declarations to that file. Claims within the noise at this budget (the DirectCLR sub-vector
probe, the depth of the two-layer collapse, BYOL without a predictor below the collapse threshold) are not
asserted: the tests check that they are reported with the status their numbers give.
"""

import json
import math
import os

import pytest

from ssl_fast import lab
from ssl_fast.cli import main
from ssl_fast.lab import _common as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARGINS = os.path.join(ROOT, "docs", "lab", "margins.json")

_CACHE = {}


def _run(name, tmp_path_factory):
    """Each experiment runs once per session (several tests read its numbers)."""
    if name not in _CACHE:
        _CACHE[name] = lab.run(name, str(tmp_path_factory.mktemp("lab")), quick=True)
    return _CACHE[name]


def _module(name):
    import importlib

    return importlib.import_module(lab.EXPERIMENTS[name])


def _check_result(r):
    """The verdict is the one the claims give; every claim asserted at the quick budget is reproduced; the
    report lists every claim with its asserted flag, noise and band."""
    mod = _module(r.name)
    again = mod.claims(r.numbers, True)  # recomputed from the numbers
    assert [c.as_dict() for c in again] == [c.as_dict() for c in r.claims] == r.numbers["claims"]
    assert {c.key for c in r.claims} <= set(mod.CLAIMS)
    assert r.status == C.overall(r.claims) and r.passed == (r.status == C.REPRODUCED)
    text = open(r.report).read()
    plain = text.replace("\\|", "|")  # table cells escape a literal pipe
    for c in r.claims:
        assert c.noise > 0, c.key
        assert f"{c.key}: {c.text}" in plain
        row = next(line for line in plain.splitlines() if line.startswith(f"| {c.key}: "))
        assert f"| {'yes' if c.asserted else 'no'} |" in row and f"| {c.status} |" in row, row
        if not c.asserted:
            assert f"{c.key} {c.status}" in r.verdict  # listed as reported, not asserted
    off = [f"{c.key}: {c.status}, effects {c.effects}, band {c.band}" for c in r.claims
           if c.asserted and c.status != C.REPRODUCED]
    assert not off, f"{r.name}: {off}; {r.verdict}"
    assert r.status == C.REPRODUCED and "**Verdict: PASS (reproduced)" in text


@pytest.mark.parametrize("name", ["mechanisms", "normalization"])
def test_synthetic_lab_verdicts(name, tmp_path_factory):
    r = _run(name, tmp_path_factory)
    _check_result(r)
    pngs = [f for f in os.listdir(os.path.dirname(r.report)) if f.endswith(".png")]
    assert pngs


def test_mechanisms_numbers(tmp_path_factory):
    """The claims' effects against the raw numbers (thresholds of the docstring, on each seed)."""
    from ssl_fast.lab import mechanisms as M

    r = _run("mechanisms", tmp_path_factory)
    n = r.numbers
    assert n["seeds"] == [0, 1] and n["a_collapsed"] == [M.N_STRONG] * 2
    assert all(x < M.NORM_RATIO for x in n["a_norm_ratio"])
    assert min(n["b_one_layer_min_rel_sv"]) > M.HEALTHY
    eff = {c.key: c.effects for c in r.claims}
    for rel, e in zip(n["a_rel_sv"], eff["a-six-collapsed"]):
        k = M.N_DIM - M.N_STRONG
        assert e == pytest.approx(min(math.log10(rel[k - 1] / M.COLLAPSED), math.log10(M.COLLAPSED / rel[k])))
    assert eff["b-two-layers-collapse"] == pytest.approx(
        [math.log10(a / b) for a, b in zip(n["b_one_layer_min_rel_sv"], n["b_two_layer_min_rel_sv"])])


def test_normalization_numbers(tmp_path_factory):
    from ssl_fast.lab import normalization as N

    r = _run("normalization", tmp_path_factory)
    n = r.numbers
    assert n["seeds"] == [0]
    assert not n["l2_eta0.0_seed0"]["collapsed"] and n["l2_eta2.0_seed0"]["collapsed"]
    assert n["l2_eta2.0_seed0"]["w_norm_rel"] < N.NORM_COLLAPSE
    assert all(not n[f"cosine_eta{e}_seed0"]["collapsed"] for e in N.ETAS_QUICK)
    weak = min(N._healthy_decades(n[f"l2_eta{e}_seed0"]) for e in N.ETAS_QUICK if e <= N.WEAK)
    assert next(c for c in r.claims if c.key == "l2-weak-wd-healthy").effects == [weak]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["noncontrastive", "swav", "alignment-uniformity"])
def test_image_lab_verdicts(name, tmp_path_factory):
    """The digits experiments on ssl_fast.methods at their small budget (one seed; about 20-90 s each on one
    busy core): every claim asserted at this budget is reproduced."""
    r = _run(name, tmp_path_factory)
    assert r.numbers["seeds"] == [0]
    _check_result(r)


@pytest.mark.slow
def test_projector_lab_reproduces_and_verdict_is_computed_from_the_numbers(tmp_path_factory):
    """The projector experiment on SimCLR / DirectCLR with the lab's MLP encoder at the small budget (one seed):
    no projector -> fewer dimensions (asserted); the DirectCLR sub-vector probe, within the noise at this budget
    (docs/lab/margins.md), is reported with the status its numbers give, not asserted."""
    from ssl_fast.lab import projector as P

    r = _run("projector", tmp_path_factory)
    per = r.numbers["per_variant"]
    assert set(P.QUICK) <= set(per) and r.numbers["seeds"] == [0]
    for name in P.QUICK:
        assert len(per[name]["rank"]) == 1 and 1 <= per[name]["rank"][0] <= P.DIM
        assert 0.5 < per[name]["knn"][0] <= 1.0  # every variant learns (random init: about 0.8)
        assert f"{name} {per[name]['rank'][0]}" in r.verdict
    claims = {c.key: c for c in r.claims}
    base = per["no projector"]["rank"][0]
    for name in ("MLP projector", P.DIRECTCLR):
        c = claims[P._key(name)]
        assert c.asserted and c.effects == [per[name]["rank"][0] - base]
    sub = claims["subvector-probe"]
    effect = r.numbers["directclr_full_probe"][0] - r.numbers["directclr_sub_probe"][0]
    assert not sub.asserted and sub.effects == [effect]
    want = C.REPRODUCED if effect > sub.band else (C.FAILED if effect < -sub.band else C.UNRESOLVED)
    assert sub.status == want
    _check_result(r)


# -- the verdict rule -----------------------------------------------------------------------------------------


def test_three_way_verdict_rule(tmp_path):
    from ssl_fast.diagnostics import MarkdownReport

    assert C.classify([0.5, 0.4], 0.3) == C.REPRODUCED
    assert C.classify([0.5, 0.2], 0.3) == C.UNRESOLVED  # one seed within the band
    assert C.classify([0.5, -0.5], 0.3) == C.UNRESOLVED  # seeds on both sides
    assert C.classify([-0.5, -0.4], 0.3) == C.FAILED
    assert C.classify([float("nan")], 0.3) == C.UNRESOLVED and C.classify([math.inf], 0.3) == C.REPRODUCED

    def claim(key, effects, asserted):
        return C.Claim(key, f"claim {key}", effects, list(range(len(effects))), 0.1, asserted, "u")

    good, noisy, bad = claim("good", [1.0], True), claim("noisy", [0.2], True), claim("bad", [-1.0], True)
    extra = claim("extra", [0.05], False)
    assert good.band == pytest.approx(C.BAND_K * 0.1) and good.margin == pytest.approx(10.0)
    assert C.overall([good, extra]) == C.REPRODUCED  # a reported claim decides nothing
    assert C.overall([good, noisy, extra]) == C.UNRESOLVED
    assert C.overall([good, noisy, bad]) == C.FAILED
    assert C.overall([extra]) == C.UNRESOLVED  # nothing asserted: nothing reproduced
    line = C.verdict_line([good, noisy, extra], "numbers")
    assert "not resolved at this budget (noisy: not resolved at this budget)" in line
    assert "reported, not asserted: extra not resolved at this budget" in line and "as published" not in line
    for claims, tag in (([good, extra], "PASS (reproduced)"), ([good, noisy], "NOT RESOLVED at this budget"),
                        ([bad], "FAIL")):
        rep = MarkdownReport("t", str(tmp_path))
        C.claims_section(rep, claims, "quick")
        assert C.write_verdict(rep, claims, "x") == C.overall(claims)
        assert f"**Verdict: {tag}: x**" in rep.text()


# -- docs/lab/margins.md: the measurement behind the noise and the asserted claims --------------------------


def _margin_rows():
    with open(MARGINS) as fh:
        return {(r["experiment"], r["budget"], r["claim"]): r for r in json.load(fh)["rows"]}


@pytest.mark.parametrize("name", list(lab.EXPERIMENTS))
def test_declared_noise_and_asserted_claims_match_the_measurement(name):
    """Every claim's declared noise covers its measured spread (seeds x threads) at the quick budget (and at
    the full budget where measured), and a claim is asserted only where every measured run was beyond
    the mean effect was at least ASSERT_MEAN x noise and every measured run beyond the band. Changing an
    experiment means re-measuring: python -m ssl_fast.lab.margins."""
    rows = _margin_rows()
    mod = _module(name)
    for key, spec in mod.CLAIMS.items():
        for budget in ("quick", "full"):
            row = rows.get((name, budget, key))
            if row is None:
                # the quick budget is measured for every claim it runs; the full budget where affordable
                assert budget == "full" or not _runs_at_quick(mod, key), (name, key)
                continue
            if budget == "quick":  # seeds 0-4 x 1 and 2 threads; the full budget: what was affordable
                assert row["runs"] >= 8 and row["threads"] == [1, 2], row
            assert row["runs"] >= 3, row
            noise = spec.noise[budget]
            assert noise == row["noise"] and noise >= row["sd"] and noise > 0, (name, budget, key, noise, row["sd"])
            if budget in spec.asserted:
                assert row["mean"] >= C.ASSERT_MEAN * noise and row["min"] > C.BAND_K * noise, (name, budget, key, row)
                assert row["assertable"] and row["assert_ok"]


def _runs_at_quick(mod, key):
    return not (mod.__name__.endswith("projector") and key not in ("mlp-projector", "directclr", "subvector-probe"))


def test_margins_summary_from_runs(tmp_path):
    """The margins tool: effects per (seed, threads) from each run's numbers, their spread, the checks."""
    from ssl_fast.lab import margins, swav

    raw = tmp_path / "raw"
    raw.mkdir()
    perp = {(0, 1): (28.0, 1.0), (0, 2): (27.0, 1.0), (1, 1): (26.0, 1.5), (1, 2): (29.0, 1.0)}
    for (sd, t), (sk, sm) in perp.items():
        numbers = {"Sinkhorn": {"perplexity": [sk]}, "softmax": {"perplexity": [sm]}, "seeds": [sd], "steps": 200}
        with open(margins.raw_path(str(raw), "swav", sd, t), "w") as fh:
            json.dump({"name": "swav", "seed": sd, "threads": t, "quick": True, "seconds": 3.0, "numbers": numbers},
                      fh)
    rows = {r["claim"]: r for r in margins.summarize(margins.load(str(raw)))}
    sk = rows["sinkhorn-no-collapse"]
    vals = [v[0] - swav.COLLAPSE_PERPLEXITY for v in perp.values()]
    assert sk["runs"] == 4 and sk["min"] == min(vals) and sk["max"] == max(vals)
    assert sk["sd"] == pytest.approx(__import__("statistics").stdev(vals))
    assert sk["max_thread_diff"] == pytest.approx(3.0) and sk["sd_seeds_1_thread"] == pytest.approx(2 ** 0.5)
    assert sk["noise"] == swav.CLAIMS["sinkhorn-no-collapse"].noise["quick"]
    assert margins.suggest_noise(0.34) == 0.4 and margins.suggest_noise(0.0) == 0.0
    assert margins.suggest_noise(1.67) == 2.0 and margins.suggest_noise(0.0031) == 0.004
    assert margins.assertable([6.0, 7.0], 0.5, 1.0) and not margins.assertable([5.0, 6.0], 0.5, 1.0)
    assert not margins.assertable([6.0, 7.0], 1.5, 1.0)  # declared noise below the measured sd
    assert not margins.assertable([1.0, 11.0], 0.5, 0.5)  # mean far out, one run within the band
    assert margins.assertable([math.inf, math.inf], 0.0, 0.5)  # every run infinitely far (a zero weight norm)
    out = margins.render(str(raw), str(tmp_path / "m.md"))
    text = open(out).read()
    assert "| swav | quick | softmax-collapse |" in text and os.path.exists(tmp_path / "m.json")

    # a saved full-budget lab run (three seeds) counts as a measurement of the full budget
    from ssl_fast.lab import LabResult, _save_result

    lab_out = tmp_path / "lab"
    (lab_out / "swav").mkdir(parents=True)
    numbers = {"Sinkhorn": {"perplexity": [28.0, 27.5, 29.0]}, "softmax": {"perplexity": [1.0, 1.0, 1.1]},
               "seeds": [0, 1, 2], "steps": 400}
    _save_result(LabResult("swav", "f", "v", True, numbers, str(lab_out / "swav" / "report.md")), str(lab_out),
                 quick=False, seed=0)
    assert margins.import_results(str(lab_out), str(raw)) == [margins.raw_path(str(raw), "swav", 0, 1, "full")]
    full = {r["claim"]: r for r in margins.summarize(margins.load(str(raw))) if r["budget"] == "full"}
    assert full["softmax-collapse"]["runs"] == 3 and full["softmax-collapse"]["seeds"] == [0, 1, 2]
    assert full["softmax-collapse"]["min"] == pytest.approx(swav.COLLAPSE_PERPLEXITY - 1.1)


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
    claim = C.Claim("k", "a claim", [0.5], [0], 0.1, True, "u")
    for name, status in (("normalization", C.REPRODUCED), ("mechanisms", C.UNRESOLVED)):
        (out / name).mkdir(parents=True)
        rep = out / name / "report.md"
        rep.write_text("x")
        _save_result(LabResult(name, f"finding {name}", f"verdict | {name}", status == C.REPRODUCED, report=str(rep),
                               seconds=3, claims=[claim], status=status), str(out), quick=True, seed=0)
    res = load_results(str(out))
    assert [r.name for r in res] == ["mechanisms", "normalization"]  # EXPERIMENTS order
    assert res[0].status == C.UNRESOLVED and res[0].claims[0].as_dict() == claim.as_dict()
    text = open(write_summary([], str(out))).read()
    assert "[mechanisms](mechanisms/report.md)" in text and "verdict \\| normalization" in text
    assert "**not resolved at this budget** | 1 of 1 |" in text and "| reproduced | 1 of 1 |" in text
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
    teacher = {type(mod).__name__ for mod in m.teacher.teacher.projector.modules()}
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
    for p, q in zip(m0.online.parameters(), m0.teacher.teacher.parameters()):
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
