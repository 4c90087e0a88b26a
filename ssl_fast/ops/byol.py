"""BYOL and SimSiam losses: argument checks and the (small, elementwise + row-reduction) math in torch.

Both losses are O(N D) reductions over already-computed embeddings, dominated by the networks that
produce them, so they are plain torch (autograd gives the gradient):

    SimSiam:  L = -mean_i cos(x0_i, x1_i),  cos(a, b) = <a, b> / (max(|a|, eps) max(|b|, eps))
              (torch.nn.functional.cosine_similarity, as lightly's NegativeCosineSimilarity).
    BYOL:     L = mean_i [ (2 - 2 cos(p0_i, z1_i)) + (2 - 2 cos(p1_i, z0_i)) ] / 2
                = 2 - mean_i [ cos(p0_i, z1_i) + cos(p1_i, z0_i) ],
              with cos of l2-normalized rows (F.normalize, eps 1e-12), 2 - 2 cos(p, z) = |p^ - z^|^2.
              Gradient (for the online predictions only; the targets z are stop-gradient):
              dL/dp0_i = -(1 / N) (z1^_i - cos(p0_i, z1_i) p0^_i) / |p0_i|, likewise for p1 with z0.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def negative_cosine_similarity(x0: torch.Tensor, x1: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    _check_tensor(x0, "x0")
    _check_tensor(x1, "x1")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    try:
        shape = torch.broadcast_shapes(x0.shape, x1.shape)
    except RuntimeError:
        raise ValueError(f"x0 and x1 must have broadcastable shapes, got {tuple(x0.shape)} and "
                         f"{tuple(x1.shape)}") from None
    if not -len(shape) <= dim < max(len(shape), 1):
        raise ValueError(f"dim={dim} is out of range for inputs of shape {tuple(shape)}")
    if x0.device != x1.device:
        raise ValueError(f"x0 and x1 must be on the same device, got {x0.device} and {x1.device}")
    if 0 in shape:
        raise ValueError(f"x0 and x1 must be non-empty, got shapes {tuple(x0.shape)} and {tuple(x1.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps!r}")
    # In fp32 (fp64 for fp64), each vector scaled by its largest |entry| first: cosine_similarity's |x0|^2 |x1|^2
    # underflows for small vectors (norms below ~1e-19 in fp32: 0 instead of the cosine; a zero vector in fp16,
    # whose eps^2 is 0, gives 0 / 0 = NaN). cos = <s0, s1> * (a0 / max(|x0|, eps)) * (a1 / max(|x1|, eps)) with
    # s = x / a, a = max |x|: the same value, each norm clamped at eps as documented. Broadcast first (``dim``
    # indexes the broadcast shape). The result has the inputs' dtype, as lightly's.
    acc = torch.float64 if torch.float64 in (x0.dtype, x1.dtype) else torch.float32

    def scaled(x):
        x = x.to(acc).expand(shape)
        a = x.abs().amax(dim=dim, keepdim=True).clamp_min(torch.finfo(acc).tiny)
        s = x / a
        n = torch.linalg.vector_norm(s, dim=dim, keepdim=True) * a
        return s, a / n.clamp_min(eps)

    s0, f0 = scaled(x0)
    s1, f1 = scaled(x1)
    cos = ((s0 * f0) * (s1 * f1)).sum(dim=dim)
    return (-cos.mean()).to(torch.promote_types(x0.dtype, x1.dtype))


def byol_loss(p0: torch.Tensor, p1: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    for x, name in ((p0, "p0"), (p1, "p1"), (z0, "z0"), (z1, "z1")):
        _check_tensor(x, name)
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (N, D), got a tensor of rank {x.dim()} with shape "
                             f"{tuple(x.shape)}")
    for x, name in ((p1, "p1"), (z0, "z0"), (z1, "z1")):
        if x.shape != p0.shape:
            raise ValueError(f"p0, p1, z0 and z1 must have the same shape (N, D), got p0 {tuple(p0.shape)} "
                             f"and {name} {tuple(x.shape)}")
        if x.device != p0.device:
            raise ValueError(f"p0, p1, z0 and z1 must be on the same device, got p0 on {p0.device} and {name} "
                             f"on {x.device}")
    if p0.shape[0] == 0 or p0.shape[1] == 0:
        raise ValueError(f"p0, p1, z0 and z1 must be non-empty, got shape {tuple(p0.shape)}")
    acc = torch.float64 if p0.dtype == torch.float64 else torch.float32

    def cos(p, z):
        return (F.normalize(p.to(acc), dim=1) * F.normalize(z.to(acc), dim=1)).sum(dim=1)

    return 2.0 - (cos(p0, z1) + cos(p1, z0)).mean()
