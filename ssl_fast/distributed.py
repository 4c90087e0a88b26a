"""Process-group helpers of the distributed losses: group resolution, the equal-batch check, and the three
collectives a distributed InfoNCE / NT-Xent step uses.

Communication of one step (see ``ssl_fast.ops.infonce_rect``): forward ONE single-tensor all_gather (``all_gather_single``, formerly ``all_gather_into_tensor``) of the
local candidates (N_local x d per rank) and ONE scalar ``all_reduce`` of the loss; backward ONE
single-tensor ``reduce_scatter`` of the candidates' gradient (N_global x d). No host synchronization: the collectives take
device tensors and nothing is read back, except the one-time batch-size check per new local shape.

``process_group`` arguments accept a ``torch.distributed.ProcessGroup``, ``True`` or ``"world"`` (the default
group), or ``None`` (single process). A group of size 1, or ``True`` when torch.distributed is not initialized
(a single-process run of distributed code), is the single-process case.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

_checked: set = set()


def resolve_group(process_group, name: str = "process_group"):
    """The ProcessGroup to use, or None for a single process (see the module docstring)."""
    if process_group is None or process_group is False:
        return None
    if process_group is True or (isinstance(process_group, str) and process_group == "world"):
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    elif isinstance(process_group, str):
        raise ValueError(f"{name} must be a torch.distributed ProcessGroup, True, 'world' or None, "
                         f"got {process_group!r}")
    else:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"{name} was given but torch.distributed is not initialized")
        group = process_group
    return group if dist.get_world_size(group) > 1 else None


def world_and_rank(group) -> Tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def check_equal_batch(group, x: torch.Tensor, name: str) -> None:
    """Every rank of ``group`` must pass the same batch size: checked once per (group, shape, device) with
    a small all_gather of the sizes (a host read, once), ValueError naming ``name`` otherwise.

    The check is collective and cached per rank: it runs when a rank meets a local shape for the first time.
    Ranks change shape together in practice (a DistributedSampler gives every rank the same batch size);
    a rank that alone switches to a new shape while the others keep a checked one is not caught here and
    the gather itself then fails (gloo / NCCL report a size mismatch).
    """
    if group is None:
        return
    key = (id(group), name, tuple(x.shape), str(x.device))
    if key in _checked:
        return
    world = dist.get_world_size(group)
    mine = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = torch.empty(world, dtype=torch.int64, device=x.device)
    _all_gather_fn()(sizes, mine, group=group)
    sizes = sizes.tolist()
    if len(set(sizes)) != 1:
        raise ValueError(f"{name}: every rank of process_group must pass the same batch size N (the positives "
                         f"are indexed by rank offset); got N = {sizes} across ranks")
    _checked.add(key)


def _all_gather_fn():
    # torch >= 2.14 names the single-tensor collectives *_single; older releases *_into_tensor / *_tensor
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """(n, d) on every rank -> (world n, d), rank-major; one collective."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_fn()(out, x, group=group)
    return out


def reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """(world n, d) on every rank -> the sum over ranks of this rank's (n, d) block; one collective."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // world,) + tuple(x.shape[1:]))
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """y = [x_0; x_1; ...] (rank-major); backward: each rank's block of the summed gradient (a reduce-scatter),
    so a loss of the gathered rows sends every row's gradient back to its owner."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group), None


def all_gather_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """:func:`all_gather` with autograd: the gradient of the result is reduce-scattered back to its owners."""
    return _AllGatherWithGrad.apply(x, group)


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x (the loss value of the global batch on every rank).

    Backward: grad * world. This is the DDP convention of the distributed losses: DDP averages the
    parameters' gradients over the ranks, and each rank's gradient must then be world x its share so that the
    average equals the single-process gradient of the global batch.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.world = dist.get_world_size(group)
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.world, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _AllReduceSum.apply(x, group)


__all__ = ["resolve_group", "world_and_rank", "check_equal_batch", "all_gather", "all_gather_with_grad",
           "reduce_scatter", "all_reduce_sum"]
