"""EMA teacher update providers side by side: ``python bench/bench_ema.py ARGS`` runs
``python bench/suite.py ema ARGS``. See bench/suite.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402

if __name__ == "__main__":
    sys.exit(suite.main(["ema", *sys.argv[1:]]))
