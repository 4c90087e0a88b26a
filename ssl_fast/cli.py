"""The ``ssl-fast`` command.

    ssl-fast info     versions, the compiled extension, Triton, and the backend each device gets
    ssl-fast lab      reproduce the findings about collapse (ssl-fast lab --list; ssl-fast lab all)
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
    return 0 if all(r.passed for r in results) else 1
# ---- end lab ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ssl-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, extension, Triton and backend per device")
    _add_lab_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "lab":
        return _lab(args)
    if args.command == "info":
        return _info()
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
