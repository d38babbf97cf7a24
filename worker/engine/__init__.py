"""stylequeue's style-transfer engine: Gatys et al. optimisation on VGG19, coarse to fine.

Imports only torch, torchvision, PIL, numpy and the standard library.
"""

from .checkpoint import Checkpoint
from .config import BatchItem, TransferConfig
from .errors import EngineError, GroupAborted, ImageError, WeightsError
from .images import load_image, save_image
from .progress import CHECKPOINT_NOW, Progress
from .transfer import Result, StyleTransfer, stylize

__all__ = [
    "CHECKPOINT_NOW",
    "BatchItem",
    "Checkpoint",
    "EngineError",
    "GroupAborted",
    "ImageError",
    "Progress",
    "Result",
    "StyleTransfer",
    "TransferConfig",
    "WeightsError",
    "load_image",
    "save_image",
    "stylize",
]
