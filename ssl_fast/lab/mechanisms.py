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

Both parts run on the seeds ``seed, seed + 1`` (quick) or ``seed .. seed + 2`` (full); each seed sets the
initialization and the data. Collapse thresholds (stated in the report): a singular value is "collapsed" below
1e-2 of the largest.
"""

from __future__ import annotations

import math

import torch

import ssl_fast
from ssl_fast import diagnostics as dg
from ssl_fast.diagnostics import MarkdownReport, plots

from ._common import ClaimSpec, LabResult, conclude, f, out_dir

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


def _decades(x: float, y: float) -> float:
    """log10(x / y), -inf / inf at the ends (a singular value of exactly 0 is infinitely collapsed)."""
    if x <= 0:
        return -math.inf
    if y <= 0:
        return math.inf
    return math.log10(x / y)


# Each claim's noise per budget: the standard deviation of its effect over seeds x 1 and 2 threads, rounded up
# to one significant digit; measured by `python -m ssl_fast.lab.margins` (docs/lab/margins.md).
NOISE = {"a-six-collapsed": {"quick": 0.004, "full": 0.002}, "a-along-strong-directions": {"quick": 0.06, "full": 0.02},
         "b-one-layer-healthy": {"quick": 0.008, "full": 0.008}, "b-two-layers-collapse": {"quick": 0.7, "full": 0.7}}
CLAIMS = {c.key: c for c in (
    ClaimSpec("a-six-collapsed", f"(a) exactly the {N_STRONG} strongly augmented directions' singular values of W "
              f"collapse (effect: how far, in decades, the {N_DIM - N_STRONG}th and {N_DIM - N_STRONG + 1}th "
              f"singular values / largest sit on either side of {COLLAPSED}, the nearer one)", "decades",
              NOISE["a-six-collapsed"]),
    ClaimSpec("a-along-strong-directions", f"(a) W collapses along the strongly augmented directions (effect: "
              f"log10({NORM_RATIO} / the norm ratio of W on strong vs weak directions))", "decades",
              NOISE["a-along-strong-directions"]),
    ClaimSpec("b-one-layer-healthy", f"(b) one layer keeps every direction (effect: log10(smallest singular value "
              f"/ largest / {HEALTHY}))", "decades", NOISE["b-one-layer-healthy"]),
    ClaimSpec("b-two-layers-collapse", "(b) two layers collapse a direction that one layer keeps (effect: log10 of "
              "the one-layer smallest singular value / largest over the two-layer one, same seed)", "decades",
              NOISE["b-two-layers-collapse"], asserted=()),  # its spread: mean 4.9 x noise at quick, 5.3 x full
)}


def claims(numbers: dict, quick: bool) -> list:
    """The experiment's claims from its numbers (the per-seed relative singular values)."""
    seeds, k = numbers["seeds"], N_DIM - N_STRONG
    a = numbers["a_rel_sv"]
    return [
        CLAIMS["a-six-collapsed"].measure(
            [min(_decades(r[k - 1], COLLAPSED), _decades(COLLAPSED, r[k])) for r in a], seeds, quick),
        CLAIMS["a-along-strong-directions"].measure([_decades(NORM_RATIO, x) for x in numbers["a_norm_ratio"]],
                                                    seeds, quick),
        CLAIMS["b-one-layer-healthy"].measure([_decades(x, HEALTHY) for x in numbers["b_one_layer_min_rel_sv"]],
                                              seeds, quick),
        CLAIMS["b-two-layers-collapse"].measure(
            [_decades(one, two) for one, two in zip(numbers["b_one_layer_min_rel_sv"],
                                                    numbers["b_two_layer_min_rel_sv"])], seeds, quick),
    ]


