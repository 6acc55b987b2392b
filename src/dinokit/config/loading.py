"""Loading training configurations: the official DINOv2 key tree, presets, files and overrides.

The schema (``schema.py``) mirrors ``dinov2/configs/ssl_default_config.yaml`` key for key, with the official
defaults, so official YAML files and the ``config.yaml`` of earlier runs load unchanged. Keys marked
*dinokit* are additions. :func:`load_config` merges, in order, the defaults, a preset or YAML file and
dotted ``key=value`` overrides; OmegaConf checks every key and type against the schema, and every
mistake becomes a one-line :class:`DinokitError` naming the full dotted key.

Components should take their own section (``cfg.optim``, ``cfg.crops``...), never the whole tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..devices import DTYPES, resolve_dtype  # noqa: F401  (re-exported by dinokit.config)
from ..errors import DinokitError
from ..files import atomic_write
from .schema import SSLConfig
from ..engine.optim import scale_lr
from . import sources as _sources
from .sources import no_settings, parse_yaml, read_config_text
from .validation import validate

list_presets = _sources.list_presets  # re-exported by dinokit.config (presets live in sources.py)

# ---------------------------------------------------------------------------------------------------
# Schema introspection (for error messages and for parsing overrides by field type)
# ---------------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section(tp: Any) -> Any:
    """The dataclass of a section annotation (also ``Section | None``), else None."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    args = [a for a in args if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _field_type(path: str, root: type | None = None) -> Any:
    """The annotation of the dotted ``path`` in the schema ``root`` (default: the training config; a list index
    like ``[1]`` gives the item type), or None."""
    tp: Any = root or SSLConfig
    for part in path.split("."):
        match = re.fullmatch(r"([^\[]*)(\[\d+\])?", part)
        section = _section(tp)
        if match is None or section is None or match[1] not in _hints(section):
            return None
        tp = _hints(section)[match[1]]
        if match[2]:
            tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
    return tp


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if typing.get_origin(tp) is list and typing.get_origin(typing.get_args(tp)[0]) is dict:
        return "a list of mappings ([{name: value, ...}, ...])"
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return "a mapping of names to values ({name: value, ...})"
    if dataclasses.is_dataclass(tp):
        return "a section of keys (" + ", ".join(_hints(tp)) + ")"
    return getattr(tp, "__name__", str(tp))


@functools.cache
def _all_keys(root: type | None = None) -> tuple[str, ...]:
    def walk(cls: type, prefix: str) -> list[str]:
        keys = []
        for name, tp in _hints(cls).items():
            keys.append(prefix + name)
            if _section(tp):
                keys += walk(_section(tp), f"{prefix}{name}.")
        return keys

    return tuple(walk(root or SSLConfig, ""))


def key_hint(path: str, root: type | None = None) -> str:
    """What to tell about the unknown dotted key ``path`` of the schema ``root`` (default: the training config):
    a close name in the same section, else a very close one at the same depth (train.epochs -> optim.epochs), else
    in any section (threshold -> dedup.threshold); else the section's keys."""
    root = root or SSLConfig
    parent, _, leaf = path.rpartition(".")
    section = _section(_field_type(parent, root)) if parent else root
    every = _all_keys(root)
    same_depth = [k for k in every if k.count(".") == path.count(".")]
    siblings = [k for k in same_depth if k.rpartition(".")[0] == parent]
    close = None
    for keys, cutoff in ((siblings, 0.6), (same_depth, 0.8), (every, 0.8)):
        leaves = {k.rpartition(".")[2].lower(): k for k in keys}
        match = difflib.get_close_matches(leaf.lower(), list(leaves), n=1, cutoff=cutoff)
        close = close or (leaves[match[0]] if match else None)
    if close:
        return f"did you mean '{close}'?"
    if section:
        top = "sections: " if all(_section(tp) for tp in _hints(section).values()) else "top-level keys: "
        return (f"keys of '{parent}': " if parent else top) + ", ".join(_hints(section))
    return f"'{parent}' is a value, not a section"


def _unknown_key(path: str, source: str, root: type, noun: str) -> DinokitError:
    return DinokitError(f"unknown {noun} '{path}' ({key_hint(path, root)}), in {source}")


def _format_value(value: Any) -> str:
    if value is None:
        return "null"
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return repr(value)


