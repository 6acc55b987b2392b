"""``dinokit models``: the named models, their size and their official weights."""

from __future__ import annotations

import argparse

from ..models.registry import ALIASES, count_parameters, list_models, model_info


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the model names (official DINOv2 hub variants)",
        description="List the models accepted by --model, create_model() and torch.hub.load(). "
        "Weights are downloaded once into the torch.hub cache when first used.",
    )
    p.set_defaults(func=run)


def models_table() -> str:
    """A plain-text table: name, architecture, parameters, registers, official weights URL."""
    rows = [("name", "architecture", "params", "registers", "weights")]
    for name in list_models():
        info = model_info(name)
        url = info.head_urls[4] + " (+ backbone)" if info.is_classifier else info.backbone_url
        rows.append((name, info.arch, f"{count_parameters(name):,}", str(info.num_register_tokens), url))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    aliases = ", ".join(f"{alias} = {name}" for alias, name in ALIASES.items())
    lines += [
        "",
        "_lc models: backbone + linear ImageNet-1k head over the last 4 blocks (layers=4, shown) or 1 (layers=1).",
        f"aliases (mmpretrain names): {aliases}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(models_table())
    return 0
