"""The curation work folder: each stage's folder, its ``done.json`` record (the digest of the settings it ran
with, its counts, its time) and the checked reading of the arrays a finished stage left there. A damaged or edited
file (a record without its counts, a truncated array, indices outside the rows they index) is one line naming the
file and how to recompute it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import distributed as du
from ..config.loading import find_run_config
from ..data.images import decoding_settings
from ..engine.run_dir import flatten_settings
from ..errors import DinokitError
from ..files import atomic_write, read_npy
from .config import CurateConfig
from .embed import PATHS_FILE


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _identity(record: dict | None) -> str | None:
    """What a finished stage made, as its record says: the digest of its settings, counts, inputs, model files and
    the stage before it (not its time: a stage redone on the same inputs, e.g. with --force, keeps the ones after
    it). A record without model files (of a dinokit before 2026-12-08) keeps the identity it had."""
    if record is None:
        return None
    keys = ("digest", "counts", "inputs", "after", *(("files",) if "files" in record else ()))
    return _digest([record.get(k) for k in keys])


def _save_json(path: Path, obj: object) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))


def image_sets(config: CurateConfig) -> dict[str, str]:
    """Folder name (in ``WORK/embed``) -> dataset string of every image set to embed."""
    sets = {"pool": config.pool}
    if config.seed_set:
        sets["seed"] = config.seed_set
    sets.update({f"eval-{i}": s for i, s in enumerate(config.eval_sets)})
    return sets


def model_files(config: CurateConfig) -> dict[str, dict]:
    """What the embedding models read besides their names: each local weights file's size and modification time,
    each config file's content (a training run's ``config.yaml`` is rewritten as it resumes). The settings hold the
    paths only: weights retrained at the same path, or an edited config file, were embedded with the old ones."""
    files: dict[str, dict] = {}
    for prefix in ("", "copy_"):
        model, config_file, weights = (getattr(config, prefix + k) for k in ("model", "config_file", "weights"))
        if not (config_file or model) and weights and weights != "random":  # the run's config.yaml, found as the
            config_file = str(find_run_config(weights) or "")  # model is built (eval.setup.setup_eval_model)
        for key, value in ((prefix + "config_file", config_file), (prefix + "weights", weights)):
            path = Path(value).expanduser() if value else None
            if path is None or not path.is_file():
                continue  # a hub name, a URL, random init; a missing file is named when the model is built
            if key.endswith("config_file"):
                files[key] = {"path": str(path), "digest": _backbone_settings_digest(path)}
            else:
                stat = path.stat()
                files[key] = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return files


def _backbone_settings_digest(path: Path) -> str:
    """A digest of what a config file says of the backbone (its ``student`` and ``crops`` sections: the
    architecture and image size :func:`dinokit.eval.setup.setup_eval_model` builds), else of its bytes: a training
    run's ``config.yaml`` rewritten as it resumed with more epochs re-embedded the whole pool."""
    from omegaconf import OmegaConf

    try:
        tree = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # not YAML that OmegaConf reads: its building fails later, in one line
        tree = None
    if not isinstance(tree, dict) or "student" not in tree:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return _digest({k: tree.get(k) for k in ("student", "crops")})


def files_changed(earlier: dict | None, now: dict[str, dict]) -> str | None:
    """Which model files changed between two :func:`model_files` (None when ``earlier`` was not recorded): why a
    finished embed stage is out of date with the same settings."""
    if not isinstance(earlier, dict) or earlier == now:
        return None
    return ", ".join(k.replace("_", " ") for k in sorted(set(earlier) | set(now)) if earlier.get(k) != now.get(k))


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


# the stages in order: each reads the files of the one before it
ORDER = ("embed", "dedup", "retrieve", "cluster", "sample")

# the counts of a stage record that later stages read: a record without them is damaged
NEEDED_COUNTS: dict[str, dict] = {
    "cluster": {"ranks": lambda v: type(v) is int and v >= 1,
                "n_clusters": lambda v: isinstance(v, list) and len(v) > 0 and all(type(k) is int and k >= 1
                                                                                   for k in v)},
}


