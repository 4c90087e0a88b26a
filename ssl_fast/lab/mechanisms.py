"""``ssl-fast lab mechanisms``: the two mechanisms of dimensional collapse in contrastive learning.

Jing, Vincent, LeCun, Tian (2022), "Understanding Dimensional Collapse in Contrastive Self-supervised
Learning", on linear networks and synthetic Gaussian data, trained with SimCLR's NT-Xent
(``ssl_fast.ntxent``, l2-normalized embeddings, T = 0.5, batch 256, plain SGD, no weight decay):

(a) strong augmentation: data ``x ~ N(0, I_16)``, views ``x + e``, ``e ~ N(0, diag(s^2))`` with augmentation
    std s = 0.5 along 10 directions (variance 0.25 < 1, the data's) and s = 2 along the other 6 (variance
    4 > 1). A one-layer network ``z = W x``: the weight collapses along the 6 strongly augmented directions,
    i.e. 6 singular values of W (and of the embedding covariance) go to 0.
(b) implicit regularization: the same data with s = 0.5 in every direction (augmentation weaker than the data
    everywhere). ``z = W x`` keeps all 16 directions; ``z = W2 W1 x`` (same initial scale, same steps) ends
    with collapsed singular values of ``W2 W1``: the rich-get-richer dynamics of a product of matrices.

Collapse thresholds (stated in the report): a singular value is "collapsed" below 1e-2 of the largest.
"""

from __future__ import annotations

import torch

import ssl_fast
from ssl_fast import diagnostics as dg
from ssl_fast.diagnostics import plots
from ssl_fast.diagnostics.report import MarkdownReport

from ._common import LabResult, f, out_dir

NAME = "mechanisms"
FINDING = ("strong augmentation collapses the embedding along the directions where it exceeds the data "
           "variance; with weak augmentation a two-layer linear network still collapses, a one-layer one does not")
COLLAPSED = 1e-2  # singular value / largest below this: collapsed
HEALTHY = 0.1     # smallest singular value / largest above this: no collapse
NORM_RATIO = 0.05  # (a): ||W on strong dirs|| / ||W on weak dirs|| below this: collapsed along them
N_DIM, BATCH, TEMPERATURE, LR = 16, 256, 0.5, 0.1
N_STRONG = 6


