"""lightly-compatible loss classes backed by ssl_fast's fused ops: change one import line.

    from lightly.loss import NTXentLoss            ->  from ssl_fast.nn.lightly import NTXentLoss
    from lightly.loss import DirectCLRLoss         ->  from ssl_fast.nn.lightly import DirectCLRLoss

Signatures, defaults and semantics are lightly 1.6's, including the memory bank (a ``(size, dim)`` tuple;
``0`` disables it; any other bare int raises, as in lightly; the bank starts as random unit vectors drawn
with ``torch.randn`` in ``__init__``, so a seeded run draws the same bank; the loss uses the bank as it was
before this step, then ``out1`` (normalized) is enqueued when ``out0.requires_grad``; a batch reaching the end
of the bank is cut there and the next write starts at 0) and ``gather_distributed`` (without a bank: every
rank's anchors against the candidates of all ranks, the value is the mean over this rank's anchors and the
gradients flow back to their owners, as lightly's ``GatherLayer``; with a bank: local negatives from the bank,
the bank is updated with the batches of all ranks). Differences: nothing is read back to the host (lightly's
bank update reads its pointer), the ``(2N, 2N)`` / ``(N, M)`` logits are never stored, and ``temperature``
must be > 0 (lightly accepts a negative one).

ssl_fast's own modules (``ssl_fast.nn``) follow the papers instead (e.g. DirectCLR's official loss).
"""

from __future__ import annotations

import numbers
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import distributed as torch_dist
from torch import nn

from .. import functional as sf
from .memory_bank import MemoryBank


