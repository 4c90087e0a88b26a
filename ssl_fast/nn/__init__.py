"""Drop-in loss modules (hyperparameters only; math in ssl_fast.functional)."""

from .infonce import DirectCLRLoss, InfoNCELoss, NTXentLoss

from .memory_bank import MemoryBank  # queues of negatives (distributed branch)

__all__ = ["DirectCLRLoss", "InfoNCELoss", "NTXentLoss"]
__all__ += ["MemoryBank"]

# SwAV
from .swav import SwaVLoss, SwaVPrototypes  # noqa: E402

__all__ += ["SwaVLoss", "SwaVPrototypes"]


# EMA teacher and the BYOL / SimSiam losses (issue 10)
from .byol import BYOLLoss, NegativeCosineSimilarity  # noqa: E402
from .ema import EMA  # noqa: E402

__all__ += ["BYOLLoss", "EMA", "NegativeCosineSimilarity"]
