"""``dinokit plot``: the PNG of a demo run's metrics, the series behind each panel, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dinokit.cli import main
from dinokit.plot import _prototypes, collect_series, plot_run, read_metrics

pytest.importorskip("matplotlib")


def test_plot_of_the_demo_run(demo_teacher, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plots" / "demo.png"
    assert main(["plot", str(demo_teacher.run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1300, 1080)  # 3 x 2 panels at 650 x 360 px
    lines = [json.loads(l) for l in (demo_teacher.run_dir / "training_metrics.json").read_text().splitlines()]
    panels = collect_series(read_metrics(demo_teacher.run_dir))
    assert set(panels) == {"losses", "optimiser", "teacher", "knn", "entropy", "collapse"}
    train = [l for l in lines if "total_loss" in l]
    assert panels["entropy"]["teacher_entropy"][1] == [l["teacher_entropy"] for l in train]  # logged by pretraining
    assert panels["losses"]["total_loss"] == ([l["iteration"] for l in train], [l["total_loss"] for l in train])
    assert set(panels["losses"]) == {k for k in train[0] if k.endswith("_loss")}
    assert panels["teacher"]["mom"][1] == [l["mom"] for l in train]
    knn = [l for l in lines if "knn_top1_k10" in l]
    assert panels["knn"]["knn_top1_k10"] == ([l["iteration"] for l in knn], [l["knn_top1_k10"] for l in knn])


def test_health_signals_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [
        {"iteration": 9, "total_loss": 5.0, "teacher_entropy": 3.0, "prototypes_used": 40, "cls_effective_rank": 9.5,
         "lr": 1e-3, "wd": 0.04},
        {"iteration": 19, "total_loss": 4.0, "teacher_entropy": float("nan"), "prototypes_used": 12},
    ]
    (tmp_path / "training_metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n{\"iteration\": 2")
    (tmp_path / "config.yaml").write_text("dino:\n  loss_weight: 1.0\n  head_n_prototypes: 256\nibot:\n  head_n_prototypes: 512\n")
    panels = collect_series(read_metrics(tmp_path))  # the cut-off last line is ignored
    assert panels["entropy"] == {"teacher_entropy": ([9], [3.0])}  # NaN dropped
    assert panels["collapse"] == {"prototypes_used": ([9, 19], [40.0, 12.0]), "cls_effective_rank": ([9], [9.5])}
    from matplotlib.figure import Figure

    drawn, original_savefig = [], Figure.savefig

    def savefig(fig, *args, **kwargs):
        drawn.append(fig)
        return original_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    out = plot_run(tmp_path)
    assert out == tmp_path / "training_metrics.png" and out.stat().st_size > 0
    # every panel spans the run from iteration 0, also one whose series has a single point (seen: a k-NN panel
    # spanning 190-210, and a 20-iteration dense run's one logged step spanning 18-20)
    spans = {tuple(round(v, 6) for v in ax.get_xlim()) for ax in drawn[0].axes}
    assert spans == {(-0.57, 19 + 0.57)}, spans
    # a series of one point has a marker, or it is not drawn at all (seen: the weight decay of a short run)
    assert all(len(line.get_xdata()) > 1 or line.get_marker() not in (None, "None", "")
               for ax in drawn[0].axes for line in ax.get_lines())
    assert _prototypes(tmp_path) == 256  # K of the DINO head (for the log K line), not the iBOT head's
    # several students: their k-NN lines are "<student>/knn_top1_k20" (the panel was missing)
    students = collect_series([{"iteration": 4, "femto/knn_top1_k20": 25.0, "pico/knn_top1_k20": 20.0,
                                "femto/dino_local_crops_loss": 4.1}])
    assert students["knn"] == {"femto/knn_top1_k20": ([4], [25.0]), "pico/knn_top1_k20": ([4], [20.0])}
    assert students["losses"] == {"femto/dino_local_crops_loss": ([4], [4.1])}
    # dense heads' validation lines and a stage's backbone lr (neither was drawn)
    dense = collect_series([{"iteration": 9, "val_mIoU": 30.0, "val_aAcc": 80.0, "backbone_lr": 1e-5},
                            {"iteration": 9, "val_rmse": 0.5, "val_abs_rel": 0.1, "val_delta1": 0.9}])
    assert dense["knn"] == {"val_mIoU": ([9], [30.0]), "val_aAcc": ([9], [80.0])}
    assert dense["depth"] == {"val_rmse": ([9], [0.5]), "val_abs_rel": ([9], [0.1]), "val_delta1": ([9], [0.9])}
    assert dense["optimiser"] == {"backbone_lr": ([9], [1e-5])}


def test_plot_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    assert f"error: no training_metrics.json at '{tmp_path / 'training_metrics.json'}'; pass the output folder" \
        in capsys.readouterr().err
    (tmp_path / "training_metrics.json").write_text('{"iteration": 1, "total_loss": 1.0}\n')
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "error: the plot is a PNG: name the output *.png, not 'x.jpg'" in capsys.readouterr().err


def test_plot_tells_a_corrupt_metrics_file_from_an_empty_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """F28: a file of garbage said "holds no metrics yet"; it is not a metrics file at all."""
    metrics = tmp_path / "training_metrics.json"
    not_metrics = (f"error: '{metrics}' is not a JSON-lines metrics file (one JSON object with an 'iteration' per "
                   "line); pass the output folder of a dinokit training run\n")
    not_yet = f"error: '{metrics}' holds no metrics yet; plot it once the run has logged\n"
    cases = [(b"garbage\n", not_metrics), (bytes(range(256)), not_metrics), (b'{"epoch": 3}\n', not_metrics),
             (b"", not_yet), (b"\n\n", not_yet), (b'{"iteration": 0, "total_lo', not_yet)]  # the last: being written
    for content, expected in cases:
        metrics.write_bytes(content)
        assert main(["plot", str(tmp_path)]) == 2
        assert capsys.readouterr().err == expected, content
    assert not (tmp_path / "training_metrics.png").exists()
    config = tmp_path / "config.yaml"  # the run's config passed for its folder: not a damaged metrics file
    config.write_text("train:\n  seed: 0\n")
    assert main(["plot", str(config)]) == 2
    assert capsys.readouterr().err == not_metrics.replace(str(metrics), str(config))
    metrics.write_text('{"iteration": 0, "total_loss": 1.0}\ngarbage\n{"iteration": 1, "total_loss": 0.9}\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: line 2 of '{metrics}' is not JSON; the metrics file is damaged\n"
    for written, shown in (('"x"', "'x'"), ("null", "None")):  # a traceback before
        metrics.write_text('{"iteration": 0, "total_loss": 1.0}\n{"iteration": ' + written + '}\n')
        assert main(["plot", str(tmp_path)]) == 2
        assert capsys.readouterr().err == (f"error: line 2 of '{metrics}' has iteration {shown}, not a number; the "
                                           "metrics file is damaged\n")
