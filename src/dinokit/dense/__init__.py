"""Dense prediction on frozen features: segmentation and depth heads in the official layouts, their
training (a task of the shared engine), metrics, datasets and the depth hub models.

* :mod:`.heads`: ``LinearSegHead`` (mmseg BNHead), ``LinearDepthHead`` (depth BNHead; DINOv3's linear depth head), ``DPTHead``;
* :mod:`.model`: ``DenseModel`` (backbone + decode_head; whole/slide inference, flip and multi-scale TTA);
* :mod:`.loading`: official head files in and out, strictly;
* :mod:`.hub`: ``dinov2_vit{s,b,l,g}14_{ld,dd}``;
* :mod:`.metrics`, :mod:`.losses`, :mod:`.datasets`, :mod:`.generated`, :mod:`.train`, :mod:`.run`.
"""

from .heads import DPTHead, FeatureSpec, LinearDepthHead, LinearSegHead
from .loading import load_head, save_head
from .model import CenterPadding, DenseModel, build_dense_model

__all__ = ["CenterPadding", "DPTHead", "DenseModel", "FeatureSpec", "LinearDepthHead", "LinearSegHead", "build_dense_model", "load_head",
           "save_head"]
