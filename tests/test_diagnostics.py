"""Collapse diagnostics against matrices with known spectra and direct float64 formulas."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_fast import diagnostics as dg

F64 = torch.float64


def _orthogonal(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q


def _with_spectrum(n, values, seed=0):
    """(n, d) centered rows whose covariance has exactly the eigenvalues ``values`` (in a random basis)."""
    d = len(values)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    x = x - x.mean(0)
    # whiten exactly, then scale and rotate
    c = x.T @ x / (n - 1)
    evals, evecs = torch.linalg.eigh(c)
    x = x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    return x @ torch.diag(torch.tensor(values, dtype=F64).sqrt()) @ _orthogonal(d, seed + 1)


def test_spectrum_identity_and_rank_k():
    s = dg.covariance_spectrum(_with_spectrum(200, [1.0] * 8))
    torch.testing.assert_close(s, torch.ones(8, dtype=F64), rtol=1e-10, atol=1e-12)
    assert float(dg.effective_rank(s)) == pytest.approx(8.0, rel=1e-10)
    vals = [4.0, 3.0, 2.0] + [0.0] * 7
    # rank 3 embedded in 10 dimensions by 3 random orthonormal rows
    s = dg.covariance_spectrum(_with_spectrum(300, vals[:3], seed=4) @ _orthogonal(10, 5)[:3])
    torch.testing.assert_close(s, torch.tensor(vals, dtype=F64), rtol=1e-9, atol=1e-12)


def test_spectrum_matches_eigvalsh_and_is_sorted():
    z = torch.randn(37, 11, dtype=torch.float32) @ torch.randn(11, 11)
    s = dg.covariance_spectrum(z)
    zc = z.double() - z.double().mean(0)
    ref = torch.linalg.eigvalsh(zc.T @ zc / 36).flip(0).clamp_min(0)
    torch.testing.assert_close(s, ref, rtol=1e-9, atol=1e-10)
    assert bool((s[:-1] >= s[1:]).all()) and s.dtype == F64


def test_spectrum_fewer_rows_than_columns_pads_zeros():
    s = dg.covariance_spectrum(torch.randn(5, 12))
    assert s.shape == (12,) and bool((s[4:] == 0).all()) and bool((s[:4] > 0).all())


def test_spectrum_batched_matches_loop():
    z = torch.randn(3, 40, 7)
    s = dg.covariance_spectrum(z)
    for i in range(3):
        torch.testing.assert_close(s[i], dg.covariance_spectrum(z[i]))
    er = dg.embedding_effective_rank(z)
    assert er.shape == (3,)


def test_effective_rank_known_values():
    assert float(dg.effective_rank(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))) == pytest.approx(3.0)
    assert float(dg.effective_rank(torch.tensor([5.0]))) == pytest.approx(1.0)
    assert float(dg.effective_rank(torch.zeros(4))) == pytest.approx(1.0)
    p = torch.tensor([0.5, 0.25, 0.25], dtype=F64)
    assert float(dg.effective_rank(p * 7)) == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_effective_rank_invariances():
    z = torch.randn(256, 16, dtype=F64) * torch.logspace(0, -2, 16, dtype=F64)
    base = dg.embedding_effective_rank(z)
    # scale
    torch.testing.assert_close(dg.embedding_effective_rank(z * 123.0), base)
    # rotation
    torch.testing.assert_close(dg.embedding_effective_rank(z @ _orthogonal(16, 7)), base)
    # translation (covariance is centered)
    torch.testing.assert_close(dg.embedding_effective_rank(z + 5.0), base)
    # duplicated rows: the covariance changes only by the factor (n-1)/(2n-1) * 2
    torch.testing.assert_close(dg.embedding_effective_rank(torch.cat([z, z])), base)


def test_duplicated_rows_complete_collapse():
    z = torch.randn(1, 32).expand(64, 32)
    s = dg.covariance_spectrum(z)
    assert float(s.abs().max()) < 1e-12
    assert float(dg.effective_rank(s)) == 1.0
    stats = dg.collapse_stats(z)
    assert float(stats["std"]) < 1e-7 and float(stats["dead_fraction"]) == 1.0
    assert float(stats["uniformity"]) == pytest.approx(0.0, abs=1e-10)


def test_alignment_matches_direct_formula():
    x, y = torch.randn(50, 9), torch.randn(50, 9)
    xn, yn = F.normalize(x.double(), dim=1), F.normalize(y.double(), dim=1)
    ref = sum(float((xn[i] - yn[i]).norm()) ** 2 for i in range(50)) / 50
    assert float(dg.alignment(x, y)) == pytest.approx(ref, rel=1e-12)
    ref3 = sum(float((xn[i] - yn[i]).norm()) ** 3 for i in range(50)) / 50
    assert float(dg.alignment(x, y, alpha=3)) == pytest.approx(ref3, rel=1e-12)
    assert float(dg.alignment(x, 3 * x)) == pytest.approx(0.0, abs=1e-12)
    assert float(dg.alignment(x, -x)) == pytest.approx(4.0, rel=1e-12)


@pytest.mark.parametrize("n", [2, 3, 31])
def test_uniformity_matches_direct_formula(n):
    x = torch.randn(n, 5)
    xn = F.normalize(x.double(), dim=1)
    terms = [math.exp(-2 * float((xn[i] - xn[j]).norm()) ** 2) for i in range(n) for j in range(i + 1, n)]
    ref = math.log(sum(terms) / len(terms))
    assert float(dg.uniformity(x)) == pytest.approx(ref, rel=1e-12)
    # Wang & Isola's reference code
    ref2 = torch.pdist(xn, p=2).pow(2).mul(-2).exp().mean().log()
    assert float(dg.uniformity(x)) == pytest.approx(float(ref2), rel=1e-10)
    assert float(dg.uniformity(x, t=0.5)) == pytest.approx(
        float(torch.pdist(xn, p=2).pow(2).mul(-0.5).exp().mean().log()), rel=1e-10)


def test_uniformity_extremes_and_no_underflow():
    # antipodal pair: distance^2 = 4, uniformity = -8 exactly
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert float(dg.uniformity(x)) == pytest.approx(-8.0)
    # huge t: a naive mean(exp()) underflows to log(0) = -inf; log-sum-exp stays finite
    assert math.isfinite(float(dg.uniformity(torch.randn(20, 4), t=1000.0)))


def test_normalized_std_levels():
    d = 64
    healthy = dg.normalized_std(torch.randn(4096, d)).mean() * math.sqrt(d)
    assert float(healthy) == pytest.approx(1.0, abs=0.03)
    # rank-1 embeddings (every row the same direction, different scale): std 0
    z = torch.rand(100, 1) * torch.randn(1, d)
    assert float(dg.normalized_std(z).max()) < 1e-7
    assert float(dg.dead_fraction(z)) == 1.0
    # half of the dimensions constant 0: half dead
    z = torch.randn(500, d)
    z[:, : d // 2] = 0
    assert float(dg.dead_fraction(z)) == pytest.approx(0.5)


def test_weight_spectrum_and_predictor_alignment():
    u = _orthogonal(6, 2)
    wp = u @ torch.diag(torch.tensor([3.0, 2, 1, 0.5, 0.2, 0.1], dtype=F64)) @ u.T
    fcorr = u @ torch.diag(torch.tensor([9.0, 5, 4, 3, 2, 1], dtype=F64)) @ u.T
    a = dg.predictor_alignment(wp, correlation=fcorr)
    torch.testing.assert_close(a, torch.ones(6, dtype=F64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dg.weight_spectrum(wp), torch.tensor([3.0, 2, 1, 0.5, 0.2, 0.1], dtype=F64))
    # the input route: inputs whose second moment is fcorr
    x = _with_spectrum(500, [9.0, 5, 4, 3, 2, 1], seed=9)
    x = x - x.mean(0)
    x = x * math.sqrt(500 / 499)  # correlation_matrix divides by N
    fx = dg.correlation_matrix(x)
    torch.testing.assert_close(dg.predictor_alignment(wp, x), dg.predictor_alignment(wp, correlation=fx))
    # a random predictor is far from aligned
    g = torch.Generator().manual_seed(1)
    r = dg.predictor_alignment(torch.randn(32, 32, generator=g, dtype=F64), torch.randn(400, 32, generator=g))
    assert float(r.mean()) < 0.5
    with pytest.raises(ValueError, match="exactly one"):
        dg.predictor_alignment(wp)
    with pytest.raises(ValueError, match="square"):
        dg.predictor_alignment(torch.randn(3, 4), correlation=torch.eye(3))


def test_bad_inputs():
    with pytest.raises(ValueError, match="z"):
        dg.covariance_spectrum(torch.randn(5))
    with pytest.raises(ValueError, match="z"):
        dg.covariance_spectrum(torch.randn(1, 5))
    with pytest.raises(TypeError, match="z"):
        dg.covariance_spectrum(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="same shape"):
        dg.alignment(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="t must be"):
        dg.uniformity(torch.randn(4, 3), t=0.0)


def test_metrics_bf16_inputs_computed_in_float64():
    z = torch.randn(64, 8)
    s32 = dg.covariance_spectrum(z)
    s16 = dg.covariance_spectrum(z.bfloat16())
    assert s16.dtype == F64
    torch.testing.assert_close(s16, s32, rtol=0.05, atol=1e-3)


def test_callback_every_k_csv_and_no_work_between(tmp_path):
    model = torch.nn.Sequential()
    model.add_module("projector", torch.nn.Linear(8, 4))
    model.add_module("predictor", torch.nn.Linear(4, 4, bias=False))
    cb = dg.DiagnosticsCallback(every=3, out_dir=str(tmp_path))
    z1, z2 = torch.randn(32, 4), torch.randn(32, 4)
    outs = [cb.on_step(s, embeddings={"projection": z1}, views=(z1, z2), model=model) for s in range(7)]
    assert [o is not None for o in outs] == [True, False, False, True, False, False, True]
    row = outs[0]
    assert all(isinstance(v, float) for v in row.values())
    assert row["projection/effective_rank"] == pytest.approx(float(dg.embedding_effective_rank(z1)))
    assert row["view/alignment"] == pytest.approx(float(dg.alignment(z1, z2)))
    assert row["predictor/weight_sv_max"] == pytest.approx(float(dg.weight_spectrum(model.predictor.weight)[0]))
    assert "projector/weight_effective_rank" in row
    with open(tmp_path / "diagnostics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    assert float(rows[1]["view/uniformity"]) == pytest.approx(row["view/uniformity"])
    t = cb.compute(embeddings=z1)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in t.values())
    with pytest.raises(ValueError, match="every"):
        dg.DiagnosticsCallback(every=0)


def test_callback_writer_protocol():
    logged = []

    class W:
        def add_scalar(self, tag, value, step):
            logged.append((tag, value, step))

    cb = dg.DiagnosticsCallback(every=1, writer=W())
    cb.on_step(5, embeddings=torch.randn(16, 3))
    assert logged and all(s == 5 for _, _, s in logged)


def test_callback_tensorboard_event_files(tmp_path):
    """``tensorboard=True`` writes event files under <out_dir>/tensorboard whose scalars read back (tags, steps,
    values) equal to the CSV / returned rows."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = torch.nn.Sequential()
    model.add_module("projector", torch.nn.Linear(8, 4))
    cb = dg.DiagnosticsCallback(every=2, out_dir=str(tmp_path), tensorboard=True)
    assert cb.writer is not None
    g = torch.Generator().manual_seed(0)
    rows = {}
    for s in range(5):
        z1, z2 = torch.randn(32, 4, generator=g), torch.randn(32, 4, generator=g)
        out = cb.on_step(s, embeddings={"representation": z1}, views=(z1, z2), model=model)
        if out is not None:
            rows[s] = out
    cb.close()
    tb = tmp_path / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in tb.iterdir())
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {f"representation/{k}" for k in ("effective_rank", "effective_rank_fraction", "top_eigenvalue",
                                                  "uniformity", "std", "std_sqrt_d", "dead_fraction")}
    expected |= {"view/alignment", "projector/weight_effective_rank", "projector/weight_sv_max",
                 "projector/weight_sv_min"}
    assert expected <= tags, expected - tags
    assert tags == {k for k, v in rows[0].items() if not math.isnan(v)}
    for tag in ("representation/effective_rank", "view/alignment", "projector/weight_sv_max"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 2, 4]
        for e in events:
            assert e.value == pytest.approx(rows[e.step][tag], rel=1e-6, abs=1e-7)


