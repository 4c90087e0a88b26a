"""``ssl-fast lab projector``: the projector prevents dimensional collapse of the representation (DirectCLR).

Jing, Vincent, LeCun, Tian (2022): SimCLR trained with the loss directly on the representation r collapses
dimensionally (the tail of r's covariance spectrum drops); an MLP or a linear projector prevents it, and so
does DirectCLR (no projector, the loss on the sub-vector r[:, :d0]). Ablations of the paper: a fixed low-rank
projector (d0 singular values 1, the rest 0, random singular vectors) and a trainable diagonal projector also
work; a linear probe on the sub-vector r[:, :d0] alone is worse than on the whole r.

Here: digits (16 x 16), an MLP encoder with a residual last block (r of dimension 64), d0 = 16, NT-Xent
(``ssl_fast.ntxent``, T = 0.2; DirectCLR through its ``feature_dim``), batch 256, Adam lr 1e-3 (the diagonal
projector also with its own lr 3e-2: at 1e-3 it barely leaves the identity), the same seed and views for every
variant. Spectrum: eigenvalues of the covariance of r on the held-out split.

"Rank at 1e-3" = number of eigenvalues above 1e-3 of the largest: the dimensions the representation uses.
"""

from __future__ import annotations


import torch
from torch import nn

import ssl_fast
from ssl_fast import diagnostics as dg
from ssl_fast.diagnostics import plots
from ssl_fast.diagnostics.report import MarkdownReport

from . import _digits as D
from ._common import LabResult, out_dir

NAME = "projector"
FINDING = ("SimCLR without a projector collapses the representation's spectrum; a linear or MLP projector and "
           "DirectCLR prevent it (ablations: fixed low-rank and diagonal projectors, sub-vector probe)")
DIM, D0, T, LR, BATCH = 64, 16, 0.2, 1e-3, 256
REL = 1e-3
MARGIN = 1.2  # a variant "prevents collapse" when its rank at 1e-3 is >= MARGIN x the no-projector rank


class Diagonal(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, r):
        return r * self.scale


def fixed_low_rank(d: int, d0: int, g: torch.Generator) -> nn.Linear:
    """A frozen d x d projector with d0 singular values 1 and the rest 0, random singular vectors."""
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    s = torch.zeros(d)
    s[:d0] = 1
    lin = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        lin.weight.copy_(u @ torch.diag(s) @ v.T)
    lin.weight.requires_grad_(False)
    return lin


VARIANTS = {
    "no projector": lambda g: nn.Identity(),
    "linear projector": lambda g: nn.Linear(DIM, DIM),
    "MLP projector": lambda g: D.mlp([DIM, 256, DIM]),
    f"DirectCLR (d0={D0})": lambda g: nn.Identity(),
    "fixed low-rank projector": lambda g: fixed_low_rank(DIM, D0, g),
    "diagonal projector": lambda g: Diagonal(DIM),
    "diagonal projector, lr 3e-2": lambda g: Diagonal(DIM),
}
PROJECTOR_LR = {"diagonal projector, lr 3e-2": 3e-2}  # the rest: the encoder's lr
QUICK = ("no projector", "MLP projector", f"DirectCLR (d0={D0})")