def _check_keys(data: dict, cls: type, prefix: str, source: str, root: type, noun: str,
                blanks: frozenset[str] = frozenset()) -> dict:
    """``data`` checked for unknown keys, null or scalars given to sections, list items of the wrong kind and
    interpolations, with full dotted keys in the errors.

    A section ``| None`` may be null (e.g. no k-NN); any other must not, except when left blank in a YAML file
    (``evaluation:`` with its keys commented out, in ``blanks``): it is then dropped, YAML's way to say "empty".
    """
    checked = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        tp = _hints(cls).get(str(key))
        if tp is None:
            raise _unknown_key(path, source, root, noun)
        section = _section(tp)
        if isinstance(value, dict) and value and not section:
            raise _unknown_key(f"{path}.{next(iter(value))}", source, root, noun)
        if section and isinstance(value, dict):
            value = _check_keys(value, section, path + ".", source, root, noun, blanks)
        elif section and value is None and section is tp and path in blanks:
            continue
        elif section and value is None and section is tp:  # optim=null: a section cannot be "nothing"
            keys = ", ".join(list(_hints(section))[:3])
            raise DinokitError(f"{noun} '{path}' is null, in {source}; it is a section of keys ({keys}, ...): give "
                               "some of them or leave it out")
        elif section and value is not None:
            raise DinokitError(f"{noun} '{path}' expects {_describe(tp)}, got {_format_value(value)}, in {source}")
        else:
            _check_value(value, tp, path, source, noun)
        checked[key] = value
    return checked


def _check_value(value: Any, tp: Any, path: str, source: str, noun: str) -> None:
    """The items of a list field that OmegaConf lets through (a list or mapping in a list of numbers, anything but
    a mapping where mappings are due, a null item) and interpolations anywhere in ``value``: one line each."""
    if isinstance(value, str) and "${" in value:  # OmegaConf would resolve it on access: a traceback, or a surprise
        raise DinokitError(f"{noun} '{path}' is {value!r}, in {source}: interpolations (${{...}}) are not supported; "
                           "write the value itself (on the command line the shell expands \"$VAR\")")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_value(item, Any, f"{path}.{key}", source, noun)
    if not isinstance(value, list):
        return
    item_tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else Any
    optional = item_tp is Any or type(None) in typing.get_args(item_tp)
    for i, item in enumerate(value):
        wrong = item is None and not optional
        wrong |= item_tp in (int, float, str, bool) and isinstance(item, (list, dict))
        wrong |= typing.get_origin(item_tp) is dict and item is not None and not (
            isinstance(item, dict) and all(isinstance(k, str) for k in item))
        if wrong:
            raise DinokitError(f"{noun} '{path}[{i}]' expects {_describe(item_tp)}, got {_format_value(item)}, in "
                               f"{source}")
        _check_value(item, item_tp, f"{path}[{i}]", source, noun)


def merge_checked(cfg: DictConfig, data: Any, source: str, root: type = SSLConfig, noun: str = "config key",
                  blanks: frozenset[str] = frozenset()) -> DictConfig:
    """``cfg`` (a structured config of the dataclass ``root``) with ``data`` merged in; an unknown key (with the
    closest known one), a value given to a section or of the wrong type is one line naming the ``noun`` and
    ``source``. ``blanks``: the keys a YAML file left blank. The training config and the curation settings load
    through this."""
    if data is None:
        return cfg
    if not isinstance(data, dict):
        raise DinokitError(f"{source} must hold a mapping of config sections, got {_format_value(data)}")
    data = _check_keys(data, root, "", source, root, noun, frozenset(blanks))
    try:
        return typing.cast(DictConfig, OmegaConf.merge(cfg, data))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        if not key:
            raise DinokitError(f"invalid config in {source}: {str(err).splitlines()[0]}") from err
        expected = _describe(_field_type(key, root))
        got = _format_value(err.value)
        raise DinokitError(f"{noun} '{key}' expects {expected}, got {got}, in {source}") from err


# ---------------------------------------------------------------------------------------------------
# Presets, files and overrides
# ---------------------------------------------------------------------------------------------------

def _parse_value(raw: str, tp: Any, key: str, source: str) -> Any:
    """Parse an override value: YAML scalars/lists, except that string fields take the text as is."""
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    if tp in (str, str | None) and not quoted:
        return None if raw in ("null", "~") else raw
    try:
        value = parse_yaml(raw, source, key) if raw else ""
    except yaml.YAMLError:
        return raw
    return value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else raw


def _holds_missing_mark(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_holds_missing_mark(v) for v in value.values())
    return any(_holds_missing_mark(v) for v in value) if isinstance(value, list) else value == MISSING_VALUE