def test_plots_and_report(tmp_path):
    from ssl_fast.diagnostics import plots
    from ssl_fast.diagnostics.report import MarkdownReport

    p = plots.plot_spectra({"a": torch.tensor([1.0, 0.1, 0.0])}, str(tmp_path / "s.png"))
    q = plots.plot_curves({"c": [1.0, 2.0]}, str(tmp_path / "c.png"), logy=True)
    rep = MarkdownReport("t", str(tmp_path))
    rep.table(["x", "y"], [[1, 0.123456], ["z", float("nan")]])
    rep.image(p, "spec")
    rep.verdict("ok", True)
    text = open(rep.write()).read()
    assert "| 1 | 0.1235 |" in text and "![spec](s.png)" in text and "**Verdict: PASS: ok**" in text
    for path in (p, q):
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_diagnose_embeddings_states(tmp_path):
    from ssl_fast.diagnostics.diagnose import diagnose_embeddings

    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(300, 32, generator=g)
    low = torch.randn(300, 2, generator=g) @ torch.randn(2, 32, generator=g)  # rank 2 of 32
    point = torch.randn(1, 32, generator=g).expand(300, 32) + 1e-6 * torch.randn(300, 32, generator=g)
    y = torch.randint(0, 3, (300,), generator=g)
    path, s = diagnose_embeddings({"healthy": healthy, "low rank": low, "collapsed": point}, str(tmp_path),
                                  views={"healthy": (healthy, healthy + 0.1 * torch.randn(300, 32, generator=g))},
                                  labels=(y, y), train_embeddings={"healthy": healthy})
    assert s["healthy"]["state"] == "healthy" and s["healthy"]["rank_at_1e-3"] == 32
    assert s["low rank"]["state"] == "dimensional collapse" and s["low rank"]["rank_at_1e-3"] == 2
    assert s["collapsed"]["state"] == "complete collapse"
    assert s["healthy"]["knn_accuracy"] == 1.0  # the bank is the query set
    assert 0 < s["healthy"]["alignment"] < 0.05
    text = open(path).read()
    assert "dimensional collapse" in text and (tmp_path / "spectrum.png").exists()
    assert (tmp_path / "spectrum.csv").read_text().startswith("index,healthy,low rank,collapsed")


