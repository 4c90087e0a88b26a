"""``ssl-fast lab noncontrastive``: what keeps SimSiam and BYOL from collapsing.

Findings under test (Chen & He 2021; Grill et al. 2020; Tian, Yu, Chen, Ganguli 2020; Tian, Chen, Ganguli 2021):

1. SimSiam without the stop-gradient collapses completely (the loss goes to its minimum -1 and the
   per-dimension std of the l2-normalized output goes to 0); with it, the std stays near 1/sqrt(d).
2. BYOL without the predictor collapses. Here its std drops far below BYOL's (asserted), to about 0.1:
   whether that is below the collapse threshold 0.15 is within the noise at both budgets (reported, not
   asserted).
3. BYOL's predictor normalization, with no BatchNorm in the projector (the encoder keeps its own, as the
   ResNet of Tian et al.'s STL-10 runs): BatchNorm and zero-mean centering ``x - x.mean(0)`` (gradient
   through the mean) work; centering whose mean is detached (``x - x.mean(0).detach()``) fails: what BN
   contributes is a zero-mean back-propagated gradient, which the detached mean does not give. No
   normalization at all is reported, not tested.
4. The EMA momentum of the target, swept at constant m in {0, 0.9, 0.99, 0.996} (reported, not part of the
   verdict: m = 0 is a target equal to the online network without its gradient, SimSiam with BYOL's heads;
   larger m smooths the target).

What runs is what ``ssl-fast train`` runs: ``ssl_fast.methods.SimSiam`` (``ssl_fast.nn.NegativeCosineSimilarity``,
projector 64-256-256-64 with BN on the output, predictor 64-32-64) and ``ssl_fast.methods.BYOL``
(``ssl_fast.nn.BYOLLoss``, projector 64-256-64, predictor 64-256-64, target ``ssl_fast.nn.EMA``: momentum
0.99 -> 1 on the cosine schedule unless swept) on ``ssl_fast.methods.SmallCNN`` (width 8, 64-dim
representation), 16 x 16 digits, ``ssl_fast.data.digits_view`` views, batch 256, Adam lr 1e-3. The variants
are small changes of these methods (``SimSiamNoStopGrad``: the same forward without the ``detach``; BYOL with
``predictor = Identity``; ``BYOLNorm``: BYOL whose predictor's BatchNorm1d is replaced and, for finding 3,
whose projector has no BatchNorm; its EMA target is rebuilt after the change). Each case runs on
several seeds (initialization, data order and views; the cases of one seed share them).

Collapse indicator: s = mean per-dimension std of the l2-normalized projector output on the held-out split,
times sqrt(d) (1 for isotropic outputs, 0 for complete collapse). Collapsed: s < 0.15; healthy: s > 0.25.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssl_fast import diagnostics as dg
from ssl_fast.diagnostics import MarkdownReport, plots
from ssl_fast.methods import BYOL, SimSiam

from . import _image as I
from ._common import ClaimSpec, LabResult, conclude, f, out_dir

NAME = "noncontrastive"
FINDING = ("SimSiam without stop-gradient and BYOL without predictor collapse; predictor BN or centering with "
           "gradient works, centering with a detached mean fails")
DIM, LR, BATCH = I.DIM, 1e-3, 256
COLLAPSED, HEALTHY = 0.15, 0.25
EMA_SWEEP = (0.0, 0.9, 0.99, 0.996)


class SimSiamNoStopGrad(SimSiam):
    """SimSiam with the gradient through both branches (no stop-gradient): the ablation of Chen & He's Fig. 2."""

    def forward(self, views, step: int = 0, total_steps: int = 1):
        z = self.projector(self.backbone(torch.cat(views[:2])))
        p = self.predictor(z)
        z0, z1 = z.chunk(2)
        p0, p1 = p.chunk(2)
        loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        return loss, {"std": dg.normalized_std(z0.detach()).mean()}


class Center(nn.Module):
    """Zero-mean centering over the batch; ``detach`` stops the gradient through the mean."""

    def __init__(self, detach: bool):
        super().__init__()
        self.detach = detach

    def forward(self, x):
        m = x.mean(0, keepdim=True)
        return x - (m.detach() if self.detach else m)


PRED_NORMS = {"BN": None, "centering": lambda: Center(False), "centering, detached mean": lambda: Center(True),
              "none": nn.Identity}


