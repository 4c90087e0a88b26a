"""The ``ssl-fast`` command.

    ssl-fast info           versions, the compiled extension, Triton, and the backend each device gets
    ssl-fast train          self-supervised training (simclr, directclr, moco, byol, simsiam, swav)
    ssl-fast eval           kNN accuracy of a checkpoint's encoder; --export its backbone state_dict
    ssl-fast linear-probe   logistic regression on a checkpoint's frozen features
    ssl-fast lab            reproduce the findings about collapse (ssl-fast lab --list; ssl-fast lab all)
    ssl-fast diagnose       collapse diagnostics (spectra, effective rank, alignment/uniformity) of a run or embeddings
    ssl-fast bench          every op's providers side by side (bench/suite.py of a source checkout; bench --help)
"""

from __future__ import annotations

import argparse
import platform
import sys


def _info() -> int:
    import torch

    import ssl_fast
    from ssl_fast import _ext
    from ssl_fast.ops import _backend

    print(f"ssl_fast {ssl_fast.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    if _ext.HAS_EXT:
        print(f"C++ extension ssl_fast._C: loaded (tile GEMM: {_ext._C.cpu_gemm()}, threads {torch.get_num_threads()})")
    else:
        print(f"C++ extension ssl_fast._C: missing ({_ext.IMPORT_ERROR})")
    if _backend.triton_available():
        import triton

        print(f"triton {triton.__version__}{' (interpreter)' if _backend.interpreter_enabled() else ''}")
    else:
        print("triton: not available")
    print(f"backend setting: {ssl_fast.get_backend()}")
    devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
        try:
            chosen = _backend.resolve(dev)
        except RuntimeError as exc:
            chosen = f"error: {exc}"
        print(f"  {dev} ({name}): {chosen}")
    return 0


# ---- lab (collapse experiments) -------------------------------------------------------------------------
def _add_lab_parser(sub) -> None:
    p = sub.add_parser("lab", help="run the collapse experiments of the lab (markdown report + plots + verdict)",
                       description="Run a lab experiment: seeded, minutes on a CPU, writes <out>/<name>/report.md "
                                   "with plots and a verdict computed from the measured numbers.")
    p.add_argument("name", nargs="?", default=None, help="experiment name, or 'all' (see --list)")
    p.add_argument("--out", default="lab_runs", help="output folder (default: lab_runs, ignored by git)")
    p.add_argument("--quick", action="store_true", help="the small budget the test suite uses")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for tiny models)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--readme", default=None, metavar="README.md",
                   help="also rewrite the verdict table between the lab-verdicts markers of this file")


def _lab(args) -> int:
    from ssl_fast import lab

    if args.list or args.name is None:
        for name in lab.EXPERIMENTS:
            print(name)
        return 0 if args.list else 2
    names = list(lab.EXPERIMENTS) if args.name == "all" else [args.name]
    for n in names:
        if n not in lab.EXPERIMENTS:
            print(f"ssl-fast lab: unknown experiment {n!r}; choose from {', '.join(lab.EXPERIMENTS)} or all",
                  file=sys.stderr)
            return 2
    results = []
    for n in names:
        r = lab.run(n, args.out, quick=args.quick, seed=args.seed, num_threads=args.threads)
        print(f"[{'PASS' if r.passed else 'FAIL'}] {n} ({r.seconds:.0f} s): {r.verdict}\n        report: {r.report}",
              flush=True)
        results.append(r)
    summary = lab.write_summary(results, args.out, quick=args.quick, seed=args.seed)
    print(f"verdicts: {summary}")
    if args.readme:
        lab.update_readme(args.readme, args.out)
        print(f"updated the verdict table in {args.readme}")
    return 0 if all(r.passed for r in results) else 1
def _add_diagnose_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="collapse diagnostics of a run, a checkpoint or saved embeddings",
                       description="Compute collapse diagnostics (covariance spectrum, effective rank, alignment, "
                                   "uniformity, normalized-output std, kNN) on held-out data and write report.md, "
                                   "spectrum.png and spectrum.csv. PATH: an ssl-fast train run directory, a "
                                   "checkpoint ckpt_*.pt, or a .pt file holding an (N, D) tensor or a dict of them.")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--out", default=None, help="output folder (default: <run>/diagnose, or next to the .pt file)")
    p.add_argument("--device", default="cpu", help="device for the encoder (default cpu)")
    p.add_argument("--max-samples", type=int, default=4096, help="held-out images used at most (default 4096)")


