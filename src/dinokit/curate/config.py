"""The curation settings: one typed section per stage, changed with dotted ``key=value`` overrides.

Each stage records a digest of its own section (and of the stages it reads), so a rerun with the same
settings skips it and a changed knob reruns that stage and everything after it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from omegaconf import OmegaConf

from ..config.loading import merge_checked, override_to_dict
from ..config.validation import check_bounds, check_seeds
from ..errors import DinokitError

NOUN = "curate key"  # how messages name a setting


@dataclass
class EmbedConfig:
    image_size: int = 224
    """Centre-crop size in pixels (the evaluation transform)."""
    batch_size: int = 64
    """Images per forward pass."""
    num_workers: int = 2
    """Image decoding processes."""
    shard_size: int = 8192
    """Images per shard file; a killed run re-embeds at most one shard per rank."""
    copy: str = "gem"
    """Copy-detection descriptor: gem (GeM-pooled patch tokens), cls (the class token), or model (--copy-model)."""
    gem_p: float = 3.0
    """GeM exponent (3 as in SSCD)."""
    storage: str = "float16"
    """On-disk dtype of the embeddings: float16 halves the disk of float32; cosines move by < 1e-3."""


@dataclass
class DedupConfig:
    k: int = 64
    """Neighbours per image in the copy-detection graph."""
    threshold: float = 0.85
    """Cosine above which two pool images are copies (calibrated for the centred GeM descriptor; 0.6 for SSCD)."""
    eval_threshold: float = 0.75
    """Stricter cosine against the evaluation sets: a whole pool component touching one is dropped (SSCD: 0.45)."""
    center: bool = True
    """Subtract the pool's mean descriptor before comparing (removes the direction every image shares)."""
    keep: str = "largest"
    """Which copy to keep: largest (file size), first (path order) or central (closest to the component mean)."""
    knn: str = "auto"
    """Neighbour search: auto, exact, faiss or faiss-ivf."""


@dataclass
class RetrieveConfig:
    mode: str = "sample"
    """sample: each seed image's k nearest pool images; cluster: pool clusters that hold seed images."""
    k: int = 0
    """Neighbours per seed image; 0 = 32 below 1.5M seed images, else 4."""
    n_clusters: int = 0
    """Pool clusters for mode=cluster; 0 = 4·sqrt(pool size)."""
    min_seed_images: int = 3
    """mode=cluster: a cluster is retrieved when it holds more than this many seed images."""
    per_cluster: int = 10000
    """mode=cluster: images taken (at random) from each retrieved cluster."""
    max_images: int = 1000000
    """Cap on the images retrieved for one seed set."""


@dataclass
class ClusterConfig:
    n_clusters: list[int] = field(default_factory=list)
    """Clusters per level, bottom-up (e.g. [1000, 100]); empty = two levels sized from the pool."""
    resampling_steps: list[int] = field(default_factory=list)
    """Resampling rounds after each level's first k-means; empty = 10 per level."""
    sample_size: list[int] = field(default_factory=list)
    """Points per cluster in a resampling round; empty = half the level's average cluster size."""
    n_splits: list[int] = field(default_factory=list)
    """Split each cluster of a level in up to this many by a k-means of its own points; empty = 1 (none) per level."""
    sampling: str = "c"
    """Which points a resampling round takes: c (closest to the centroid) or r (random)."""
    n_iters: int = 20
    """Lloyd iterations per k-means."""
    metric: str = "l2"
    """l2 or cos."""
    float64: bool = False
    """Cluster in float64 (exact, twice the memory); sums are float64 either way."""
    seed: int = 0


@dataclass
class SampleConfig:
    strategy: str = "r"
    """Within a leaf cluster: r (random) or c (closest to the centroid first)."""
    seed: int = 0
    multiplier: int = 1
    """Each cluster may give up to this many times its images (repeated), so --target-size may exceed them."""


