"""Optimizer step + EMA teacher update providers side by side: ``python bench/bench_optim_ema.py sgd ARGS``
(or adamw, lars) runs ``python bench/suite.py sgd_ema ARGS``. See bench/suite.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("sgd", "adamw", "lars"):
        sys.exit("usage: python bench/bench_optim_ema.py {sgd,adamw,lars} [bench/suite.py options]")
    sys.exit(suite.main([f"{sys.argv[1]}_ema", *sys.argv[2:]]))
