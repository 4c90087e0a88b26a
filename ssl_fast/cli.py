"""The ``ssl-fast`` command.

    ssl-fast info           versions, the compiled extension, Triton, and the backend each device gets
    ssl-fast train          self-supervised training (simclr, directclr, moco, byol, simsiam, swav)
    ssl-fast eval           kNN accuracy of a checkpoint's encoder; --export its backbone state_dict
    ssl-fast linear-probe   logistic regression on a checkpoint's frozen features
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ssl-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, extension, Triton and backend per device")
    from . import _train_cli

    _train_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    return _train_cli.run(args, parser)


if __name__ == "__main__":
    sys.exit(main())
