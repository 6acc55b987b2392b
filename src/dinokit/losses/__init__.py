"""The three DINOv2 training losses, usable on CPU without a process group.

- :class:`DINOLoss`: class-token cross-entropy between student and teacher views, with momentum
  centring (one step late) or Sinkhorn-Knopp teacher targets.
- :class:`iBOTPatchLoss`: the same on masked patch tokens, weighted per image.
- :class:`KoLeoLoss`: the nearest-neighbour spreading regulariser on backbone class tokens.

Loss modules never call backward and know nothing of distributed wrapping; their collectives go
through :mod:`dinokit.distributed`, which does nothing in one process.
"""

from .dino_clstoken_loss import DINOLoss, soft_cross_entropy
from .ibot_patch_loss import iBOTPatchLoss
from .koleo_loss import KoLeoLoss
from .teacher_normalization import sinkhorn_knopp

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "sinkhorn_knopp", "soft_cross_entropy"]
