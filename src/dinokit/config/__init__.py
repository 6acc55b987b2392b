"""Configuration: the official DINOv2 key tree as a typed schema (``schema.py``), loading (``loading.py``), the
checks the types cannot make (``validation.py``), the crop sizes of a ``crops`` section, single or DINOv3's mixed
resolutions (``crops.py``), and the one place where a ``student`` section becomes a backbone (``backbone.py``).

Components take their own section (``cfg.optim``, ``cfg.crops``, ``cfg.student``...), never the whole tree.
"""

from .backbone import backbone_from_config
from .crops import CropSizes, backbone_img_size, crop_resolutions
from .loading import (
    DTYPES,
    apply_scaling_rules,
    as_dataclass,
    compute_dtype,
    find_run_config,
    list_presets,
    load_config,
    write_config,
)
from .schema import SSLConfig, StudentConfig
from .validation import check_idle_keys, check_inert_keys, check_koleo_group, check_step_levers, validate

__all__ = [
    "DTYPES",
    "CropSizes",
    "SSLConfig",
    "StudentConfig",
    "apply_scaling_rules",
    "as_dataclass",
    "backbone_from_config",
    "backbone_img_size",
    "check_idle_keys",
    "check_inert_keys",
    "check_koleo_group",
    "check_step_levers",
    "compute_dtype",
    "crop_resolutions",
    "find_run_config",
    "list_presets",
    "load_config",
    "validate",
    "write_config",
]
