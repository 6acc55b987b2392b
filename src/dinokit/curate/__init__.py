"""Automatic data curation: embed a pool, deduplicate it, retrieve around seed sets, cluster and sample a balanced set.

The stages (see :mod:`dinokit.curate.pipeline`) read and write files in a work folder; ``dinokit curate`` runs them.
"""

from .config import CurateConfig, make_config
from .dedup import choose_representatives, connected_components, relative_dedup
from .kmeans import hierarchical_kmeans, kmeans
from .knn import knn_search
from .pipeline import run_pipeline
from .sampling import hierarchical_sample

__all__ = [
    "CurateConfig",
    "choose_representatives",
    "connected_components",
    "hierarchical_kmeans",
    "hierarchical_sample",
    "kmeans",
    "knn_search",
    "make_config",
    "relative_dedup",
    "run_pipeline",
]
