"""NT-Xent / InfoNCE providers side by side: ``python bench/bench_ntxent.py ARGS`` runs
``python bench/suite.py ntxent ARGS`` (``--loss info_nce``: the ``info_nce`` op). See bench/suite.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    op = "ntxent"
    if "--loss" in argv:
        i = argv.index("--loss")
        op = argv[i + 1]
        del argv[i:i + 2]
    sys.exit(suite.main([op, *argv]))
