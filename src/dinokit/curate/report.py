"""The curation report: ``WORK/report.json`` (counts and seconds per stage) and ``WORK/report.html``.

The HTML page stands alone (images inlined): the counts, the cluster sizes before and after sampling
(sorted, as bar charts: a balanced sample flattens the long tail's head), and thumbnails of a few random
clusters, of the largest groups of copies (the kept image first, outlined), of pool images dropped as
copies of evaluation images, and of the curated sample.
"""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np

from ..data.images import load_image
from ..files import atomic_write
from .embed import EmbeddingStore

THUMB = 72
COUNT_KEYS = ("pool", "unreadable", "after_dedup", "after_eval_dedup", "retrieved", "sampled", "sampled_distinct")


def _thumb(path: str) -> str:
    try:
        image = load_image(path)
    except Exception:  # a thumbnail is never worth failing the report for
        return f'<span class="bad" title="{html.escape(path)}">unreadable</span>'
    image.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=80)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img src="data:image/jpeg;base64,{data}" title="{html.escape(path)}">'


def _row(paths: list[str], first_kept: bool = False) -> str:
    cells = [_thumb(p) for p in paths]
    if first_kept and cells:
        cells[0] = f'<span class="kept">{cells[0]}</span>'
    return f'<div class="row">{"".join(cells)}</div>'


def _bars(values: np.ndarray, title: str, width: int = 640, height: int = 120) -> str:
    """An inline SVG bar chart of ``values`` sorted largest first."""
    values = np.sort(np.asarray(values))[::-1]
    if not len(values):
        return ""
    top = max(int(values.max()), 1)
    w = width / len(values)
    bars = "".join(
        f'<rect x="{i * w:.2f}" y="{height - v / top * height:.2f}" width="{max(w - 0.5, 0.5):.2f}" '
        f'height="{v / top * height:.2f}"/>' for i, v in enumerate(values)
    )
    return (f"<h3>{html.escape(title)}</h3><p>{len(values)} clusters, largest {top}, smallest {int(values.min())}</p>"
            f'<svg width="{width}" height="{height}" style="fill:#4a7">{bars}</svg>')


def write_report(work) -> dict:
    """Write ``report.json`` and ``report.html`` from the finished stages' records; returns the JSON."""
    from .. import distributed as du

    stages = ("embed", "dedup", "retrieve", "cluster", "sample")
    records = {s: work.done(s) for s in stages}
    counts: dict = {k: None for k in COUNT_KEYS}
    for record in records.values():
        if record:
            counts.update({k: v for k, v in record["counts"].items() if k in COUNT_KEYS})
    report = {
        "counts": counts,
        "seconds": {s: r["seconds"] for s, r in records.items() if r},
        "clusters": records["cluster"]["counts"] if records["cluster"] else None,
        "manifest": str((work.root / "manifest.txt").resolve()) if records["sample"] else None,
    }
    if du.is_main_process():
        page = _html(work, report)  # reads the stages' files: a damaged one is told before anything is written
        for name, text in (("report.json", json.dumps(report, indent=1)), ("report.html", page)):
            with atomic_write(work.root / name) as tmp:  # a killed run leaves the old report, not half of one
                # UTF-8 whatever the locale; a file name that is not UTF-8 shows a replacement character (it was a
                # traceback after the sample stage)
                tmp.write_text(text, encoding="utf-8", errors="replace")
    du.barrier()
    return report


def _html(work, report: dict) -> str:
    rng = np.random.default_rng(0)
    parts = ["<html><head><meta charset='utf-8'><title>dinokit curate report</title><style>",
             "body{font-family:sans-serif;margin:2em} img{margin:1px} .row{margin:4px 0}",
             ".kept img{outline:3px solid #4a7} td,th{padding:2px 10px;text-align:right}</style></head><body>",
             "<h1>Curation report</h1><table><tr><th>stage</th><th>images</th></tr>"]
    for key, value in report["counts"].items():
        parts.append(f"<tr><td>{key}</td><td>{'-' if value is None else value}</td></tr>")
    parts.append("</table><p>seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()) + "</p>")
    embed_dir = work.folder("embed") / "pool"
    if not (embed_dir / "paths.txt").is_file():
        return "".join(parts) + "</body></html>"
    pool = EmbeddingStore(embed_dir)
    dedup = work.folder("dedup")
    if (dedup / "components.npy").is_file():
        labels = work.load("dedup", "components.npy", rows_of=len(pool), length=len(pool))
        kept = set(work.load("dedup", "kept.npy", rows_of=len(pool)).tolist())
        sizes = np.bincount(labels)
        parts.append("<h2>Largest groups of copies (kept image outlined)</h2>")
        for root in np.argsort(-sizes, kind="stable")[:6]:
            if sizes[root] < 2:
                break
            members = sorted(np.nonzero(labels == root)[0].tolist(), key=lambda m: m not in kept)[:12]
            parts.append(_row(pool.row_paths(np.array(members)), first_kept=True))
        removed = work.load("dedup", "eval_removed.npy", rows_of=len(pool))
        if len(removed):
            parts.append(f"<h2>Dropped as copies of evaluation images ({len(removed)})</h2>")
            parts.append(_row(pool.row_paths(np.sort(rng.permutation(removed)[:16]))))
    if report["clusters"] and (work.folder("sample") / "chosen.npy").is_file():
        from .pipeline import load_leaves

        selected = work.load("retrieve", "selected.npy", rows_of=len(pool))
        leaf, _, _ = load_leaves(work, len(selected))
        chosen = work.load("sample", "chosen.npy", rows_of=len(selected))
        n_leaves = int(leaf.max()) + 1
        parts.append("<h2>Cluster sizes (level 1)</h2>")
        parts.append(_bars(np.bincount(leaf, minlength=n_leaves), "before sampling"))
        parts.append(_bars(np.bincount(leaf[chosen], minlength=n_leaves), "after sampling"))
        parts.append("<h2>Random clusters</h2>")
        for c in rng.permutation(n_leaves)[:6]:
            members = np.nonzero(leaf == c)[0]
            members = np.sort(rng.permutation(members)[:12])
            parts.append(f"<p>cluster {c} ({int((leaf == c).sum())} images)</p>" + _row(pool.row_paths(selected[members])))
        distinct = np.unique(chosen)  # sample.multiplier repeats images
        repeats = f", {len(distinct)} distinct" if len(distinct) < len(chosen) else ""
        parts.append(f"<h2>Random images of the sample ({len(chosen)}{repeats})</h2>")
        parts.append(_row(pool.row_paths(selected[np.sort(rng.permutation(distinct)[:32])])))
    return "".join(parts) + "</body></html>"