def _train(aug_std: torch.Tensor, layers: int, steps: int, seed: int, init: float, record_every: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = aug_std.numel()
    ws = [torch.nn.Parameter(torch.randn(n, n, generator=g, dtype=torch.float32) * init / n ** 0.5)
          for _ in range(layers)]
    opt = torch.optim.SGD(ws, lr=LR)
    history = []
    for step in range(steps + 1):
        if record_every and step % record_every == 0:
            with torch.no_grad():
                history.append((step, _product(ws).clone()))
        if step == steps:
            break
        x = torch.randn(BATCH, n, generator=g)
        x1 = x + aug_std * torch.randn(BATCH, n, generator=g)
        x2 = x + aug_std * torch.randn(BATCH, n, generator=g)
        z1, z2 = x1, x2
        for w in ws:
            z1, z2 = z1 @ w.T, z2 @ w.T
        loss = ssl_fast.ntxent(z1, z2, TEMPERATURE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return _product(ws).detach().clone(), float(loss), history


def _product(ws):
    p = ws[0]
    for w in ws[1:]:
        p = w @ p
    return p


def _embedding_spectrum(w: torch.Tensor, seed: int) -> torch.Tensor:
    x = torch.randn(4096, w.shape[1], generator=torch.Generator().manual_seed(seed + 999), dtype=torch.float64)
    return dg.covariance_spectrum(x @ w.to(torch.float64).T)


def run(out: str, *, quick: bool = False, seed: int = 0) -> LabResult:
    """Run both parts; write ``<out>/mechanisms/report.md`` and PNGs. Returns the :class:`LabResult`."""
    d = out_dir(out, NAME)
    steps_a = 600 if quick else 2000
    steps_b = 500 if quick else 1500
    seeds_b = [seed, seed + 1] if quick else [seed, seed + 1, seed + 2]
    rep = MarkdownReport("Lab: mechanisms of dimensional collapse (linear networks, synthetic data)", d)
    rep.paragraph(__doc__.split("\n", 2)[2].split("Collapse thresholds")[0])

    # (a) strong augmentation along 6 of 16 directions, one-layer network
    aug = torch.full((N_DIM,), 0.5)
    aug[N_DIM - N_STRONG:] = 2.0
    w, loss_a, hist = _train(aug, 1, steps_a, seed, 1.0, record_every=max(steps_a // 20, 1))
    sv = dg.weight_spectrum(w)
    rel = sv / sv[0]
    n_coll_a = int((rel < COLLAPSED).sum())
    weak_norm = float(w[:, : N_DIM - N_STRONG].norm())
    strong_norm = float(w[:, N_DIM - N_STRONG:].norm())
    ratio_a = strong_norm / weak_norm
    spec_a = _embedding_spectrum(w, seed)
    ok_a = n_coll_a == N_STRONG and ratio_a < NORM_RATIO
    rep.heading("(a) Augmentation stronger than the data along 6 directions")
    rep.table(["quantity", "value"], [
        ["steps", steps_a], ["final loss", loss_a],
        ["singular values of W / largest", ", ".join(f(v, 2) for v in rel.tolist())],
        [f"collapsed singular values (< {COLLAPSED} of the largest)", n_coll_a],
        ["expected (strongly augmented directions)", N_STRONG],
        ["||W restricted to strong dirs|| / ||W restricted to weak dirs||", ratio_a],
        ["effective rank of the embedding covariance", float(dg.effective_rank(spec_a))],
    ])
    steps_h = [s for s, _ in hist]
    curves = {"weak directions (aug var 0.25 < 1)": [float(h[:, : N_DIM - N_STRONG].norm()) for _, h in hist],
              "strong directions (aug var 4 > 1)": [float(h[:, N_DIM - N_STRONG:].norm()) for _, h in hist]}
    rep.image(plots.plot_curves(curves, f"{d}/a_weight_norms.png", x=steps_h, logy=True,
                                title="(a) ||W P|| over training", ylabel="Frobenius norm"), "(a) weight norms")

    # (b) augmentation weaker than the data everywhere: one layer vs two layers
    aug_b = torch.full((N_DIM,), 0.5)
    rows, spectra, min1, min2, ncoll2 = [], {}, [], [], []
    for s in seeds_b:
        for layers in (1, 2):
            wb, loss_b, _ = _train(aug_b, layers, steps_b, s, 0.1)
            svb = dg.weight_spectrum(wb)
            relb = svb / svb[0]
            spec = _embedding_spectrum(wb, s)
            nc = int((relb < COLLAPSED).sum())
            (min1 if layers == 1 else min2).append(float(relb[-1]))
            if layers == 2:
                ncoll2.append(nc)
            rows.append([s, layers, loss_b, float(relb[-1]), nc, float(dg.effective_rank(spec))])
            if s == seed:
                spectra[f"{layers}-layer"] = spec
    ok_b = min(min1) > HEALTHY and all(nc >= 1 for nc in ncoll2)
    rep.heading("(b) Augmentation weaker than the data everywhere: one layer vs two layers")
    rep.table(["seed", "layers", "final loss", "smallest sv / largest", f"collapsed (< {COLLAPSED})",
               "effective rank (of 16)"], rows)
    rep.image(plots.plot_spectra(spectra, f"{d}/b_spectra.png",
                                 title="(b) embedding covariance spectrum, weak augmentation"), "(b) spectra")

    passed = ok_a and ok_b
    verdict = (f"(a) {n_coll_a}/{N_STRONG} strongly augmented directions collapsed "
               f"(norm ratio {f(ratio_a)}) {'as predicted' if ok_a else 'NOT as predicted'}; "
               f"(b) one-layer smallest sv/largest >= {f(min(min1))}, two-layer <= {f(max(min2))} with "
               f"{min(ncoll2)}-{max(ncoll2)} collapsed: {'reproduced' if ok_b else 'NOT reproduced'}")
    rep.heading("Verdict")
    rep.paragraph(f"Thresholds: (a) passes when exactly {N_STRONG} singular values of W are below {COLLAPSED} "
                  f"of the largest and the strong-direction norm ratio is below {NORM_RATIO}; (b) passes when "
                  f"the one-layer network's smallest singular value stays above {HEALTHY} of the largest and the "
                  f"two-layer product has at least one below {COLLAPSED}, for every seed.")
    rep.verdict(verdict, passed)
    numbers = {"a_collapsed": n_coll_a, "a_norm_ratio": ratio_a, "b_one_layer_min_rel_sv": min(min1),
               "b_two_layer_max_min_rel_sv": max(min2), "b_two_layer_collapsed": ncoll2,
               "a_effective_rank": float(dg.effective_rank(spec_a))}
    return LabResult(NAME, FINDING, verdict, passed, numbers, rep.write())