def _diagnose(args) -> int:
    import os

    import torch

    from ssl_fast.diagnostics import diagnose as dgn

    path = args.path
    if not os.path.exists(path):
        print(f"ssl-fast diagnose: {path!r} does not exist", file=sys.stderr)
        return 2
    obj = None
    if os.path.isfile(path):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            print(f"ssl-fast diagnose: cannot read {path!r}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            return 2
    is_embeddings = isinstance(obj, torch.Tensor) or (
        isinstance(obj, dict) and obj and "step" not in obj and all(isinstance(v, torch.Tensor) for v in obj.values()))
    if is_embeddings:
        emb = {"embedding": obj} if isinstance(obj, torch.Tensor) else obj
        bad = [k for k, v in emb.items() if v.dim() < 2 or v.shape[0] < 2 or not v.is_floating_point()]
        if bad:
            print(f"ssl-fast diagnose: {', '.join(map(str, bad))}: need floating (N, D) tensors with N >= 2",
                  file=sys.stderr)
            return 2
        out = args.out or os.path.splitext(path)[0] + "_diagnose"
        report, summaries = dgn.diagnose_embeddings({k: v[: args.max_samples] for k, v in emb.items()}, out,
                                                    notes=f"Embeddings from `{os.path.basename(path)}`.")
    else:
        try:
            import ssl_fast.train  # noqa: F401
        except ImportError:
            print("ssl-fast diagnose: run directories and training checkpoints need ssl_fast.train, which this "
                  "installation lacks; pass a .pt file of embeddings instead", file=sys.stderr)
            return 2
        try:
            report, summaries = dgn.diagnose_checkpoint(path, args.out, device=args.device,
                                                        max_samples=args.max_samples)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            print(f"ssl-fast diagnose: {exc}", file=sys.stderr)
            return 2
    for name, s in summaries.items():
        print(f"{name}: {s['state']}  effective rank {s['effective_rank']:.2f} / rank at 1e-3 {s['rank_at_1e-3']} "
              f"of {s['dim']}, std x sqrt(d) {s['std_sqrt_d']:.3f}, uniformity {s['uniformity']:.3f}"
              + (f", alignment {s['alignment']:.3f}" if "alignment" in s else "")
              + (f", kNN {s['knn_accuracy']:.3f}" if "knn_accuracy" in s else ""))
    print(f"report: {report}")
    return 0
# ---- end lab ----------------------------------------------------------------------------------------------


def _bench_script():
    """bench/suite.py of the source checkout this package runs from (an editable install or a checkout on
    sys.path); None for an installed wheel, which ships no benchmarks."""
    import os

    import ssl_fast

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ssl_fast.__file__))), "bench", "suite.py")
    return path if os.path.isfile(path) else None


def _bench(argv) -> int:
    import importlib.util

    path = _bench_script()
    if path is None:
        print("ssl-fast bench: the benchmarks live in the source checkout (bench/suite.py) and this installation "
              "has none; clone the repository and install it editable (pip install --no-build-isolation -e .)",
              file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("ssl_fast_bench_suite", path)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    return suite.main(argv)


def main(argv=None) -> int:
    as_program = argv is None  # the ssl-fast / python -m ssl_fast.cli program, not a main([...]) call
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every flag goes to bench/suite.py (ssl-fast bench --help lists them)
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="ssl-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, extension, Triton and backend per device")
    from . import _train_cli

    _train_cli.add_parsers(sub)
    _add_lab_parser(sub)
    _add_diagnose_parser(sub)
    sub.add_parser("bench", help="benchmark every op's providers side by side (ssl-fast bench --help)", add_help=False)
    args = parser.parse_args(argv)
    if args.command == "lab":
        return _lab(args)
    if args.command == "diagnose":
        return _diagnose(args)
    if args.command == "info":
        return _info()
    code = _train_cli.run(args, parser)
    return _train_cli.finish(code) if as_program else code


if __name__ == "__main__":
    sys.exit(main())
