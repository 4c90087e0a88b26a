"""Drop-in loss modules (hyperparameters only; math in ssl_fast.functional)."""

from .infonce import DirectCLRLoss, InfoNCELoss, NTXentLoss

__all__ = ["DirectCLRLoss", "InfoNCELoss", "NTXentLoss"]

# EMA teacher and the BYOL / SimSiam losses (issue 10)
from .byol import BYOLLoss, NegativeCosineSimilarity  # noqa: E402
from .ema import EMA  # noqa: E402

__all__ += ["BYOLLoss", "EMA", "NegativeCosineSimilarity"]