def train_variant(name: str, data: D.Digits, steps: int, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    enc = D.Encoder(dim=DIM)
    proj = VARIANTS[name](torch.Generator().manual_seed(seed + 7))
    groups = [{"params": list(enc.parameters())}]
    head = [p for p in proj.parameters() if p.requires_grad]
    if head:
        groups.append({"params": head, "lr": PROJECTOR_LR.get(name, LR)})
    opt = torch.optim.Adam(groups, lr=LR)
    feature_dim = D0 if name.startswith("DirectCLR") else None
    it = D.batches(data.train_x.shape[0], BATCH, torch.Generator().manual_seed(seed + 1))
    for _ in range(steps):
        x = data.train_x[next(it)]
        z1, z2 = proj(enc(D.augment(x, g))), proj(enc(D.augment(x, g)))
        loss = ssl_fast.ntxent(z1, z2, T, feature_dim=feature_dim)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return enc, float(loss.detach()), proj


def run(out: str, *, quick: bool = False, seed: int = 0) -> LabResult:
    d = out_dir(out, NAME)
    steps = 400 if quick else 1200
    names = QUICK if quick else tuple(VARIANTS)
    data = D.load(seed)
    rep = MarkdownReport("Lab: the projector and dimensional collapse (DirectCLR)", d)
    rep.paragraph(__doc__.split("\n", 2)[2])
    rows, spectra, ranks = [], {}, {}
    torch.manual_seed(seed)
    init = D.Encoder(dim=DIM)
    s_init = dg.covariance_spectrum(D.features(init, data.test_x))
    spectra["random init"] = s_init
    ev0 = D.evaluate(init, data)
    rows.append(["(random init)", float("nan"), int((s_init > REL * s_init[0]).sum()),
                 float(dg.effective_rank(s_init.sqrt())), float(dg.effective_rank(s_init)), ev0["knn"], ev0["probe"]])
    sub_probe = full_probe = diag_note = None
    for name in names:
        enc, loss, proj = train_variant(name, data, steps, seed)
        if isinstance(proj, Diagonal):
            sc = proj.scale.detach().abs()
            diag_note = (diag_note + " " if diag_note else "") + (
                f"The trainable {name} (initialized to ones) ended with |scale| from {float(sc.min()):.3g} to "
                f"{float(sc.max()):.3g}.")

        r = D.features(enc, data.test_x)
        s = dg.covariance_spectrum(r)
        spectra[name] = s
        rank = int((s > REL * s[0]).sum())
        ranks[name] = rank
        ev = D.evaluate(enc, data)
        rows.append([name, loss, rank, float(dg.effective_rank(s.sqrt())), float(dg.effective_rank(s)),
                     ev["knn"], ev["probe"]])
        if name.startswith("DirectCLR"):
            full_probe = ev["probe"]
            sub_probe = D.evaluate(enc, data, sub=D0)["probe"]
    rep.heading(f"Representation spectra ({steps} steps, seed {seed})")
    rep.table(["variant", "final loss", f"rank at {REL} (of {DIM})", "effective rank of singular values",
               "effective rank of eigenvalues", "kNN acc", "linear probe acc"], rows)
    if diag_note:
        rep.paragraph(diag_note)
    if sub_probe is not None:
        rep.paragraph(f"DirectCLR linear probe on r[:, :{D0}] alone: {sub_probe:.4f}; on the whole r: "
                      f"{full_probe:.4f}.")
    rep.image(plots.plot_spectra(spectra, f"{d}/spectra.png", title="covariance spectrum of the representation r"),
              "spectra")
    base = ranks["no projector"]
    prevents = {n: ranks[n] >= MARGIN * base for n in names if n != "no projector"}
    core = [n for n in ("linear projector", "MLP projector", f"DirectCLR (d0={D0})") if n in prevents]
    passed = all(prevents[n] for n in core)
    parts = [f"no projector rank {base}"] + [f"{n} {ranks[n]}" for n in names if n != "no projector"]
    failed = [n for n, ok in prevents.items() if not ok]
    verdict = (f"rank at {REL} of {DIM}: " + ", ".join(parts) + "; "
               + (f"every projector variant exceeds {MARGIN}x the no-projector rank" if not failed
                  else f"NOT above {MARGIN}x the no-projector rank: {', '.join(failed)}"))
    if sub_probe is not None:
        verdict += f"; probe on r[:, :{D0}] {sub_probe:.3f} vs whole r {full_probe:.3f}"
    rep.heading("Verdict")
    rep.paragraph(f"Passes when the linear projector, the MLP projector and DirectCLR each reach a rank at {REL} "
                  f"at least {MARGIN} x that of SimCLR without a projector; the two other ablations and the "
                  f"sub-vector probe are reported in the verdict line.")
    rep.verdict(verdict, passed)
    numbers = {"ranks": ranks, "table": rows, "directclr_sub_probe": sub_probe, "directclr_full_probe": full_probe}
    return LabResult(NAME, FINDING, verdict, passed, numbers, rep.write())