class Work:
    """The work folder: stage folders, their ``done.json`` markers and the saved settings."""

    def __init__(self, root: str | Path, config: CurateConfig) -> None:
        self.root = Path(root)
        self.config = config
        c = asdict(config)
        embed_keys = ("pool", "seed_set", "eval_sets", "model", "config_file", "weights", "copy_model",
                      "copy_config_file", "copy_weights", "embed")
        # each stage's own settings (recorded in done.json, to say what changed); the decoding settings of the
        # environment (image background...) change the embedded pixels too
        self.settings: dict[str, dict] = {
            "embed": {**{k: c[k] for k in embed_keys}, "decoding": decoding_settings()},
            "dedup": {"dedup": c["dedup"]}, "retrieve": {"retrieve": c["retrieve"]},
            "cluster": {"cluster": c["cluster"]}, "sample": {"sample": c["sample"], "target_size": c["target_size"]}}
        # what the features of an embedded set depend on (not which sets, workers or batch size): shards embedded
        # with the same are kept when the stage runs again (adding an evaluation set re-embedded the whole pool)
        features = {k: c[k] for k in ("model", "config_file", "weights", "copy_model", "copy_config_file",
                                      "copy_weights")}
        self.feature_digest = _digest({**features, "decoding": decoding_settings(),
                                       **{k: c["embed"][k] for k in ("image_size", "shard_size", "copy", "gem_p",
                                                                     "storage")}})
        self.model_files = model_files(config)  # recorded beside the digest: older records, without it, stay valid
        # a stage's digest holds the one of the stage before it: a change anywhere upstream redoes it. The embed
        # stage's leaves out how it runs (embed.batch_size, embed.num_workers: a change to them redid every stage);
        # records of a dinokit before 2026-12-08, whose digests hold them, stay valid (legacy)
        runs = ("batch_size", "num_workers")
        embeds = {**self.settings["embed"], "embed": {k: v for k, v in c["embed"].items() if k not in runs}}
        self.digests = self._chain(_digest(embeds), c)
        self.legacy_digests = self._chain(_digest(self.settings["embed"]), c)

    @staticmethod
    def _chain(embed: str, c: dict) -> dict[str, str]:
        digests = {"embed": embed}
        digests["dedup"] = _digest([digests["embed"], c["dedup"]])
        digests["retrieve"] = _digest([digests["dedup"], c["retrieve"]])
        digests["cluster"] = _digest([digests["retrieve"], c["cluster"]])
        digests["sample"] = _digest([digests["cluster"], c["sample"], c["target_size"]])
        return digests

    def folder(self, stage: str) -> Path:
        return self.root / stage

    def done(self, stage: str) -> dict | None:
        """The stage's record when it finished with the current settings, else None."""
        marker = self.folder(stage) / "done.json"
        if not marker.is_file():
            return None
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            record = None
        fix = f"delete it and rerun 'dinokit curate {stage}' (or 'dinokit curate run') to redo that stage"
        if not (isinstance(record, dict) and isinstance(record.get("seconds"), (int, float))
                and isinstance(record.get("counts"), dict) and "digest" in record):
            raise DinokitError(f"{marker} is damaged (not a stage record); {fix}")
        for key, valid in NEEDED_COUNTS.get(stage, {}).items():  # what the later stages read from the record
            if key not in record["counts"]:
                raise DinokitError(f"{marker} is damaged (its counts lack {key!r}); {fix}")
            if not valid(record["counts"][key]):
                raise DinokitError(f"{marker} is damaged (its {key!r} is {record['counts'][key]!r}); {fix}")
        if record["digest"] not in (self.digests.get(stage), self.legacy_digests.get(stage)):
            return None
        # what the stage before it made (a redone stage with the same settings, on a changed pool, made other files)
        upstream = self._upstream(stage)
        if "after" not in record:  # a record of a dinokit before 2026-12-07: kept unless the one before it is newer
            return record if upstream is None or "after" not in upstream else None
        return record if record["after"] == _identity(upstream) else None

    def _upstream(self, stage: str) -> dict | None:
        """The record of the stage before ``stage`` as it is now; None for the first stage or one not finished."""
        if stage not in ORDER or stage == ORDER[0]:
            return None
        marker = self.folder(ORDER[ORDER.index(stage) - 1]) / "done.json"
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def load(self, stage: str, name: str, ndim: int = 1, *, rows_of: int | None = None,
             length: int | None = None) -> np.ndarray:
        """The array ``name`` of a finished stage; a damaged file (truncated, a pickle: never run) is one line. With
        ``rows_of``, the array holds row indices of a table of that many rows: integers in ``0..rows_of-1`` (an
        edited index file would read other images, or stop in an IndexError); with ``length``, it has that many
        entries (along its last axis)."""
        path, fix = self.folder(stage) / name, f"rerun 'dinokit curate {stage} --force' to recompute it"
        array = read_npy(path, f"curate file {path}", fix)
        if array.ndim != ndim or array.dtype.kind not in "iuf":
            raise DinokitError(f"curate file {path} holds a {array.dtype} array of shape {array.shape}, not {ndim}-D "
                               f"numbers; {fix}")
        if length is not None and array.shape[-1] != length:
            raise DinokitError(f"curate file {path} holds {array.shape[-1]} entries where {length} are expected; {fix}")
        if rows_of is not None:
            check_indices(array if ndim == 1 else array[0], rows_of, f"curate file {path}", fix)
            if ndim == 1:
                array = array.astype(np.int64, copy=False)  # whole numbers saved as floats: usable as indices
        return array

    def changed(self, stage: str) -> str | None:
        """Why a stage that finished earlier (its ``done.json`` is there) runs again; None when it never finished."""
        marker = self.folder(stage) / "done.json"
        if not marker.is_file():
            return None
        earlier = json.loads(marker.read_text()).get("settings")  # checked by done() before
        if not isinstance(earlier, dict):  # digests are the same as then: a setting changed, here or before
            return ("its settings or those of a stage before it changed (its record, from a dinokit before "
                    "2026-12-07, does not say which)")
        before, now = ({k: json.dumps(v, sort_keys=True, default=str)  # as JSON text: None, NaN, lists as they read
                        for k, v in flatten_settings(t).items() if k} for t in (earlier, self.settings[stage]))
        diffs = [f"{k} {before.get(k, '(none)')} -> {now.get(k, '(none)')}" for k in sorted(set(before) | set(now))
                 if before.get(k) != now.get(k)]
        if not diffs:
            if json.loads(marker.read_text())["digest"] in (self.digests[stage], self.legacy_digests[stage]):
                return "the stage before it ran again"
            return "a stage before it changed"
        return "its settings changed (" + ", ".join(diffs[:3]) + (", ..." if len(diffs) > 3 else "") + ")"

    @contextmanager
    def running(self, stage: str) -> Iterator[None]:
        """While a stage runs: its earlier record is gone, so that a run killed in it never finds the stage (and the
        ones after it) done on files it had begun to rewrite. A killed re-embedding of a changed pool was skipped
        with every later stage, its manifest made of the earlier embeddings; a cluster stage killed while writing
        other settings' labels was skipped when the earlier settings came back. A stage that stops before writing
        anything (a damaged input: one line) gets its record back; one that finishes on the same inputs
        (``--force``) writes a record of the same identity, and the stages after it are kept."""
        marker = self.folder(stage) / "done.json"
        earlier = marker.read_bytes() if du.is_main_process() and marker.is_file() else None
        files = self._files(stage) if earlier is not None else None
        if du.is_main_process():
            marker.unlink(missing_ok=True)
        du.barrier()
        try:
            yield
        except BaseException:
            if earlier is not None and self._files(stage) == files:
                with atomic_write(marker) as tmp:
                    tmp.write_bytes(earlier)
            raise

    def _files(self, stage: str) -> dict[str, tuple[int, int]]:
        """Size and modification time of each file of a stage's folder but its record."""
        return {str(p): (st.st_size, st.st_mtime_ns) for p in sorted(self.folder(stage).rglob("*"))
                if p.name != "done.json" and p.is_file() and (st := p.stat())}

    def finish(self, stage: str, seconds: float, counts: dict) -> dict:
        record = {"digest": self.digests[stage], "seconds": round(seconds, 3), "counts": counts,
                  "settings": self.settings[stage], "after": _identity(self._upstream(stage))}
        if stage == "embed":  # the images embedded: a changed listing (same settings) redoes the stages after it
            record["files"] = self.model_files
            listings = {name: self.folder(stage) / name / PATHS_FILE for name in image_sets(self.config)}
            record["inputs"] = {name: _digest(path.read_bytes().decode("utf-8", "surrogateescape"))
                                for name, path in sorted(listings.items())}
        if du.is_main_process():
            _save_json(self.folder(stage) / "done.json", record)
        du.barrier()
        return record

    def need(self, stage: str) -> dict:
        record = self.done(stage)
        if record is None:
            raise DinokitError(f"stage {stage} has not finished in {self.root} with these settings; "
                               f"run 'dinokit curate {stage}' (or 'dinokit curate run') first")
        return record


def check_indices(values: np.ndarray, rows: int, what: str, fix: str) -> None:
    """One line naming ``what`` when ``values`` are not whole numbers in ``0..rows-1``."""
    bad = (values < 0) | (values >= rows) | (values != np.floor(values))
    if bad.any():
        first = values[bad][0]
        shown = int(first) if float(first).is_integer() else float(first)
        raise DinokitError(f"{what} holds {int(bad.sum())} index(es) outside 0..{rows - 1} (first: {shown}): it "
                           f"was edited or damaged; {fix}")