class BYOLNorm(BYOL):
    """BYOL with the predictor's BatchNorm1d replaced by ``pred_norm`` (a key of ``PRED_NORMS``) and, with
    ``head_bn=False``, no BatchNorm1d in the projector; the EMA target is rebuilt from the changed network."""

    def __init__(self, backbone, feature_dim, *, pred_norm: str = "BN", head_bn: bool = True,
                 ema_momentum: float = 0.99, ema_final_momentum: float = 1.0, **kw):
        super().__init__(backbone, feature_dim, ema_momentum=ema_momentum, ema_final_momentum=ema_final_momentum,
                         **kw)
        make = PRED_NORMS[pred_norm]
        if make is not None:
            I.replace_modules(self.predictor, nn.BatchNorm1d, lambda m: make())
        if not head_bn:
            I.replace_modules(self.online.projector, nn.BatchNorm1d, lambda m: nn.Identity())
        self.teacher = type(self.teacher)(self.online, momentum=ema_momentum, schedule="cosine",
                                          final_momentum=ema_final_momentum)


def build(case: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    bb = I.backbone(bn=case.get("backbone_bn", True))
    if case["method"] == "SimSiam":
        cls = SimSiam if case.get("stop_grad", True) else SimSiamNoStopGrad
        return cls(bb, DIM, proj_hidden_dim=256, proj_dim=DIM, pred_hidden_dim=32)
    tau = case.get("tau")
    m = BYOLNorm(bb, DIM, proj_hidden_dim=256, proj_dim=DIM, pred_hidden_dim=256,
                 pred_norm=case.get("pred", "BN"), head_bn=case.get("head_bn", True),
                 ema_momentum=0.99 if tau is None else tau, ema_final_momentum=1.0 if tau is None else tau)
    if case.get("no_predictor"):
        m.predictor = nn.Identity()
    return m


def _online(m: nn.Module) -> nn.Module:
    """backbone -> projector of either method."""
    return m.online if hasattr(m, "online") else nn.Sequential(m.backbone, m.projector)


def _measure(source, m):
    z = I.features(_online(m), source)[0]
    r = I.features(m.backbone, source)[0]
    s = float(dg.normalized_std(z).mean()) * math.sqrt(z.shape[1])
    return {"std_sqrt_d": s, "effective_rank_r": float(dg.effective_rank(dg.covariance_spectrum(r).sqrt())),
            "knn": I.evaluate(m.backbone, source, probe=False)["knn"]}


def _state(s: float) -> str:
    return "collapsed" if s < COLLAPSED else ("healthy" if s > HEALTHY else "partial")


NB = "BYOL, no BN in the projector"
EMA_GROUP = "BYOL, EMA momentum (constant)"


def cases(quick: bool):
    out = [
        ("SimSiam", "stop-gradient", dict(method="SimSiam")),
        ("SimSiam", "no stop-gradient", dict(method="SimSiam", stop_grad=False)),
        ("BYOL", "predictor (BN)", dict(method="BYOL")),
        ("BYOL", "no predictor", dict(method="BYOL", no_predictor=True)),
    ] + [(NB, f"predictor norm: {p}", dict(method="BYOL", pred=p, head_bn=False)) for p in PRED_NORMS
         if not (quick and p == "none")]  # "none" is reported, not tested
    out += [(EMA_GROUP, f"m = {t}", dict(method="BYOL", tau=t)) for t in (EMA_SWEEP if not quick else ())]
    return out


_HEALTHY_TEXT = "{} stays healthy (effect: std x sqrt(d) minus the healthy threshold {})"
_COLLAPSED_TEXT = "{} collapses (effect: the collapse threshold {} minus std x sqrt(d))"
# claim key -> (case in the numbers, healthy?, what)
_CASES = {
    "simsiam-stop-grad-healthy": ("SimSiam / stop-gradient", True, "SimSiam with the stop-gradient"),
    "simsiam-no-stop-grad-collapsed": ("SimSiam / no stop-gradient", False, "SimSiam without the stop-gradient"),
    "byol-healthy": ("BYOL / predictor (BN)", True, "BYOL"),
    "byol-no-predictor-collapsed": ("BYOL / no predictor", False, "BYOL without the predictor"),
    "predictor-bn-healthy": (f"{NB} / predictor norm: BN", True, "BYOL (no BN in the projector) with BN in the "
                                                                "predictor"),
    "predictor-centering-healthy": (f"{NB} / predictor norm: centering", True,
                                    "BYOL (no BN in the projector) with centering x - mean(x) in the predictor"),
    "predictor-detached-centering-collapsed": (f"{NB} / predictor norm: centering, detached mean", False,
                                               "BYOL (no BN in the projector) with centering x - mean(x).detach() "
                                               "in the predictor"),
}
# Each claim's noise per budget: the standard deviation of its effect over seeds x 1 and 2 threads, rounded up
# to one significant digit; measured by `python -m ssl_fast.lab.margins` (docs/lab/margins.md). The full budget
# is measured only by the committed run (seeds 0-2, one thread): its noise is the larger of the quick one and
# that run's spread, and a claim is asserted there where it is asserted at the quick budget.
NOISE = {"simsiam-stop-grad-healthy": 0.04, "simsiam-no-stop-grad-collapsed": 0.003, "byol-healthy": 0.05,
         "byol-no-predictor-collapsed": 0.03, "predictor-bn-healthy": 0.07, "predictor-centering-healthy": 0.06,
         "predictor-detached-centering-collapsed": 0.009, "byol-no-predictor-drop": 0.05}
FULL_NOISE = {"byol-no-predictor-collapsed": 0.04}
# not asserted: the absolute collapse of BYOL without its predictor is within the noise of the threshold at
# both budgets (std x sqrt(d) about 0.1 against 0.15; docs/lab/margins.md); its drop from BYOL's is not
NOT_ASSERTED = {"byol-no-predictor-collapsed"}
CLAIMS = {k: ClaimSpec(k, (_HEALTHY_TEXT if ok else _COLLAPSED_TEXT).format(what, HEALTHY if ok else COLLAPSED),
                       "std x sqrt(d)", {"quick": NOISE[k], "full": FULL_NOISE.get(k, NOISE[k])},
                       asserted=() if k in NOT_ASSERTED else ("quick", "full"))
          for k, (_, ok, what) in _CASES.items()}
CLAIMS["byol-no-predictor-drop"] = ClaimSpec(
    "byol-no-predictor-drop", "removing BYOL's predictor drops the output's spread (effect: std x sqrt(d) of BYOL "
                              "minus that of BYOL without the predictor, same seed)", "std x sqrt(d)",
    {"quick": NOISE["byol-no-predictor-drop"], "full": FULL_NOISE.get("byol-no-predictor-drop",
                                                                      NOISE["byol-no-predictor-drop"])})


def claims(numbers: dict, quick: bool) -> list:
    """The experiment's claims from its numbers (std x sqrt(d) of each case on each seed)."""
    out = []
    for key, (case, ok, _) in _CASES.items():
        v = numbers[case]["std_sqrt_d"]
        out.append(CLAIMS[key].measure([x - HEALTHY if ok else COLLAPSED - x for x in v], numbers["seeds"], quick))
    drop = [a - b for a, b in zip(numbers["BYOL / predictor (BN)"]["std_sqrt_d"],
                                  numbers["BYOL / no predictor"]["std_sqrt_d"])]
    out.insert(4, CLAIMS["byol-no-predictor-drop"].measure(drop, numbers["seeds"], quick))
    return out


def run(out: str, *, quick: bool = False, seed: int = 0) -> LabResult:
    d = out_dir(out, NAME)
    steps = 300 if quick else 400
    seeds = I.seeds(seed, quick, full=3, fast=1)
    source = I.data(0)
    rep = MarkdownReport("Lab: non-contrastive collapse (SimSiam, BYOL)", d)
    rep.paragraph(__doc__.split("\n", 2)[2])
    todo = cases(quick)
    res = {(g, lab): {"std_sqrt_d": [], "effective_rank_r": [], "knn": [], "loss": []} for g, lab, _ in todo}
    seed_rows = []
    init = {"std_sqrt_d": [], "effective_rank_r": [], "knn": []}
    for sd in seeds:
        mi = _measure(source, build(dict(method="BYOL"), sd))
        for k in init:
            init[k].append(mi[k])
        for group, label, kw in todo:
            m = build(kw, sd)
            loss = I.train(m, source, steps=steps, seed=sd, batch=BATCH, lr=LR)
            mm = _measure(source, m)
            mm["loss"] = loss
            for k, v in mm.items():
                res[(group, label)][k].append(v)
            seed_rows.append([sd, group, label, loss, mm["std_sqrt_d"], _state(mm["std_sqrt_d"]),
                              mm["effective_rank_r"], mm["knn"]])
    rows = [["(random init)", "-", "-", I.pm(init["std_sqrt_d"]), _state(I.stats(init["std_sqrt_d"])["mean"]),
             I.pm(init["effective_rank_r"]), I.pm(init["knn"])]]
    for (g, lab), m in res.items():
        rows.append([g, lab, I.pm(m["loss"]), I.pm(m["std_sqrt_d"]),
                     "/".join(sorted({_state(v) for v in m["std_sqrt_d"]})), I.pm(m["effective_rank_r"]),
                     I.pm(m["knn"])])
    rep.heading(f"Runs ({steps} steps, seeds {', '.join(map(str, seeds))})")
    rep.paragraph("Mean ± std over the seeds (min..max); state: every state a seed reached.")
    rep.table(["model", "variant", "final loss", "std x sqrt(d)", "state", "effective rank of r (singular values)",
               "kNN acc of r"], rows)
    rep.heading("Per seed")
    rep.table(["seed", "model", "variant", "final loss", "std x sqrt(d)", "state", "effective rank of r",
               "kNN acc of r"], seed_rows)
    rep.paragraph("The kNN accuracy of r can stay high where the projector output has collapsed: the weighted "
                  "cosine kNN is scale-free and still reads the small residual variation of r; the std and the "
                  "effective rank are the collapse indicators.")
    short = {"SimSiam": "SimSiam", "BYOL": "BYOL", NB: "BYOL no-BN proj", EMA_GROUP: "BYOL"}
    rep.image(plots.plot_bars({f"{short[g]}: {lab.replace('predictor norm: ', 'pred ')}":
                               I.stats(m["std_sqrt_d"])["mean"] for (g, lab), m in res.items()},
                              f"{d}/std.png", title="normalized-output std x sqrt(d), mean over seeds "
                                                    "(1 healthy, 0 collapsed)"),
              "std per variant")
    numbers = {f"{g} / {lab}": m for (g, lab), m in res.items()}
    numbers.update({"seeds": seeds, "steps": steps, "random_init": init})
    cl = claims(numbers, quick)
    s = {k: v["std_sqrt_d"] for k, v in res.items()}
    none_key = (NB, "predictor norm: none")
    none_txt = (f", none {f(I.stats(s[none_key])['mean'])} ({'/'.join(sorted({_state(v) for v in s[none_key]}))})"
                if none_key in s else "")

    def mean(key):
        return f(I.stats(s[key])["mean"])

    line = (f"std x sqrt(d), mean over {len(seeds)} seed(s): SimSiam {mean(('SimSiam', 'stop-gradient'))} vs no "
            f"stop-grad {mean(('SimSiam', 'no stop-gradient'))}; BYOL {mean(('BYOL', 'predictor (BN)'))} vs no "
            f"predictor {mean(('BYOL', 'no predictor'))}; predictor BN {mean((NB, 'predictor norm: BN'))}, "
            f"centering {mean((NB, 'predictor norm: centering'))}, detached mean "
            f"{mean((NB, 'predictor norm: centering, detached mean'))}{none_txt}")
    if not quick:
        ema = {t: res[(EMA_GROUP, f"m = {t}")] for t in EMA_SWEEP}
        rep.heading("EMA momentum")
        rep.table(["momentum m (constant)", "std x sqrt(d)", "kNN acc of r", "effective rank of r", "final loss"],
                  [[t, I.pm(v["std_sqrt_d"]), I.pm(v["knn"]), I.pm(v["effective_rank_r"]), I.pm(v["loss"])]
                   for t, v in ema.items()])
        rep.paragraph("Reported, not part of the verdict. m = 0: the target is the online network itself "
                      "(without its gradient), SimSiam with BYOL's heads; the main BYOL runs use 0.99 -> 1 "
                      "(cosine).")
        line += "; EMA m " + ", ".join(f"{t}: std {f(I.stats(v['std_sqrt_d'])['mean'])} kNN "
                                          f"{I.stats(v['knn'])['mean']:.3f}" for t, v in ema.items())
    return conclude(NAME, FINDING, rep, cl, line, quick, numbers)
