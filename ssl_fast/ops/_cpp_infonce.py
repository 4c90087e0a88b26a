"""The ``cpp`` backend of InfoNCE / NT-Xent: thin calls into ``ssl_fast._C`` (csrc/cpu/infonce.cpp)."""

from __future__ import annotations

import os

from .._ext import _C

# Rows per tile; 0 lets the kernel choose (128, smaller when there are few tiles per thread).
BLOCK = int(os.environ.get("SSL_FAST_CPU_BLOCK", "0"))


def ntxent_forward(z1, z2, inv_temp, normalize, d):
    loss, lse, zn, norms = _C.ntxent_fwd(z1, z2, float(inv_temp), normalize, d, BLOCK)
    return loss, (lse, zn, norms)


def ntxent_backward(grad, z1, z2, saved, inv_temp, normalize, d):
    lse, zn, norms = saved
    return _C.ntxent_bwd(float(grad), z1, z2, zn, norms, lse, float(inv_temp), normalize, d, BLOCK)


def info_nce_forward(q, k, inv_temp, normalize, symmetric, d):
    loss, *saved = _C.info_nce_fwd(q, k, float(inv_temp), normalize, symmetric, d, BLOCK)
    return loss, tuple(saved)


def info_nce_backward(grad, q, k, saved, inv_temp, normalize, symmetric, d):
    lse_r, lse_c, qn, kn, qnorm, knorm = saved
    return _C.info_nce_bwd(float(grad), q, k, qn, kn, qnorm, knorm, lse_r, lse_c, float(inv_temp), normalize,
                           symmetric, d, BLOCK)