def override_to_dict(text: str, root: type = SSLConfig, example: str = "optim.epochs=2") -> dict:
    """A ``key=value`` override of the schema ``root`` as a nested mapping (values typed by the key's field)."""
    key, sep, raw = text.partition("=")  # the first "=": values like "Sample:split=TRAIN" keep theirs
    key = key.strip()
    if not sep or not key:
        raise DinokitError(f"override '{text}' is not key=value; write e.g. {example}")
    nested: Any = _parse_value(raw.strip(), _field_type(key, root), key, f"override '{text}'")
    if _holds_missing_mark(nested):  # a merge never writes "???": the override would silently do nothing
        raise DinokitError(f"override '{text}' gives {MISSING_VALUE}, the mark of a value a config file leaves to the "
                           f"command line; give {key} a value")
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def load_config(config_file: str | Path | Sequence[str | Path] | None, overrides: Sequence[str] = (), *,
                to_train: bool = True) -> DictConfig:
    """Defaults <- ``config_file`` (preset name or YAML path; a list merges each in turn, so a file of a few keys
    can extend a preset; None = defaults only) <- ``key=value`` overrides.

    The result is validated (:func:`validate`); ``optim.lr`` is not scaled yet (see :func:`apply_scaling_rules`).
    A key a file marks ``???`` must be given by a later file or an override when the config is ``to_train`` (e.g.
    the run a high-resolution stage starts from); a config read for its architecture only (evaluation) keeps the
    default.
    """
    cfg = OmegaConf.structured(SSLConfig)
    files = [config_file] if isinstance(config_file, (str, Path)) else list(config_file or ())
    files = [file for file in files if file]  # "" or None: the defaults
    sources = []
    for file in files:
        text, source = read_config_text(file)
        blanks: set[str] = set()
        try:
            data = parse_yaml(text, source, blanks=blanks)
        except yaml.YAMLError as err:
            first = str(err).replace("\n", " ")
            raise DinokitError(f"{source} is not valid YAML ({first}); fix the file") from err
        if error := no_settings(data, source, blanks):
            raise error
        cfg = merge_checked(cfg, data, source, blanks=frozenset(blanks))
        # a merge never replaces a value by "???": mark the file's "???" keys missing explicitly
        for key in OmegaConf.missing_keys(OmegaConf.create(data)) if to_train else ():
            OmegaConf.update(cfg, key, MISSING_VALUE, merge=False)
        sources.append(source)
    source = " + ".join(sources) or "the defaults"
    for text in overrides:
        if text.partition("=")[0].strip() == "optim.lr":  # as in the official code, scaling overwrites it
            raise DinokitError(f"override '{text}': optim.lr is computed from optim.base_lr for the total batch "
                               "(optim.scaling_rule), so a value given for it would be ignored; set optim.base_lr")
        cfg = merge_checked(cfg, override_to_dict(text), f"override '{text}'")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        given = " ".join(f"{key}=..." for key in missing)
        raise DinokitError(f"{source} needs a value for {', '.join(missing)} (marked {MISSING_VALUE}): add {given} "
                           "to the command")
    validate(cfg)
    return cfg


MISSING_VALUE = "???"  # OmegaConf's mark of a mandatory value: a preset's way to say "the user must give this"


def find_run_config(weights: str | Path) -> Path | None:
    """The ``config.yaml`` of the run that wrote ``RUN/[subdir/]eval/<tag>/teacher_checkpoint.pth`` (or beside it)."""
    path = Path(weights).expanduser()
    for parent in list(path.parents)[:3]:
        if (parent / "config.yaml").is_file():
            return parent / "config.yaml"
    return None


def write_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """Write the resolved ``cfg`` to ``output_dir/config.yaml`` (loadable by :func:`load_config`)."""
    path = Path(output_dir) / "config.yaml"
    try:
        data = OmegaConf.to_yaml(cfg, resolve=True).encode("utf-8")
    except UnicodeEncodeError:  # a path with a name that is not UTF-8 (its bytes as surrogates): YAML holds Unicode
        from ..engine.run_dir import flatten_settings

        key, value = next(((k, v) for k, v in flatten_settings(OmegaConf.to_container(cfg, resolve=True)).items()
                           if isinstance(v, str) and any("\ud800" <= c <= "\udfff" for c in v)), ("?", "?"))
        shown = value.encode(errors="backslashreplace").decode()
        raise DinokitError(f"{key} holds a file name that is not UTF-8 ({shown}), which config.yaml cannot hold; "
                           "rename it to UTF-8 (e.g. with convmv) or give a path without it") from None
    with atomic_write(path) as tmp:  # a crash never leaves a half-written config next to a run
        tmp.write_bytes(data)
    return path


def as_dataclass(cfg: DictConfig) -> SSLConfig:
    """The typed :class:`SSLConfig` instance of ``cfg`` (attribute access checked by type checkers)."""
    return typing.cast(SSLConfig, OmegaConf.to_object(cfg))


# ---------------------------------------------------------------------------------------------------
# Learning-rate scaling and compute dtype
# ---------------------------------------------------------------------------------------------------


def apply_scaling_rules(cfg: DictConfig, world_size: int) -> DictConfig:
    """Set ``optim.lr`` from ``optim.base_lr`` for ``batch_size_per_gpu * world_size`` images (in place).

    ``sqrt_wrt_1024`` (official): ``base_lr * sqrt(total / 1024)``; ``linear_wrt_256``; ``none`` = base_lr. With
    ``optim.lr_schedule`` its highest value is scaled instead (the lr it reaches: base_lr does not act).
    """
    total = cfg.train.batch_size_per_gpu * world_size
    schedule = cfg.optim.lr_schedule
    base = cfg.optim.base_lr if schedule is None else max(schedule.start, schedule.peak, schedule.end)
    cfg.optim.lr = scale_lr(base, total, cfg.optim.scaling_rule)
    return cfg


def compute_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The autocast dtype for ``compute_precision.dtype``: ``auto`` = bf16 on CUDA (fp16 without bf16), else fp32."""
    return resolve_dtype(name, device, key="config key 'compute_precision.dtype'")