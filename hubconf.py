"""torch.hub entry points, named as the official ones: ``torch.hub.load(REPO, "dinov2_vitb14")``.

Each is ``fn(*, pretrained=True, weights=None, **kwargs)``: ``weights`` loads a file or URL
(strictly), else ``pretrained`` fetches the official weights through torch.hub's cache; ``kwargs``
override the constructor settings. The ``_lc`` classifiers also take ``layers`` (4 or 1),
``num_classes`` and ``backbone_weights``; their ``weights`` is the head file. The depthers ``_ld``
(linear) and ``_dd`` (DPT) take ``weights="NYU"|"KITTI"`` (or a head file), ``layers`` (``_ld``: 4 or 1),
``depth_range`` and ``backbone_weights``.
See :func:`dinokit.models.create_model`.
"""

import os
import sys

dependencies = ["torch"]

# This checkout's code (torch.hub fetched or was given this folder), not another copy installed in the environment,
# unless dinokit is already imported in the process (then that copy it is, with a word).
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(os.path.join(_SRC, "dinokit")):
    _IMPORTED = getattr(sys.modules.get("dinokit"), "__file__", None)  # None: not imported, or a namespace package
    if "dinokit" not in sys.modules:
        sys.path.insert(0, _SRC)
    elif _IMPORTED is None or not os.path.realpath(_IMPORTED).startswith(  # the same files reached through a link
            os.path.realpath(os.path.join(_SRC, "dinokit")) + os.sep):
        import warnings

        _IMPORTED = os.path.dirname(_IMPORTED) if _IMPORTED else "a namespace package"
        warnings.warn(f"torch.hub: dinokit is already imported from {_IMPORTED}; its models are used, not those of "
                      f"{_SRC}", stacklevel=2)

from dinokit.models.registry import hub_entry_point  # noqa: E402

dinov2_vits14 = hub_entry_point("dinov2_vits14")
dinov2_vitb14 = hub_entry_point("dinov2_vitb14")
dinov2_vitl14 = hub_entry_point("dinov2_vitl14")
dinov2_vitg14 = hub_entry_point("dinov2_vitg14")

dinov2_vits14_reg = hub_entry_point("dinov2_vits14_reg")
dinov2_vitb14_reg = hub_entry_point("dinov2_vitb14_reg")
dinov2_vitl14_reg = hub_entry_point("dinov2_vitl14_reg")
dinov2_vitg14_reg = hub_entry_point("dinov2_vitg14_reg")

dinov2_vits14_lc = hub_entry_point("dinov2_vits14_lc")
dinov2_vitb14_lc = hub_entry_point("dinov2_vitb14_lc")
dinov2_vitl14_lc = hub_entry_point("dinov2_vitl14_lc")
dinov2_vitg14_lc = hub_entry_point("dinov2_vitg14_lc")

dinov2_vits14_reg_lc = hub_entry_point("dinov2_vits14_reg_lc")
dinov2_vitb14_reg_lc = hub_entry_point("dinov2_vitb14_reg_lc")
dinov2_vitl14_reg_lc = hub_entry_point("dinov2_vitl14_reg_lc")
dinov2_vitg14_reg_lc = hub_entry_point("dinov2_vitg14_reg_lc")

dinov2_vits14_ld = hub_entry_point("dinov2_vits14_ld")
dinov2_vitb14_ld = hub_entry_point("dinov2_vitb14_ld")
dinov2_vitl14_ld = hub_entry_point("dinov2_vitl14_ld")
dinov2_vitg14_ld = hub_entry_point("dinov2_vitg14_ld")

dinov2_vits14_dd = hub_entry_point("dinov2_vits14_dd")
dinov2_vitb14_dd = hub_entry_point("dinov2_vitb14_dd")
dinov2_vitl14_dd = hub_entry_point("dinov2_vitl14_dd")
dinov2_vitg14_dd = hub_entry_point("dinov2_vitg14_dd")

# the official image-text model: not provided (one line says why)
dinov2_vitl14_reg4_dinotxt_tet1280d20h24l = hub_entry_point("dinov2_vitl14_reg4_dinotxt_tet1280d20h24l")
