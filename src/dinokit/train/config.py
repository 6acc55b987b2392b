"""Kept for imports written before the configuration became its own package: use :mod:`dinokit.config`."""

from ..config.loading import *  # noqa: F401,F403
from ..config.loading import DTYPES, apply_scaling_rules, as_dataclass, compute_dtype, list_presets, load_config  # noqa: F401
from ..config.loading import validate, write_config  # noqa: F401
