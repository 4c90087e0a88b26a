"""Sinkhorn-Knopp (SwAV codes) providers side by side: ``python bench/bench_sinkhorn.py ARGS`` runs
``python bench/suite.py sinkhorn ARGS``. See bench/suite.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402

if __name__ == "__main__":
    sys.exit(suite.main(["sinkhorn", *sys.argv[1:]]))
