"""``ssl-fast lab swav``: SwAV's equal-partition constraint prevents collapse onto few prototypes.

Caron et al. (2020): the codes q of a batch come from Sinkhorn-Knopp (an entropic optimal transport with
equal prototype marginals, eps 0.05, 3 sweeps); the swapped-prediction loss trains the encoder and the
prototypes to predict one view's code from the other view. Replacing Sinkhorn by a plain softmax of the
scores (the same eps) drops the equal-partition constraint and the assignments collapse onto a few
prototypes: a trivial solution where every sample predicts the same code perfectly.

Set-up: digits (16 x 16), MLP encoder (64) + MLP projector (32, l2-normalized), K = 30 l2-normalized prototypes,
temperature 0.1, batch 256, Adam lr 1e-3; codes from ``ssl_fast.sinkhorn_knopp`` (a local log-domain
Sinkhorn when the package has none) or ``softmax(scores / eps)``; same seed and views for both.

Measured on the held-out split: prototypes used (distinct argmax assignments), the perplexity of the mean
assignment (K if every prototype gets equal mass, 1 if one prototype takes all), the normalized-output std.
Collapse: perplexity below K / 5 = 6 prototypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import ssl_fast
from ssl_fast import diagnostics as dg
from ssl_fast.diagnostics import plots
from ssl_fast.diagnostics.report import MarkdownReport

from . import _digits as D
from ._common import LabResult, f, out_dir

NAME = "swav"
FINDING = "SwAV without the equal-partition constraint (softmax codes) collapses onto few prototypes; Sinkhorn does not"
DIM, OUT, K, TEMP, EPS, LR, BATCH = 64, 32, 30, 0.1, 0.05, 1e-3, 256
COLLAPSE_PERPLEXITY = K / 5


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = EPS, iterations: int = 3) -> torch.Tensor:
    """Equal-partition codes (B, K), rows summing to 1: ``ssl_fast.sinkhorn_knopp`` when the package has it."""
    fn = getattr(ssl_fast, "sinkhorn_knopp", None)
    if fn is not None:
        return fn(scores, epsilon=eps, iterations=iterations)
    b, k = scores.shape  # SwAV's distributed_sinkhorn, in the log domain
    logq = scores.double() / eps
    logq = logq - torch.logsumexp(logq.flatten(), 0)
    for _ in range(iterations):
        logq = logq - torch.logsumexp(logq, dim=0, keepdim=True) - math.log(k)
        logq = logq - torch.logsumexp(logq, dim=1, keepdim=True) - math.log(b)
    return (logq + math.log(b)).exp().to(scores.dtype)


def train(data, *, codes: str, steps: int, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    enc = D.Encoder(dim=DIM)
    proj = D.mlp([DIM, 128, OUT])
    protos = nn.Linear(OUT, K, bias=False)
    with torch.no_grad():
        protos.weight.copy_(F.normalize(protos.weight, dim=1))
    opt = torch.optim.Adam(list(enc.parameters()) + list(proj.parameters()) + list(protos.parameters()), lr=LR)
    it = D.batches(data.train_x.shape[0], BATCH, torch.Generator().manual_seed(seed + 1))
    for _ in range(steps):
        x = data.train_x[next(it)]
        z1 = F.normalize(proj(enc(D.augment(x, g))), dim=1)
        z2 = F.normalize(proj(enc(D.augment(x, g))), dim=1)
        s1, s2 = protos(z1), protos(z2)
        with torch.no_grad():
            if codes == "Sinkhorn":
                q1, q2 = sinkhorn(s1.detach()), sinkhorn(s2.detach())
            else:
                q1, q2 = F.softmax(s1.detach() / EPS, dim=1), F.softmax(s2.detach() / EPS, dim=1)
        loss = -0.5 * ((q2 * F.log_softmax(s1 / TEMP, dim=1)).sum(1).mean()
                       + (q1 * F.log_softmax(s2 / TEMP, dim=1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            protos.weight.copy_(F.normalize(protos.weight, dim=1))
    model = nn.Sequential(enc, proj)
    return model, protos, enc, float(loss.detach())


def _measure(data, model, protos, enc):
    z = F.normalize(D.features(model, data.test_x), dim=1)
    with torch.no_grad():
        p = F.softmax(protos(z) / TEMP, dim=1).double()
    marg = p.mean(0)
    perplexity = float(torch.exp(-(marg * marg.clamp_min(1e-300).log()).sum()))
    used = int(p.argmax(1).unique().numel())
    counts = torch.bincount(p.argmax(1), minlength=K).sort(descending=True).values
    return {"perplexity": perplexity, "used": used, "top_share": float(counts[0]) / z.shape[0],
            "std_sqrt_d": float(dg.normalized_std(z).mean()) * math.sqrt(z.shape[1]),
            "knn": D.evaluate(enc, data, probe=False)["knn"], "counts": counts}


def run(out: str, *, quick: bool = False, seed: int = 0) -> LabResult:
    d = out_dir(out, NAME)
    steps = 300 if quick else 800
    data = D.load(seed)
    rep = MarkdownReport("Lab: SwAV with and without the equal-partition constraint", d)
    rep.paragraph(__doc__.split("\n", 2)[2])
    source = "ssl_fast.sinkhorn_knopp" if hasattr(ssl_fast, "sinkhorn_knopp") else "the local log-domain Sinkhorn"
    rep.paragraph(f"Sinkhorn codes from {source}.")
    res = {}
    for codes in ("Sinkhorn", "softmax"):
        model, protos, enc, loss = train(data, codes=codes, steps=steps, seed=seed)
        m = _measure(data, model, protos, enc)
        m["loss"] = loss
        res[codes] = m
    rep.heading(f"Runs ({steps} steps, seed {seed}, K = {K})")
    rep.table(["codes", "final loss", "prototypes used", "assignment perplexity", "largest prototype's share",
               "std x sqrt(d)", "kNN acc of r"],
              [[c, m["loss"], m["used"], m["perplexity"], m["top_share"], m["std_sqrt_d"], m["knn"]]
               for c, m in res.items()])
    rep.image(plots.plot_curves({c: (m["counts"].double() / m["counts"].sum()).tolist() for c, m in res.items()},
                                f"{d}/prototype_mass.png", xlabel="prototype (sorted by mass)",
                                ylabel="share of held-out samples", title="assignment histogram"),
              "prototype mass")
    sk, sm = res["Sinkhorn"], res["softmax"]
    passed = sk["perplexity"] >= COLLAPSE_PERPLEXITY and sm["perplexity"] < COLLAPSE_PERPLEXITY
    verdict = (f"assignment perplexity (of {K}): Sinkhorn {f(sk['perplexity'])} ({sk['used']} prototypes used), "
               f"softmax {f(sm['perplexity'])} ({sm['used']} used, largest takes {sm['top_share']:.0%}): "
               + ("collapse without equal partition reproduced" if passed else "NOT reproduced"))
    rep.heading("Verdict")
    rep.paragraph(f"Passes when the Sinkhorn run's perplexity is at least {COLLAPSE_PERPLEXITY:g} and the softmax "
                  f"run's is below it.")
    rep.verdict(verdict, passed)
    numbers = {c: {k: v for k, v in m.items() if k != "counts"} for c, m in res.items()}
    return LabResult(NAME, FINDING, verdict, passed, numbers, rep.write())
