"""ssl_fast: fused kernels for self-supervised learning (InfoNCE / NT-Xent, Sinkhorn-Knopp, EMA).

    import ssl_fast
    loss = ssl_fast.ntxent(z1, z2, temperature=0.5)       # functional
    criterion = ssl_fast.nn.NTXentLoss(temperature=0.5)   # lightly-style module
    with ssl_fast.set_backend("torch"): ...               # pick triton | cpp | torch | auto
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _ext, functional, nn, reference
from ._ext import HAS_EXT
from .functional import info_nce, ntxent
from .ops import BACKENDS, get_backend, set_backend

from . import distributed, gradcache  # global negatives across processes, gradient caching
from .gradcache import GradCache

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "HAS_EXT",
    "functional",
    "get_backend",
    "info_nce",
    "nn",
    "ntxent",
    "reference",
    "set_backend",
]
__all__ += ["GradCache", "distributed", "gradcache"]

# Sinkhorn-Knopp (SwAV codes)
from .functional import sinkhorn_knopp  # noqa: E402

__all__ += ["sinkhorn_knopp"]


# EMA teacher update (issue 10)
from .functional import ema_update_, update_momentum  # noqa: E402

__all__ += ["ema_update_", "update_momentum"]

# Optimizers whose step also updates an EMA teacher in the same pass (issue 23)
from . import optim  # noqa: E402

__all__ += ["optim"]
