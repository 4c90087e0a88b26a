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


# Optional packages the commands import, with the extra of pyproject.toml that installs each (checked by
# tests/test_cli_extras.py): a missing one stops the command with one line naming the extra.
OPTIONAL_MODULES = {"matplotlib": ("matplotlib", "train"), "sklearn": ("scikit-learn", "train"),
                    "yaml": ("pyyaml", "train"), "tensorboard": ("tensorboard", "train"),
                    "torchvision": ("torchvision", "train"), "tqdm": ("tqdm", "train"), "triton": ("triton", "triton")}


def main(argv=None) -> int:
    as_program = argv is None  # the ssl-fast / python -m ssl_fast.cli program, not a main([...]) call
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv, as_program)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in OPTIONAL_MODULES:
            raise
        dist, extra = OPTIONAL_MODULES[top]
        command = next((a for a in argv if not a.startswith("-")), "")
        print(f"ssl-fast {command}: needs the optional package {dist} (module {top}); install it with "
              f"pip install 'ssl_fast[{extra}]'", file=sys.stderr)
        return 2


def _main(argv, as_program: bool) -> int:
    if argv[:1] == ["bench"]:  # every flag goes to bench/suite.py (ssl-fast bench --help lists them)
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="ssl-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, extension, Triton and backend per device")
    from . import _train_cli

    _train_cli.add_parsers(sub)
    _add_lab_parser(sub)
    _train_cli.add_diagnose_parser(sub)
    sub.add_parser("bench", help="benchmark every op's providers side by side (ssl-fast bench --help)", add_help=False)
    args = parser.parse_args(argv)
    if args.command == "lab":
        return _lab(args)
    if args.command == "info":
        return _info()
    code = _train_cli.run(args, parser)
    return _train_cli.finish(code) if as_program else code


if __name__ == "__main__":
    sys.exit(main())