def run(out: str, *, quick: bool = False, seed: int = 0) -> LabResult:
    """Run both parts; write ``<out>/mechanisms/report.md`` and PNGs. Returns the :class:`LabResult`."""
    d = out_dir(out, NAME)
    steps_a = 600 if quick else 2000
    steps_b = 500 if quick else 1500
    seeds = [seed, seed + 1] if quick else [seed, seed + 1, seed + 2]
    rep = MarkdownReport("Lab: mechanisms of dimensional collapse (linear networks, synthetic data)", d)
    rep.paragraph(__doc__.split("\n", 2)[2].split("Both parts run")[0])

    # (a) strong augmentation along 6 of 16 directions, one-layer network
    aug = torch.full((N_DIM,), 0.5)
    aug[N_DIM - N_STRONG:] = 2.0
    rows_a, rel_a, ratio_a, ncoll_a = [], [], [], []
    for s in seeds:
        w, loss_a, hist = _train(aug, 1, steps_a, s, 1.0, record_every=max(steps_a // 20, 1))
        sv = dg.weight_spectrum(w)
        rel = sv / sv[0]
        n_coll = int((rel < COLLAPSED).sum())
        ratio = float(w[:, N_DIM - N_STRONG:].norm()) / float(w[:, : N_DIM - N_STRONG].norm())
        rel_a.append(rel.tolist())
        ratio_a.append(ratio)
        ncoll_a.append(n_coll)
        rows_a.append([s, loss_a, ", ".join(f(v, 2) for v in rel.tolist()), n_coll, ratio,
                       float(dg.effective_rank(_embedding_spectrum(w, s)))])
        if s == seeds[0]:
            steps_h = [t for t, _ in hist]
            curves = {"weak directions (aug var 0.25 < 1)": [float(h[:, : N_DIM - N_STRONG].norm()) for _, h in hist],
                      "strong directions (aug var 4 > 1)": [float(h[:, N_DIM - N_STRONG:].norm()) for _, h in hist]}
    rep.heading(f"(a) Augmentation stronger than the data along {N_STRONG} directions ({steps_a} steps)")
    rep.table(["seed", "final loss", "singular values of W / largest",
               f"collapsed singular values (< {COLLAPSED} of the largest; expected {N_STRONG})",
               "||W on strong dirs|| / ||W on weak dirs||", "effective rank of the embedding covariance"], rows_a)
    rep.image(plots.plot_curves(curves, f"{d}/a_weight_norms.png", x=steps_h, logy=True,
                                title=f"(a) ||W P|| over training (seed {seeds[0]})", ylabel="Frobenius norm"),
              "(a) weight norms")

    # (b) augmentation weaker than the data everywhere: one layer vs two layers
    aug_b = torch.full((N_DIM,), 0.5)
    rows, spectra, min1, min2, ncoll2 = [], {}, [], [], []
    for s in seeds:
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
            if s == seeds[0]:
                spectra[f"{layers}-layer"] = spec
    rep.heading(f"(b) Augmentation weaker than the data everywhere: one layer vs two layers ({steps_b} steps)")
    rep.table(["seed", "layers", "final loss", "smallest sv / largest", f"collapsed (< {COLLAPSED})",
               "effective rank (of 16)"], rows)
    rep.image(plots.plot_spectra(spectra, f"{d}/b_spectra.png",
                                 title=f"(b) embedding covariance spectrum, weak augmentation (seed {seeds[0]})"),
              "(b) spectra")

    numbers = {"seeds": seeds, "steps": [steps_a, steps_b], "a_rel_sv": rel_a, "a_norm_ratio": ratio_a,
               "a_collapsed": ncoll_a, "b_one_layer_min_rel_sv": min1, "b_two_layer_min_rel_sv": min2,
               "b_two_layer_collapsed": ncoll2}
    cl = claims(numbers, quick)
    line = (f"over {len(seeds)} seeds: (a) collapsed singular values {', '.join(map(str, ncoll_a))} (expected "
            f"{N_STRONG}), norm ratio <= {f(max(ratio_a))}; (b) one-layer smallest sv/largest >= {f(min(min1))}, "
            f"two-layer <= {f(max(min2))} with {min(ncoll2)}-{max(ncoll2)} collapsed")
    return conclude(NAME, FINDING, rep, cl, line, quick, numbers)
