"""The DINOv2 training losses (and DINOv3's Gram anchoring), usable on CPU without a process group.

- :class:`DINOLoss`: class-token cross-entropy between student and teacher views, with momentum
  centring (one step late) or Sinkhorn-Knopp teacher targets.
- :class:`iBOTPatchLoss`: the same on masked patch tokens, weighted per image.
- :class:`KoLeoLoss`: the nearest-neighbour spreading regulariser on backbone class tokens.
- :class:`GramLoss`: DINOv3's Gram anchoring of patch-feature similarities to an earlier teacher.

Loss modules never call backward and know nothing of distributed wrapping; their collectives go
through :mod:`dinokit.distributed`, which does nothing in one process.
"""

from .dino_clstoken_loss import DINOLoss, soft_cross_entropy
from .gram_loss import GramLoss
from .ibot_patch_loss import iBOTPatchLoss
from .koleo_loss import KoLeoLoss
from .teacher_normalization import sinkhorn_knopp

__all__ = ["DINOLoss", "GramLoss", "iBOTPatchLoss", "KoLeoLoss", "sinkhorn_knopp", "soft_cross_entropy"]