@dataclass
class CurateConfig:
    pool: str = ""
    """The uncurated images: a folder or a dataset string."""
    seed_set: str = ""
    """Optional curated images to retrieve around."""
    eval_sets: list[str] = field(default_factory=list)
    """Evaluation images that no pretraining image may copy."""
    target_size: int = 0
    """Images in the curated set; 0 = all that dedup (and retrieval) leave."""
    model: str = ""
    """Hub name of the embedding backbone (unless config_file); empty: the training run's config.yaml beside a
    teacher_checkpoint.pth given as weights, else dinov2_vits14."""
    config_file: str = ""
    """A training config.yaml whose backbone embeds (with weights)."""
    weights: str = ""
    """Backbone weights for config_file (or to replace the hub model's)."""
    copy_model: str = ""
    copy_config_file: str = ""
    copy_weights: str = ""
    """Another backbone for the copy-detection descriptor (embed.copy=model)."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def make_config(base: dict | None = None, overrides: Sequence[str] = (),
                source: str = "the curation settings") -> CurateConfig:
    """A checked :class:`CurateConfig` from ``base`` (e.g. the saved one; ``source`` names it) and ``key=value``
    overrides.

    Keys and types are checked as the training config's are (one line naming the key and the closest known one).
    """
    cfg = merge_checked(OmegaConf.structured(CurateConfig), base or {}, source, CurateConfig, NOUN)
    for text in overrides:
        cfg = merge_checked(cfg, override_to_dict(text, CurateConfig, "dedup.threshold=0.9"), f"override '{text}'",
                            CurateConfig, NOUN)
    config: CurateConfig = OmegaConf.to_object(cfg)
    _check(config)
    return config


def _check(c: CurateConfig) -> None:
    choices = {"embed.copy": (c.embed.copy, ("gem", "cls", "model")), "embed.storage": (c.embed.storage, ("float16", "float32")),
               "dedup.keep": (c.dedup.keep, ("largest", "first", "central")),
               "dedup.knn": (c.dedup.knn, ("auto", "exact", "faiss", "faiss-ivf")),
               "retrieve.mode": (c.retrieve.mode, ("sample", "cluster")), "cluster.sampling": (c.cluster.sampling, ("c", "r")),
               "cluster.metric": (c.cluster.metric, ("l2", "cos")), "sample.strategy": (c.sample.strategy, ("r", "c"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise DinokitError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    check_bounds({"embed.image_size": c.embed.image_size, "embed.batch_size": c.embed.batch_size,
                  "embed.shard_size": c.embed.shard_size, "dedup.k": c.dedup.k, "cluster.n_iters": c.cluster.n_iters,
                  "retrieve.per_cluster": c.retrieve.per_cluster, "retrieve.max_images": c.retrieve.max_images,
                  "cluster.n_clusters": c.cluster.n_clusters, "cluster.sample_size": c.cluster.sample_size,
                  "cluster.n_splits": c.cluster.n_splits, "sample.multiplier": c.sample.multiplier},
                 what="curate key", at_least=1)  # the lists: every level's value
    check_bounds({"embed.num_workers": c.embed.num_workers, "retrieve.k": c.retrieve.k,
                  "retrieve.n_clusters": c.retrieve.n_clusters, "retrieve.min_seed_images": c.retrieve.min_seed_images,
                  "cluster.seed": c.cluster.seed, "sample.seed": c.sample.seed,
                  "cluster.resampling_steps": c.cluster.resampling_steps}, what="curate key", at_least=0)
    check_seeds({"cluster.seed": c.cluster.seed, "sample.seed": c.sample.seed}, what="curate key")
    if c.embed.gem_p <= 0:  # GeM's 1/p power
        raise DinokitError(f"embed.gem_p must be above 0, not {c.embed.gem_p}; e.g. embed.gem_p=3")
    if c.target_size < 0:
        raise DinokitError(f"--target-size must be at least 1, not {c.target_size}; leave it out to keep every image "
                           "that dedup leaves")
    for key, value in (("dedup.threshold", c.dedup.threshold), ("dedup.eval_threshold", c.dedup.eval_threshold)):
        if not 0 < value <= 1:  # a cosine similarity: above 1 no pair is a copy, at or below 0 every pair is
            raise DinokitError(f"{key} is a cosine similarity in (0, 1], not {value}; e.g. {key}="
                               f"{DedupConfig.threshold if key == 'dedup.threshold' else DedupConfig.eval_threshold}")
    if c.dedup.knn in ("faiss", "faiss-ivf"):  # told now, not after the embed stage has run
        from .knn import faiss_available

        if not faiss_available():
            raise DinokitError(f"dedup.knn={c.dedup.knn} needs FAISS: pip install 'dinokit[faiss]' (or use "
                               "dedup.knn=exact)")
    if c.embed.copy == "model" and not (c.copy_model or c.copy_config_file):
        raise DinokitError("embed.copy=model needs --copy-model NAME or --copy-config-file CFG --copy-weights PATH")
    _check_levels(c.cluster)


def _check_levels(c: ClusterConfig) -> None:
    """The per-level lists against ``cluster.n_clusters``, told before the embed stage runs (they were found only
    when clustering began, hours later on a large pool)."""
    per_level = {"cluster.resampling_steps": c.resampling_steps, "cluster.sample_size": c.sample_size,
                 "cluster.n_splits": c.n_splits}
    given = {key: list(value) for key, value in per_level.items() if value}
    if given and not c.n_clusters:
        key = next(iter(given))
        raise DinokitError(f"{key} is given per level, but cluster.n_clusters is not (the levels are then sized from "
                           f"the pool); give cluster.n_clusters too, e.g. cluster.n_clusters=[1000,100]")
    for key, value in given.items():
        if len(value) != len(c.n_clusters):
            raise DinokitError(f"{key} has {len(value)} value(s) but cluster.n_clusters has {len(c.n_clusters)} "
                               "level(s); give one per level")
    from .kmeans import check_level_sizes

    check_level_sizes(c.n_clusters, list(c.n_splits) or [1] * len(c.n_clusters))


def to_dict(config: CurateConfig) -> dict:
    return asdict(config)