def test_diagnose_cli_on_saved_embeddings(tmp_path, capsys):
    from ssl_fast.cli import main

    g = torch.Generator().manual_seed(0)
    path = tmp_path / "emb.pt"
    torch.save({"good": torch.randn(200, 16, generator=g),
                "line": torch.randn(200, 1, generator=g) * torch.randn(1, 16, generator=g),  # +-v: rank 1
                "point": (1 + torch.rand(200, 1, generator=g)) * torch.randn(1, 16, generator=g)}, path)
    assert main(["diagnose", str(path), "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "good: healthy" in out and "line: dimensional collapse" in out and "point: complete collapse" in out
    assert (tmp_path / "d" / "report.md").exists() and (tmp_path / "d" / "spectrum.png").exists()
    assert main(["diagnose", str(tmp_path / "missing.pt")]) == 2
    torch.save(torch.randn(1, 4), tmp_path / "one.pt")
    assert main(["diagnose", str(tmp_path / "one.pt")]) == 2
    assert "N >= 2" in capsys.readouterr().err


def test_diagnose_nonnegative_features_are_not_called_collapsed(tmp_path):
    from ssl_fast.diagnostics.diagnose import diagnose_embeddings

    g = torch.Generator().manual_seed(0)
    relu = 5.0 + torch.rand(300, 32, generator=g)  # a big common mean, full-rank variation
    _, s = diagnose_embeddings({"relu": relu}, str(tmp_path))
    assert s["relu"]["std_sqrt_d"] < 0.15 and s["relu"]["state"].startswith("healthy")
    _, s = diagnose_embeddings({"relu rank 2": torch.rand(300, 2, generator=g) @ torch.rand(2, 32, generator=g)},
                               str(tmp_path))
    assert s["relu rank 2"]["state"] == "dimensional collapse"


def test_diagnose_checkpoint_of_a_training_run(tmp_path, capsys):
    """ssl-fast diagnose on a run directory of ssl-fast train (skipped where the trainers are not installed)."""
    pytest.importorskip("ssl_fast.train")
    from ssl_fast.cli import main
    from ssl_fast.train.config import make_config
    from ssl_fast.train.trainer import Trainer

    cfg = make_config(overrides=dict(method="simclr", max_steps=2, batch_size=32, run_dir=str(tmp_path / "run"),
                                     knn=False, progress=False, backbone="small_cnn", image_size=16, ckpt_every=100))
    Trainer(cfg).fit()
    assert main(["diagnose", str(tmp_path / "run"), "--max-samples", "128", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "representation:" in out and "projection:" in out and "kNN" in out
    text = (tmp_path / "d" / "report.md").read_text()
    assert "method simclr" in text and "alignment" in text
    assert main(["diagnose", str(tmp_path / "nothing_here")]) == 2


def test_trainer_diagnostics_every_logs_without_changing_training(tmp_path):
    """--diagnostics-every N: diagnostics.csv every N steps; the losses and weights equal a run without it."""
    pytest.importorskip("ssl_fast.train")
    from ssl_fast.train.config import make_config
    from ssl_fast.train.trainer import Trainer

    def run(name, every):
        cfg = make_config(overrides=dict(method="simclr", max_steps=4, batch_size=32, run_dir=str(tmp_path / name),
                                         knn=False, progress=False, backbone="small_cnn", image_size=16,
                                         ckpt_every=100, diagnostics_every=every))
        t = Trainer(cfg)
        t.fit()
        return t

    a, b = run("with", 2), run("without", 0)
    with open(tmp_path / "with" / "diagnostics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert {"representation/effective_rank", "projection/std_sqrt_d", "view/alignment"} <= set(rows[0])
    assert all(math.isfinite(float(v)) for v in rows[-1].values())
    assert not (tmp_path / "without" / "diagnostics.csv").exists()
    assert a.losses() == b.losses()
    for (k, v), w in zip(a.method.state_dict().items(), b.method.state_dict().values()):
        assert torch.equal(v, w), k
