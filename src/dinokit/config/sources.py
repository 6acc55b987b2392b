"""Where a training configuration's text comes from (a preset or a YAML file) and how it is read: PyYAML's safe
loader, made strict where it is silent. A key given twice in one mapping (PyYAML keeps the last) and a file that
holds no settings are one-line :class:`DinokitError`\\ s naming the source; ``loading.py`` merges what is read.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import DinokitError

_PRESET_DIRS = ("train", "eval")
_DEFAULT_NAME = "ssl_default_config"


def _configs_root() -> Any:
    return resources.files("dinokit") / "configs"


def list_presets() -> list[str]:
    """Names accepted by :func:`~dinokit.config.load_config`, e.g. ``train/demo`` (``demo`` works too)."""
    names = []
    for folder in _PRESET_DIRS:  # training presets first
        stems = (e.name.removesuffix(".yaml") for e in (_configs_root() / folder).iterdir() if e.name.endswith(".yaml"))
        names += [f"{folder}/{stem}" for stem in sorted(stems)]
    return names


def read_config_text(config_file: str | Path) -> tuple[str, str]:
    """(YAML text, description for messages) of a file path or preset name."""
    config_file = str(config_file)
    path = Path(config_file).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(65536)
        try:
            text, why = (None, "") if b"\0" in head else (path.read_text(encoding="utf-8"), "")
        except UnicodeDecodeError as err:
            text, why = None, f" (not UTF-8: byte 0x{err.object[err.start]:02x} at position {err.start})"
        if text is None:  # a checkpoint, an image, an archive, a file in another encoding
            if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save archive, pickle
                fix = ("it looks like a checkpoint: weights go to --weights, --pretrained-weights or "
                       "student.pretrained_weights, not --config-file")
            else:
                fix = "give a YAML file saved as UTF-8"
            raise DinokitError(f"config file '{config_file}' is not a text YAML file{why}; {fix}")
        return text, f"config file '{config_file}'"
    name = config_file.removesuffix(".yaml")
    presets = list_presets()
    candidates = [name] + [f"{folder}/{name}" for folder in _PRESET_DIRS]
    for candidate in candidates:
        if candidate in presets or candidate in (_DEFAULT_NAME, "default"):
            stem = _DEFAULT_NAME if candidate == "default" else candidate
            return (_configs_root() / f"{stem}.yaml").read_text(encoding="utf-8"), f"preset '{candidate}'"
    short = ", ".join(p.split("/", 1)[1] for p in presets)
    raise DinokitError(f"config '{config_file}' is neither a YAML file nor a preset; presets: {short}")


@functools.cache
def yaml_loader() -> type:
    """A safe loader that also reads ``1e-5`` as a float, as OmegaConf does (YAML 1.1 needs ``1.0e-5``)."""

    class Loader(yaml.SafeLoader):
        pass

    float_re = re.compile(r"^[-+]?(?:(?:\d[\d_]*\.\d*|\.\d+)(?:[eE][-+]?\d+)?|\d[\d_]*[eE][-+]?\d+)$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", float_re, list("-+0123456789."))
    return Loader


def parse_yaml(text: str, source: str, prefix: str = "", blanks: set[str] | None = None) -> Any:
    """The data of the YAML ``text`` (None when it holds nothing, e.g. only comments); a key repeated in one mapping
    is a :class:`DinokitError` naming ``source``, the dotted key (under ``prefix``) and its lines. Invalid YAML
    raises :class:`yaml.YAMLError` for the caller to word. ``blanks`` receives the dotted keys left blank
    (``evaluation:`` with its keys commented out), which read as null like an explicit ``null``."""
    loader = yaml_loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _walk(node, prefix, source, set(), set() if blanks is None else blanks)
        return loader.construct_document(node)
    except RecursionError:  # thousands of nested brackets: PyYAML recurses once per level
        raise DinokitError(f"{source} is nested too deeply to read (thousands of levels); a config needs a few, "
                           "fix the file") from None
    finally:
        loader.dispose()


def _walk(node: yaml.Node, path: str, source: str, seen: set[int], blanks: set[str]) -> None:
    """Refuse a key repeated in a mapping; note the blank values."""
    if id(node) in seen:  # an alias of a node already walked (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            child = path
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":  # "<<:" may be overridden
                child = f"{path}.{key.value}" if path else str(key.value)
                line = key.start_mark.line + 1
                if (key.tag, key.value) in lines:
                    first = lines[(key.tag, key.value)]
                    where = f" (lines {first} and {line})" if first != line else ""
                    raise DinokitError(f"{source} sets '{child}' twice{where}; keep one (YAML would silently use "
                                       "the last)")
                lines[(key.tag, key.value)] = line
                if isinstance(value, yaml.ScalarNode) and value.tag == "tag:yaml.org,2002:null" and not value.value:
                    blanks.add(child)
            _walk(value, child, source, seen, blanks)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, f"{path}[{i}]", source, seen, blanks)


def no_settings(data: Any, source: str, blanks: set[str] | frozenset[str] = frozenset()) -> DinokitError | None:
    """The error for the data of a config file that holds no settings (nothing, only comments, an empty mapping,
    sections left blank, a scalar or a list), else None."""
    if isinstance(data, dict) and data and not all(str(key) in blanks for key in data):
        return None
    if data is None or isinstance(data, dict):
        what = ("it is empty or only comments" if data is None else "its mapping is empty" if not data
                else f"its sections ({', '.join(map(str, data))}) are all blank")
    else:
        shown = repr(data) if len(repr(data)) <= 60 else repr(data)[:57] + "..."
        what = f"it holds {'a list' if isinstance(data, list) else 'a single value'} ({shown}), not config sections"
    return DinokitError(f"{source} holds no settings: {what}; write config sections as YAML (e.g. 'optim:' and "
                        "below it '  epochs: 10'), or leave the file out")
