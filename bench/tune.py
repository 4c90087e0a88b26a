"""The Triton tile sweep: each kernel family's launch configurations at the GPU target shapes, one by one.

    python bench/tune.py --out DIR                     # CUDA: every family, every target shape
    python bench/tune.py --out DIR --families infonce_fwd ema --time-budget-s 200
    python bench/tune.py --out DIR --smoke             # no GPU: the Triton interpreter at tiny shapes (the code
                                                       # path and the CSV, not timings)

Families (kernels/tuning.py names the launchers and the keys each one takes):

    infonce_fwd   NT-Xent forward, bf16, 2N = 65536 x D = 256 and 2N = 16384 x D = 128
    infonce_bwd   NT-Xent backward alone (an untimed forward before each call), the same shapes
    infonce_rect  InfoNCE against a 65536-entry queue, N = 256, D = 128, bf16, forward + backward
    sinkhorn      Sinkhorn-Knopp codes, fp32, B = 32768 and 4096, K = 3000, 3 sweeps
    ema           EMA update of the ViT-B/16 parameters, fp32 teacher of a bf16 student

Each family's first configuration is the heuristic table's own (``{}``: no override); the others replace some
of its keys through ``SSL_FAST_TRITON_CONFIG`` for one launch sequence. For every configuration: the first
call (Triton compiles it) timed apart, the answer compared with the table configuration's answer (a
configuration whose answer differs beyond the tolerance is ``wrong`` and not timed), then the median of
``triton.testing.do_bench``. Each row is appended to ``<out>/tune.csv`` as soon as it is measured;
``--time-budget-s`` stops the sweep (the rest are ``skipped`` rows). The summary printed at the end gives per
(family, shape) the table's time, the best configuration and its speedup.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

if "--smoke" in sys.argv:  # before anything imports triton: the interpreter runs the kernels on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ops  # noqa: E402
import report  # noqa: E402

NAN = float("nan")
ENV = "SSL_FAST_TRITON_CONFIG"
COLS = ["timestamp", "commit", "device_name", "torch", "triton", "family", "shape", "dtype", "config", "resolved",
        "status", "first_call_s", "median_ms", "iqr_ms", "speedup_vs_table", "err_vs_table", "note"]


# ----------------------------------------------------------------------------------------------------
# families: inputs, the timed call, the answer compared across configurations, the candidate overrides


def _bwd_variants(d: int) -> List[Dict]:
    dp = max(16, 1 << (d - 1).bit_length())
    if dp <= 128:  # the table: 128 x 64, K = D-chunk = d' (X_I resident, SINGLE), 8 warps, 2 stages
        return [dict(BLOCK_M=64), dict(BLOCK_N=32), dict(BLOCK_N=128), dict(num_stages=1), dict(num_stages=3),
                dict(num_warps=4), dict(BLOCK_M=64, BLOCK_N=128, num_warps=4),
                dict(SINGLE=False, BLOCK_K=64), dict(SINGLE=False, BLOCK_K=32, BLOCK_D=64)]
    # the table: 64 x 64, K 64, D-chunk 256, 8 warps, 2 stages
    return [dict(BLOCK_D=128), dict(BLOCK_N=32), dict(BLOCK_N=128), dict(BLOCK_M=128, BLOCK_D=128),
            dict(BLOCK_K=32), dict(BLOCK_K=128), dict(num_stages=3), dict(num_warps=4, BLOCK_D=128),
            dict(BLOCK_M=128, BLOCK_N=32, BLOCK_D=128)]


FWD_VARIANTS = [dict(num_stages=4), dict(num_stages=2), dict(BLOCK_K=128), dict(BLOCK_K=32), dict(num_warps=4),
                dict(BLOCK=64, num_warps=4), dict(BLOCK=64, num_warps=4, num_stages=4),
                dict(BLOCK=64, BLOCK_K=128, num_warps=4), dict(BLOCK=128, BLOCK_K=128, num_stages=2)]
RECT_VARIANTS = [dict(BLOCK_M=16), dict(BLOCK_M=32), dict(BLOCK_M=16, BLOCK_N=128), dict(BLOCK_N=128),
                 dict(BLOCK_N=32), dict(num_warps=8), dict(bwd_warps=4), dict(BLOCK_K=32), dict(BLOCK_K=128),
                 dict(BLOCK_D=64)]
SINKHORN_VARIANTS = [dict(BLOCK_B=1), dict(BLOCK_B=4), dict(num_warps=4), dict(num_warps=16),
                     dict(BLOCK_B=1, num_warps=4), dict(BLOCK_B=4, num_warps=16)]
EMA_VARIANTS = [dict(CHUNK=8192), dict(CHUNK=32768), dict(CHUNK=65536), dict(BLOCK=1024), dict(BLOCK=4096),
                dict(num_warps=4), dict(num_warps=16), dict(CHUNK=32768, BLOCK=4096),
                dict(CHUNK=65536, BLOCK=4096, num_warps=16)]


def _families(smoke: bool) -> List[Dict]:
    """[{family, shape label, dtype, setup(device) -> state, variants, resolved(state) -> dict}]; setup's state
    has run (timed), prep (None or untimed before each run), answer() -> list of tensors."""
    import torch

    import ssl_fast
    from ssl_fast.kernels import ema as ke
    from ssl_fast.kernels import infonce as ki
    from ssl_fast.kernels import infonce_rect as kr
    from ssl_fast.kernels import sinkhorn as ks

    bf16 = torch.bfloat16

    def pair(n, d, dtype, device, grad):
        g = torch.Generator(device="cpu").manual_seed(0)
        return [torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(grad) for _ in range(2)]

    def ntxent_fwd(n2, d):
        def setup(device):
            z1, z2 = pair(n2 // 2, d, bf16, device, False)
            run = lambda: ssl_fast.ntxent(z1, z2, 0.5)  # noqa: E731
            return dict(run=run, prep=None, answer=lambda: [run().float()])
        return setup

    def ntxent_bwd(n2, d):
        def setup(device):
            z1, z2 = pair(n2 // 2, d, bf16, device, True)
            held = {}

            def prep():
                z1.grad = z2.grad = None
                held["loss"] = ssl_fast.ntxent(z1, z2, 0.5)

            def answer():
                prep()
                held.pop("loss").backward()
                return [z1.grad.float(), z2.grad.float()]
            return dict(run=lambda: held.pop("loss").backward(), prep=prep, answer=answer)
        return setup

    def queue(n, k, d):
        def setup(device):
            q, key = pair(n, d, bf16, device, True)
            g = torch.Generator(device="cpu").manual_seed(1)
            neg = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1).to(device=device, dtype=bf16)

            def run():
                q.grad = key.grad = None
                loss = ssl_fast.info_nce(q, key, 0.2, negatives=neg)
                loss.backward()
                return loss

            def answer():
                loss = run()
                return [loss.detach().float(), q.grad.float(), key.grad.float()]
            return dict(run=run, prep=None, answer=answer)
        return setup

    def sinkhorn(b, k):
        def setup(device):
            g = torch.Generator(device="cpu").manual_seed(0)
            z = torch.nn.functional.normalize(torch.randn(b, 128, generator=g), dim=1)
            c = torch.nn.functional.normalize(torch.randn(k, 128, generator=g), dim=1)
            x = (z @ c.t()).to(device)
            run = lambda: ssl_fast.sinkhorn_knopp(x, 0.05, 3)  # noqa: E731
            return dict(run=run, prep=None, answer=lambda: [run()])
        return setup

    def ema(model):
        def setup(device):
            shapes = ops.param_shapes(model)
            g = torch.Generator(device="cpu").manual_seed(0)
            start = [torch.randn(sh, generator=g) for sh in shapes]
            online = [torch.randn(sh, generator=g).to(device=device, dtype=bf16) for sh in shapes]
            teacher = [t.to(device, copy=True) for t in start]

            def answer():  # one update from the same start
                out = [t.to(device, copy=True) for t in start]
                ssl_fast.ema_update_(out, online, 0.996)
                return out
            return dict(run=lambda: ssl_fast.ema_update_(teacher, online, 0.996), prep=None, answer=answer)
        return setup

    fams = []  # every call runs under ssl_fast.set_backend("triton") (see sweep)
    if smoke:  # tiny shapes for the interpreter; the kernels see the same override keys
        nt = [(64, 32)]
        qs, sk, em = [(8, 64, 32)], [(16, 30)], ["tiny"]
    else:
        nt = [(65536, 256), (16384, 128)]
        qs, sk, em = [(256, 65536, 128)], [(32768, 3000), (4096, 3000)], ["vit_b_16"]
    for n2, d in nt:
        fams.append(dict(family="infonce_fwd", shape=f"n2={n2} dim={d}", dtype="bf16", setup=ntxent_fwd(n2, d),
                         variants=FWD_VARIANTS, resolved=lambda n2=n2, d=d: ki._fwd_config(n2, d, bf16), tol=2e-3))
    for n2, d in nt:
        fams.append(dict(family="infonce_bwd", shape=f"n2={n2} dim={d}", dtype="bf16", setup=ntxent_bwd(n2, d),
                         variants=_bwd_variants(d), resolved=lambda d=d: ki._bwd_config(d, bf16), tol=2e-2))
    for n, k, d in qs:
        fams.append(dict(family="infonce_rect", shape=f"n={n} queue={k} dim={d}", dtype="bf16", setup=queue(n, k, d),
                         variants=RECT_VARIANTS, resolved=lambda d=d: kr._rect_config(d, bf16), tol=2e-2))
    for b, k in sk:
        fams.append(dict(family="sinkhorn", shape=f"b={b} k={k}", dtype="fp32", setup=sinkhorn(b, k),
                         variants=SINKHORN_VARIANTS, resolved=lambda k=k: ks._config(k), tol=1e-4))
    for model in em:
        fams.append(dict(family="ema", shape=f"model={model}", dtype="fp32-bf16", setup=ema(model),
                         variants=EMA_VARIANTS, resolved=ke._launch_config, tol=1e-6))
    return fams


# ----------------------------------------------------------------------------------------------------
# the sweep


def _err(got: List, want: List) -> float:
    """max over the tensors of max |got - want| / max(max |want|, 1e-12)."""
    worst = 0.0
    for g, w in zip(got, want):
        g, w = g.double(), w.double()
        if not bool(g.isfinite().all()):
            return math.inf
        worst = max(worst, float((g - w).abs().max()) / max(float(w.abs().max()), 1e-12))
    return worst


def sweep(args, say: Callable[[str], None] = print) -> List[Dict]:
    import torch

    import ssl_fast

    sys.path.insert(0, HERE)
    import measure
    import runner

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("bench/tune.py: no CUDA device (use --smoke for the interpreter at tiny shapes)")
    device = torch.device("cuda" if cuda else "cpu")
    base = dict(timestamp=datetime.datetime.now().isoformat(timespec="seconds"), commit=runner.git_commit(),
                device_name=runner.device_name(str(device)), torch=torch.__version__,
                triton=runner.package_version("triton"))
    path = os.path.join(args.out, "tune.csv")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.monotonic()
    rows: List[Dict] = []

    def write(row):
        row = dict(base, **row)
        report.append_csv(path, [row], COLS)
        rows.append(row)
        say(f"  {row['family']:<12} {row['shape']:<26} {row['config']:<48} {row['status']:<8} "
            f"{report.fmt_num(row.get('median_ms', NAN))} ms  x{report.fmt_num(row.get('speedup_vs_table', NAN))}"
            + (f"  [{row['note']}]" if row.get("note") else ""))

    def timed(state):
        if cuda:
            return measure.time_cuda(state["run"], state["prep"], rep_ms=args.rep_ms, warmup_ms=10.0)
        return measure.time_cpu(state["run"], state["prep"], repeats=1, warmup=0)

    os.environ.pop(ENV, None)
    for fam in _families(args.smoke):
        if args.families and fam["family"] not in args.families:
            continue
        configs = [{}] + fam["variants"][: max(0, args.max_configs - 1)]
        state, want, table_ms = None, None, NAN
        for cfg in configs:
            label = json.dumps(cfg, sort_keys=True) if cfg else "table"
            row = dict(family=fam["family"], shape=fam["shape"], dtype=fam["dtype"], config=label)
            if args.time_budget_s and time.monotonic() - t_start > args.time_budget_s:
                write(dict(row, status="skipped", note="--time-budget-s spent"))
                continue
            os.environ[ENV] = json.dumps({fam["family"]: cfg}) if cfg else ""
            try:
                row["resolved"] = json.dumps(fam["resolved"](), sort_keys=True)
                with ssl_fast.set_backend("triton"):
                    if state is None:
                        state = fam["setup"](device)
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    got = state["answer"]()  # the first call: Triton compiles this configuration
                    if cuda:
                        torch.cuda.synchronize()
                    row["first_call_s"] = time.perf_counter() - t0
                    err = 0.0 if want is None else _err(got, want)
                    row["err_vs_table"] = err
                    if want is None:
                        want = [g.detach().clone() for g in got]
                    if not err <= fam["tol"]:
                        write(dict(row, status="wrong", note=f"differs from the table's answer by {err:.2e} "
                                                             f"> {fam['tol']:.0e}"))
                        continue
                    med, _, iqr = timed(state)
            except Exception as e:  # noqa: BLE001  (a configuration that does not compile is a row, not a crash)
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                write(dict(row, status="oom" if "out of memory" in msg.lower() else "error", note=msg))
                if cfg == {}:  # the table itself fails: no reference answer for the others
                    break
                continue
            finally:
                os.environ.pop(ENV, None)
            if cfg == {}:
                table_ms = med
            write(dict(row, status="ok", median_ms=med, iqr_ms=iqr,
                       speedup_vs_table=table_ms / med if med and not math.isnan(table_ms) else NAN))
        del state, want
        if cuda:
            torch.cuda.empty_cache()
    return rows


def summary(rows: List[Dict]) -> str:
    """Per (family, shape): the table's time, the best configuration, its speedup; counts of wrong / failed."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["shape"]), []).append(r)
    body = []
    for (fam, shape), grp in groups.items():
        ok = [r for r in grp if r["status"] == "ok"]
        table = next((r for r in grp if r["config"] == "table"), None)
        best = min(ok, key=lambda r: r["median_ms"], default=None)
        bad = {s: sum(r["status"] == s for r in grp) for s in ("wrong", "error", "oom", "skipped")}
        body.append([fam, shape, table["status"] if table else "-",
                     report.fmt_num(table.get("median_ms", NAN)) if table else "nan",
                     best["config"] if best else "-", report.fmt_num(best["median_ms"]) if best else "nan",
                     report.fmt_num(best.get("speedup_vs_table", NAN)) if best else "nan",
                     f"{len(ok)}/{len(grp)}", " ".join(f"{k} {v}" for k, v in bad.items() if v)])
    return report.text_table(["family", "shape", "table", "table ms", "best config", "best ms", "x table",
                              "ok", "not ok"], body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/tune.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for tune.csv")
    p.add_argument("--families", nargs="+", choices=("infonce_fwd", "infonce_bwd", "infonce_rect", "sinkhorn", "ema"),
                   help="default: all")
    p.add_argument("--max-configs", type=int, default=100, help="configurations per family and shape, the table's "
                                                                "included (default: all)")
    p.add_argument("--rep-ms", type=float, default=50.0, help="do_bench budget per configuration, ms")
    p.add_argument("--time-budget-s", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--smoke", action="store_true", help="no GPU: the Triton interpreter at tiny shapes")
    args = p.parse_args(argv)
    rows = sweep(args)
    print("\n" + summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
