"""The backbone a ``student`` config section describes: the one builder used by training, distillation,
evaluation, embedding and the training-time monitors, so that a run's snapshots always load back.
"""

from __future__ import annotations

from typing import Any

from ..models import DinoVisionTransformer, build_backbone


def backbone_from_config(student: Any, *, img_size: int, training: bool = False) -> DinoVisionTransformer:
    """Build the backbone of the ``student.*`` keys at ``img_size`` (the position-embedding grid).

    ``training=True`` adds the student's stochastic depth (``drop_path_rate``, ``drop_path_uniform``);
    otherwise (teacher, EMA, evaluation) there is none. ``layerscale: 0`` means no LayerScale, as in the
    official builder, in every case.
    """
    kwargs: dict[str, Any] = dict(
        img_size=int(img_size),
        patch_size=int(student.patch_size),
        init_values=float(student.layerscale) or None,
        ffn_layer=student.ffn_layer,
        qkv_bias=bool(student.qkv_bias),
        proj_bias=bool(student.proj_bias),
        ffn_bias=bool(student.ffn_bias),
        num_register_tokens=int(student.num_register_tokens),
        interpolate_offset=float(student.interpolate_offset),
        interpolate_antialias=bool(student.interpolate_antialias),
    )
    if training:
        kwargs.update(drop_path_rate=float(student.drop_path_rate), drop_path_uniform=bool(student.drop_path_uniform))
    return build_backbone(student.arch, **kwargs)
