"""Launch-configuration overrides, for the tile sweep only (``bench/tune.py``, ``scripts/gpu_check.sh tune``).

Every launcher takes its block sizes, warps and stages from its heuristic table and passes the table's
dict through :func:`override` under a name:

    infonce_fwd   kernels/infonce.py _fwd_config   BLOCK, BLOCK_K, num_warps, num_stages
    infonce_bwd   kernels/infonce.py _bwd_config   BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, SINGLE, num_warps, num_stages
    infonce_rect  kernels/infonce.py _rect_config  BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, num_warps, bwd_warps
    sinkhorn      kernels/sinkhorn.py _config      BLOCK_B, BLOCK_K, SINGLE, num_warps
    ema           kernels/ema.py _launch_config    CHUNK, BLOCK, num_warps

With ``SSL_FAST_TRITON_CONFIG`` unset (every user's case) the table's dict comes back unchanged. Set to a JSON
object ``{"infonce_fwd": {"BLOCK": 64, "num_stages": 4}, ...}``, the named keys replace the table's for that
launcher. Nothing checks that an override is valid for the shape: the sweep compares every configuration's
answer with the table's before it keeps a timing.
"""

from __future__ import annotations

import functools
import json
import os

ENV = "SSL_FAST_TRITON_CONFIG"


@functools.lru_cache(maxsize=8)
def _parse(raw: str) -> dict:
    table = json.loads(raw)
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"{ENV} must be a JSON object of objects, e.g. '{{\"infonce_fwd\": {{\"BLOCK\": 64}}}}'")
    return table


def override(name: str, cfg: dict) -> dict:
    """``cfg`` with the keys that ``$SSL_FAST_TRITON_CONFIG[name]`` sets replaced (``cfg`` itself when unset)."""
    raw = os.environ.get(ENV)
    if not raw:
        return cfg
    extra = _parse(raw).get(name)
    return {**cfg, **extra} if extra else cfg
