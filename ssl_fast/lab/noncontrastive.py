"""``ssl-fast lab noncontrastive``: what keeps SimSiam and BYOL from collapsing.

Findings under test (Chen & He 2021; Grill et al. 2020; Tian, Yu, Chen, Ganguli 2020; Tian, Chen, Ganguli 2021):

1. SimSiam without the stop-gradient collapses completely (the loss goes to its minimum -1 and the
   per-dimension std of the l2-normalized output goes to 0); with it, the std stays near 1/sqrt(d).
2. BYOL without the predictor collapses.
3. BYOL's predictor normalization, in a network without any other BatchNorm (encoder and projector plain):
   BatchNorm and zero-mean centering ``x - x.mean(0)`` (gradient through the mean) work; centering whose mean
   is detached (``x - x.mean(0).detach()``) fails, as does no normalization: what BN contributes is a
   zero-mean back-propagated gradient, which the detached mean does not give.
4. The EMA momentum of the target (reported: tau = 0 is SimSiam-like, tau = 1 a frozen random target).

Set-up: digits (16 x 16), MLP encoder (64-dim representation) + MLP projector (64) + MLP predictor
(64 -> 128 -> 64), symmetric negative cosine loss, batch 256, Adam lr 1e-3, EMA target (momentum 0.99 unless
swept, ``ssl_fast.ema_update_``), the loss through ``ssl_fast.nn.NegativeCosineSimilarity`` (both when the
package has them), the same seed and views for every variant.

Collapse indicator: s = mean per-dimension std of the l2-normalized projector output on the held-out split,
times sqrt(d) (1 for isotropic outputs, 0 for complete collapse). Collapsed: s < 0.15; healthy: s > 0.25.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

import ssl_fast
from ssl_fast import diagnostics as dg
from ssl_fast.diagnostics import plots
from ssl_fast.diagnostics.report import MarkdownReport

from . import _digits as D
from ._common import LabResult, ema_, f, out_dir

NAME = "noncontrastive"
FINDING = ("SimSiam without stop-gradient and BYOL without predictor collapse; predictor BN or centering with "
           "gradient works, centering with a detached mean fails")
DIM, LR, BATCH = 64, 1e-3, 256
COLLAPSED, HEALTHY = 0.15, 0.25


class Center(nn.Module):
    """Zero-mean centering over the batch; ``detach`` stops the gradient through the mean."""

    def __init__(self, detach: bool):
        super().__init__()
        self.detach = detach

    def forward(self, x):
        m = x.mean(0, keepdim=True)
        return x - (m.detach() if self.detach else m)


def predictor(norm: str) -> nn.Module:
    layer = {"BN": lambda: nn.BatchNorm1d(128), "centering": lambda: Center(False),
             "centering, detached mean": lambda: Center(True), "none": nn.Identity}[norm]()
    return nn.Sequential(nn.Linear(DIM, 128), layer, nn.ReLU(), nn.Linear(128, DIM))


def _neg_cos(p, z):
    """-mean cos(p_i, z_i): ``ssl_fast.nn.NegativeCosineSimilarity`` where the package has it (gradient to both)."""
    crit = getattr(ssl_fast.nn, "NegativeCosineSimilarity", None)
    if crit is not None:
        return crit()(p, z)
    return -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1).mean()


def train(data, *, method: str, steps: int, seed: int, stop_grad: bool = True, pred: str = "BN",
          backbone_bn: bool = True, tau: float = 0.99):
    """One SimSiam / BYOL run; returns (online encoder+projector, encoder, final loss)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    enc = D.Encoder(dim=DIM, bn=backbone_bn)
    online = nn.Sequential(enc, D.mlp([DIM, 128, DIM], bn=backbone_bn))
    head = nn.Identity() if pred == "no predictor" else predictor(pred)
    target = copy.deepcopy(online).requires_grad_(False) if method == "BYOL" else None
    opt = torch.optim.Adam(list(online.parameters()) + list(head.parameters()), lr=LR)
    it = D.batches(data.train_x.shape[0], BATCH, torch.Generator().manual_seed(seed + 1))
    for _ in range(steps):
        x = data.train_x[next(it)]
        v1, v2 = D.augment(x, g), D.augment(x, g)
        z1, z2 = online(v1), online(v2)
        p1, p2 = head(z1), head(z2)
        if target is None:
            t1, t2 = (z1.detach(), z2.detach()) if stop_grad else (z1, z2)
        else:
            with torch.no_grad():
                t1, t2 = target(v1), target(v2)
        loss = 0.5 * (_neg_cos(p1, t2) + _neg_cos(p2, t1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if target is not None:
            ema_(target.parameters(), [p.detach() for p in online.parameters()], tau)
            for bt, bo in zip(target.buffers(), online.buffers()):
                bt.copy_(bo)
    return online, enc, float(loss.detach())


def _measure(data, online, enc):
    z = D.features(online, data.test_x)
    r = D.features(enc, data.test_x)
    s = float(dg.normalized_std(z).mean()) * math.sqrt(z.shape[1])
    return {"std_sqrt_d": s, "effective_rank_r": float(dg.effective_rank(dg.covariance_spectrum(r).sqrt())),
            "knn": D.evaluate(enc, data, probe=False)["knn"], "spectrum": dg.covariance_spectrum(z)}


def _state(s: float) -> str:
    return "collapsed" if s < COLLAPSED else ("healthy" if s > HEALTHY else "partial")


def run(out: str, *, quick: bool = False, seed: int = 0) -> LabResult:
    d = out_dir(out, NAME)
    steps = 250 if quick else 600
    data = D.load(seed)
    rep = MarkdownReport("Lab: non-contrastive collapse (SimSiam, BYOL)", d)
    rep.paragraph(__doc__.split("\n", 2)[2])
    cases = [
        ("SimSiam", "stop-gradient", dict(method="SimSiam", stop_grad=True)),
        ("SimSiam", "no stop-gradient", dict(method="SimSiam", stop_grad=False)),
        ("BYOL", "predictor (BN)", dict(method="BYOL", pred="BN")),
        ("BYOL", "no predictor", dict(method="BYOL", pred="no predictor")),
    ] + [("BYOL, no BN in encoder/projector", f"predictor norm: {p}", dict(method="BYOL", pred=p, backbone_bn=False))
         for p in ("BN", "centering", "centering, detached mean", "none")]
    taus = () if quick else (0.0, 0.9, 0.996, 1.0)
    cases += [("BYOL, EMA sweep", f"tau = {t}", dict(method="BYOL", pred="BN", tau=t)) for t in taus]
    res = {}
    rows = []
    for group, label, kw in cases:
        online, enc, loss = train(data, steps=steps, seed=seed, **kw)
        m = _measure(data, online, enc)
        m["loss"] = loss
        res[(group, label)] = m
        rows.append([group, label, loss, m["std_sqrt_d"], _state(m["std_sqrt_d"]), m["effective_rank_r"], m["knn"]])
    torch.manual_seed(seed)
    init_enc = D.Encoder(dim=DIM)
    init_on = nn.Sequential(init_enc, D.mlp([DIM, 128, DIM]))
    mi = _measure(data, init_on, init_enc)
    rows.insert(0, ["(random init)", "-", float("nan"), mi["std_sqrt_d"], _state(mi["std_sqrt_d"]),
                    mi["effective_rank_r"], mi["knn"]])
    rep.heading(f"Runs ({steps} steps, seed {seed})")
    rep.table(["model", "variant", "final loss", "std x sqrt(d)", "state", "effective rank of r (singular values)",
               "kNN acc of r"], rows)
    rep.paragraph("The kNN accuracy of r can stay high where the projector output has collapsed: the weighted "
                  "cosine kNN is scale-free and still reads the small residual variation of r; the std and the "
                  "effective rank are the collapse indicators.")
    short = {"SimSiam": "SimSiam", "BYOL": "BYOL", "BYOL, no BN in encoder/projector": "BYOL no-BN",
             "BYOL, EMA sweep": "BYOL"}
    rep.image(plots.plot_bars({f"{short[g]}: {l.replace('predictor norm: ', 'pred ')}": m["std_sqrt_d"]
                               for (g, l), m in res.items()},
                              f"{d}/std.png", title="normalized-output std x sqrt(d) (1 healthy, 0 collapsed)"),
              "std per variant")
    s = {k: v["std_sqrt_d"] for k, v in res.items()}
    nb = "BYOL, no BN in encoder/projector"
    checks = {
        "SimSiam with stop-grad healthy": s[("SimSiam", "stop-gradient")] > HEALTHY,
        "SimSiam without stop-grad collapsed": s[("SimSiam", "no stop-gradient")] < COLLAPSED,
        "BYOL with predictor healthy": s[("BYOL", "predictor (BN)")] > HEALTHY,
        "BYOL without predictor collapsed": s[("BYOL", "no predictor")] < COLLAPSED,
        "predictor BN healthy": s[(nb, "predictor norm: BN")] > HEALTHY,
        "predictor centering healthy": s[(nb, "predictor norm: centering")] > HEALTHY,
        "predictor detached centering collapsed": s[(nb, "predictor norm: centering, detached mean")] < COLLAPSED,
    }
    passed = all(checks.values())
    none_state = _state(s[(nb, "predictor norm: none")])
    verdict = (f"std x sqrt(d): SimSiam {f(s[('SimSiam', 'stop-gradient')])} vs no stop-grad "
               f"{f(s[('SimSiam', 'no stop-gradient')])}; BYOL {f(s[('BYOL', 'predictor (BN)')])} vs no predictor "
               f"{f(s[('BYOL', 'no predictor')])}; predictor BN {f(s[(nb, 'predictor norm: BN')])}, centering "
               f"{f(s[(nb, 'predictor norm: centering')])}, detached mean "
               f"{f(s[(nb, 'predictor norm: centering, detached mean')])}, none "
               f"{f(s[(nb, 'predictor norm: none')])} ({none_state}): "
               + ("all as published" if passed else "NOT as published: "
                  + ", ".join(k for k, ok in checks.items() if not ok)))
    if taus:
        ema_txt = ", ".join(f"tau {t}: std {f(s[('BYOL, EMA sweep', f'tau = {t}')])} kNN "
                            f"{res[('BYOL, EMA sweep', f'tau = {t}')]['knn']:.3f}" for t in taus)
        rep.heading("EMA momentum")
        rep.paragraph(f"{ema_txt}. Reported, not part of the verdict: tau = 0 is SimSiam (identical numbers); "
                      f"tau = 1 (a frozen random target) keeps the highest loss.")
    rep.heading("Verdict")
    rep.paragraph(f"Checks (collapsed: std x sqrt(d) < {COLLAPSED}; healthy: > {HEALTHY}): "
                  + "; ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in checks.items()))
    rep.verdict(verdict, passed)
    numbers = {f"{g} / {l}": {k: v for k, v in m.items() if k != "spectrum"} for (g, l), m in res.items()}
    numbers["checks"] = checks
    return LabResult(NAME, FINDING, verdict, passed, numbers, rep.write())