class _LightlyMemoryBank(nn.Module):
    """lightly's ``MemoryBankModule`` checks and layout, on ``ssl_fast.nn.MemoryBank(wrap=False)``."""

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False):
        super().__init__()
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if any(x < 0 for x in size_tuple):
            raise ValueError(f"Illegal memory bank size {size} (memory_bank_size), all entries must be "
                             "non-negative.")
        if isinstance(size, int) and size > 0:
            raise ValueError(f"Memory bank size 'memory_bank_size={size}' does not specify the feature dimension. "
                             f"Set it with 'memory_bank_size=({size}, dim)', or pass 'memory_bank_size=0' to disable "
                             "the memory bank.")
        if size_tuple != (0,) and len(size_tuple) != 2:
            raise ValueError(f"Illegal memory bank size {size} (memory_bank_size), expected a (num_features, dim) "
                             "tuple, or 'memory_bank_size=0' to disable the memory bank.")
        if len(size_tuple) == 2 and size_tuple[0] > 0 and size_tuple[1] < 1:
            raise ValueError(f"Illegal memory bank size {size} (memory_bank_size): the feature dimension must be "
                             ">= 1.")
        self.size = size_tuple
        self.gather_distributed = gather_distributed
        self.queue = None
        if size_tuple[0] > 0:
            self.queue = MemoryBank(size_tuple[0], size_tuple[1], wrap=False,
                                    process_group=True if gather_distributed else None)

    @property
    def bank(self) -> torch.Tensor:
        """(num_features, dim), as lightly stores it."""
        return self.queue.bank if self.queue is not None else torch.empty(0)

    @property
    def bank_ptr(self) -> torch.Tensor:
        return self.queue.ptr if self.queue is not None else torch.zeros(1, dtype=torch.long)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_bank_inputs(out0, out1, dim: int) -> None:
    """The memory-bank branch's own checks (it normalizes before any op sees the inputs): the messages name
    ``out0`` / ``out1`` / ``memory_bank_size``, never torch's."""
    for x, name in ((out0, "out0"), (out1, "out1")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if out0.shape != out1.shape:
        raise ValueError(f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")
    if out0.device != out1.device:
        raise ValueError(f"out0 and out1 must be on the same device, got {out0.device} and {out1.device}")
    if out0.dtype != out1.dtype:
        raise TypeError(f"out0 and out1 must have the same dtype, got {out0.dtype} and {out1.dtype}")
    if out0.shape[0] == 0 or out0.shape[1] == 0:
        raise ValueError(f"out0 and out1 must be non-empty, got shape {tuple(out0.shape)}")
    if out0.shape[1] != dim:
        raise ValueError(f"out0 and out1 have D = {out0.shape[1]} features but the memory bank holds vectors of "
                         f"dim {dim} (memory_bank_size)")


class NTXentLoss(nn.Module):
    """lightly's ``NTXentLoss`` (SimCLR; MoCo with a memory bank), fused.

    Args:
        temperature: scale logits by 1 / temperature (> 0 here; abs < 1e-8 raises as in lightly).
        memory_bank_size: ``(num_features, dim)`` or 0 (off).
        gather_distributed: negatives from all processes (default group) before the loss.

    Shape:
        - out0, out1: (N, D) projections of the two views. Output: scalar.

    Example:
        >>> from ssl_fast.nn.lightly import NTXentLoss
        >>> criterion = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
        >>> loss = criterion(out0, out1)
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False):
        super().__init__()
        self.memory_bank = _LightlyMemoryBank(size=memory_bank_size, gather_distributed=gather_distributed)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.eps = 1e-8
        if isinstance(temperature, torch.Tensor):
            if temperature.numel() != 1:
                raise ValueError(f"temperature must be a float or a 0-dim tensor, got a tensor of shape "
                                 f"{tuple(temperature.shape)}")
            value = float(temperature.detach()) if temperature.device.type == "cpu" else 1.0  # no device sync
        elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")
        else:
            value = temperature
        if abs(value) < self.eps:
            raise ValueError("Illegal temperature: abs({}) < 1e-8".format(self.temperature))
        if gather_distributed and not torch_dist.is_available():
            raise ValueError("gather_distributed is True but torch.distributed is not available. Please set "
                             "gather_distributed=False or install a torch version with distributed support.")

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        queue = self.memory_bank.queue
        if queue is not None:
            _check_bank_inputs(out0, out1, queue.dim)
            # in the accumulation dtype: fp16 squared norms overflow (a NaN loss)
            acc = torch.float64 if out0.dtype == torch.float64 else torch.float32
            out0n = F.normalize(out0.to(acc), dim=1)
            out1n = F.normalize(out1.to(acc), dim=1)
            n = out0.shape[0]
            none = torch.full((n,), -1, dtype=torch.int64, device=out0.device)
            # the bank's logsumexp per row, fused; the positive joins it in log space:
            # CE_i = logaddexp(s_i+, lse_i(bank)) - s_i+
            neg = queue.negatives().to(device=out0.device, dtype=out0n.dtype)
            lse_bank = sf.infonce_rect(out0n, neg, none, none, self.temperature, normalize=False,
                                       grad_candidates=False)
            # a tensor temperature in the loss's dtype (a float64 one made the loss of fp32 inputs float64)
            temp = self.temperature
            if isinstance(temp, torch.Tensor):
                temp = temp.to(device=out0.device, dtype=lse_bank.dtype)
            sim_pos = (out0n * out1n).sum(1).to(lse_bank.dtype) / temp
            loss = (torch.logaddexp(sim_pos, lse_bank) - sim_pos).mean()
            if out0.requires_grad:  # after the loss consumed the bank: the bank before the update is used
                queue.enqueue(out1n)
            return loss
        # gather_distributed: every rank's anchors against all candidates, the value of this rank's anchors
        return sf.ntxent(out0, out1, self.temperature, process_group=True if self.gather_distributed else None,
                         local_loss=True)


class DirectCLRLoss(NTXentLoss):
    """lightly's ``DirectCLRLoss``: flattens each input, keeps its first ``loss_dim`` values, NT-Xent on them.

    Args:
        loss_dim: the sub-vector length; temperature, memory_bank_size, gather_distributed: as ``NTXentLoss``.

    Shape:
        - out0, out1: (N, ...) encodings (flattened from dim 1). Output: scalar.
    """

    def __init__(self, loss_dim: int = 64, temperature: float = 0.5,
                 memory_bank_size: Union[int, Sequence[int]] = 0, gather_distributed: bool = False):
        super().__init__(temperature=temperature, memory_bank_size=memory_bank_size,
                         gather_distributed=gather_distributed)
        if isinstance(loss_dim, bool) or not isinstance(loss_dim, numbers.Integral) or loss_dim < 1:
            raise ValueError(f"loss_dim must be an int >= 1, got {loss_dim!r}")
        self.loss_dim = int(loss_dim)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        for x, name in ((out0, "out0"), (out1, "out1")):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() < 2:
                raise ValueError(f"{name} must have shape (N, ...) with at least 2 dimensions, got {tuple(x.shape)}")
        out0 = out0.flatten(start_dim=1)[:, : self.loss_dim]
        out1 = out1.flatten(start_dim=1)[:, : self.loss_dim]
        return super().forward(out0, out1)


# The other lightly drop-ins, backed by the fused ops. lightly 1.6's SwaVLoss returns shape (1,) (ssl_fast's own
# returns a 0-dim tensor): the class here keeps lightly's shape so nothing downstream changes.
from ..functional import update_momentum  # noqa: E402  (lightly.models.utils.update_momentum)
from .byol import NegativeCosineSimilarity  # noqa: E402  (lightly.loss.NegativeCosineSimilarity)
from .swav import SwaVLoss as _SwaVLoss  # noqa: E402


class SwaVLoss(_SwaVLoss):
    """lightly's ``SwaVLoss`` (same signature, defaults and output shape (1,)), with the fused Sinkhorn-Knopp.

    Args / Shape / Example: as ``ssl_fast.nn.SwaVLoss``; the output has shape (1,) like lightly's.
    """

    def forward(self, high_resolution_outputs, low_resolution_outputs, queue_outputs=None):
        return super().forward(high_resolution_outputs, low_resolution_outputs, queue_outputs).reshape(1)


__all__ = ["DirectCLRLoss", "NTXentLoss", "NegativeCosineSimilarity", "SwaVLoss", "update_momentum"]
