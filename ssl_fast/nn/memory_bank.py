"""A queue of negatives (MoCo) that enqueues without host synchronization.

The write position is a device tensor; an enqueue is one ``index_copy_`` at ``(ptr + arange(B)) mod size`` and an
in-place update of ``ptr``: nothing is read back to the host, so a CUDA step never waits on it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as _dist


class MemoryBank(nn.Module):
    """A FIFO queue of ``size`` vectors of width ``dim`` (MoCo's queue of negatives), no gradient.

    Args:
        size: number of stored vectors (M > 0).
        dim: their width D.
        dtype: storage dtype (the loss functions want the embeddings' dtype: pass it, or cast the result).
        process_group: enqueue the batch of every rank (an all_gather, rank-major) so that every rank holds the
            same queue: a ``torch.distributed`` group, ``True`` / ``"world"`` (default group) or None.
        wrap: True (default) writes a batch that reaches the end of the queue around to its start (a ring);
            False follows lightly's ``MemoryBankModule``: the part of the batch past the end is dropped and the
            next write starts at 0.

    Initial content: random unit vectors (``F.normalize(torch.randn(size, dim))``, as lightly and MoCo).

    Shape:
        - batch: (B, D); ``negatives()``: (M, D).

    Returns:
        ``forward(batch, update=True)`` returns the queue as it was BEFORE the update (a copy when it updates,
        so the result stays valid), then enqueues ``batch.detach()``.

    Example:
        >>> bank = ssl_fast.nn.MemoryBank(4096, 128)
        >>> loss = ssl_fast.info_nce(q, k, 0.2, negatives=bank.negatives())  # copies the queue into its
        >>> bank.enqueue(k)                                                   # candidates: safe to update
        >>> # or, in one call: negatives = bank(k)  (the queue before k was added)
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, *, process_group=None,
                 wrap: bool = True):
        super().__init__()
        for v, nm in ((size, "size"), (dim, "dim")):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        self.size, self.dim, self.wrap = size, dim, bool(wrap)
        self.process_group = process_group
        # one spare row (index `size`) receives the dropped part of a batch when wrap = False
        store = torch.empty(size + 1, dim, dtype=dtype)
        store[:size] = F.normalize(torch.randn(size, dim), dim=1).to(dtype)
        store[size] = 0
        self.register_buffer("store", store, persistent=True)
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long), persistent=True)

    @property
    def bank(self) -> torch.Tensor:
        """The queue (M, D), a view (updated in place by ``enqueue``)."""
        return self.store[: self.size]

    def negatives(self) -> torch.Tensor:
        """The queue (M, D) as a view, no copy. Consume it before the next ``enqueue`` (``ssl_fast.info_nce``
        does: it copies the negatives into its candidate matrix in the forward)."""
        return self.bank

    @torch.no_grad()
    def enqueue(self, batch: torch.Tensor) -> None:
        """Write ``batch`` (B, D) at the write position (all ranks' batches with ``process_group``)."""
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"batch must have shape (B, {self.dim}), got "
                             f"{tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__}")
        batch = batch.detach()
        group = _dist.resolve_group(self.process_group)
        if group is not None:
            _dist.check_equal_batch(group, batch, "batch")
            batch = _dist.all_gather(batch, group)
        batch = batch.to(device=self.store.device, dtype=self.store.dtype)
        b, m = batch.shape[0], self.size
        ar = torch.arange(b, device=batch.device)
        if self.wrap:
            keep = min(b, m)  # of a batch longer than the queue only the last `size` rows survive
            idx = (self.ptr + (b - keep) + ar[:keep]) % m
            self.store.index_copy_(0, idx, batch[b - keep:])
            self.ptr.copy_((self.ptr + b) % m)
        else:  # lightly: rows past the end go to the spare row; the next write starts at 0
            idx = self.ptr + ar
            self.store.index_copy_(0, torch.where(idx < m, idx, torch.full_like(idx, m)), batch)
            self.ptr.copy_(torch.where(self.ptr + b >= m, torch.zeros_like(self.ptr), self.ptr + b))

    def forward(self, batch: Optional[torch.Tensor] = None, update: bool = True) -> torch.Tensor:
        """The queue before the update (a copy when ``update``), then enqueue ``batch`` if given and ``update``."""
        if batch is None or not update:
            return self.bank
        out = self.bank.clone()
        self.enqueue(batch)
        return out

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.store.dtype}, wrap={self.wrap}"
