"""The GPU speed scripts run end to end on the CPU with a tiny config, so that a GPU session spends its minutes
measuring, not debugging (``benchmarks/train_step.py``, ``benchmarks/embed.py``; the figures themselves need a
GPU)."""

from __future__ import annotations

import json
import math
import tempfile

import pytest
import torch

from dinokit.data import write_sample_dataset

from tiny import tiny_run


@pytest.fixture(scope="module")
def train_step(load_benchmark):
    return load_benchmark("train_step")


@pytest.mark.parametrize("source", ["synthetic", "pil", "device"])
def test_train_step_benchmark_runs_on_synthetic_and_real_data(train_step, source, tmp_path_factory, monkeypatch):
    scratch = tmp_path_factory.mktemp("scratch")
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the run's checkpoint folder goes here
    tiny = [o for o in tiny_run(batch=2) if not o.startswith("train.batch_size_per_gpu")]
    args = ["--device", "cpu", "--config", "demo", "--batch", "2", "--steps", "2"]
    if source != "synthetic":
        root = write_sample_dataset(tmp_path_factory.mktemp("bench"), counts={"train": 1, "val": 1}, image_size=40)
        args += ["--data", str(root / "train")]
    result = train_step.main([*args, *tiny, *([f"crops.augmentation={source}"] if source != "synthetic" else [])])
    assert result["data"] == source and result["images_per_s"] > 0 and math.isfinite(result["loss"])
    assert result["peak_mem_gb"] is None  # no CUDA memory figure on the CPU
    assert not any(scratch.iterdir())  # and it is removed: 427 of them once filled a disk


def test_train_step_benchmark_times_the_levers_side_by_side(train_step):
    tiny = [o for o in tiny_run(batch=2, local_crops=2) if not o.startswith("train.batch_size_per_gpu")]
    args = ["--device", "cpu", "--config", "demo", "--batch", "2", "--steps", "1", "--variants", "--chunk-rows", "7"]
    results = train_step.main([*args, *tiny])
    assert [r["variant"] for r in results] == ["plain", "packed", "chunked", "packed+chunked", "compiled loss",
                                               "packed+compiled loss", "checkpointed full", "checkpointed selective"]
    assert results[0]["vs_plain"] == 1.0 and all(r["vs_plain"] > 0 for r in results)
    assert [r["checkpointing"] for r in results[-3:]] == [None, "full", "selective"]
    # the same model, crops and steps: the levers change how the losses are computed, not their values
    for r in results[1:]:
        assert r["loss"] == pytest.approx(results[0]["loss"], rel=1e-4), r["variant"]


def test_embed_benchmark_times_the_model_alone_and_dinokit_embed_end_to_end(load_benchmark):
    """``benchmarks/embed.py`` (the ``embed`` within 85% of the model figure) on generated JPEGs, tiny model."""
    result = load_benchmark("embed").main(["--model", "dinov2_vits14", "--tiny", "--images", "10", "--batch", "4",
                                           "--workers", "0", "--image-size", "28", "--device", "cpu"])
    assert result["images"] == 10 and result["dtype"] == "float32" and not result["compiled"]
    assert result["model_only_images_per_s"] > 0 and result["end_to_end_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["end_to_end_images_per_s"] / result["model_only_images_per_s"],
                                            abs=2e-3)


def test_inference_benchmark_compares_the_same_architecture_across_peers(load_benchmark):
    """``benchmarks/inference.py``: dinokit, timm and Hugging Face build the same backbone for every size (built on
    the meta device: no memory; timm's has no mask token, one vector of the width fewer), and it runs on the CPU."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    import torch

    bench = load_benchmark("inference")
    for arch, spec in bench.ARCHS.items():
        with torch.device("meta"):
            counts = {name: bench.n_params(bench.build(name, arch)) for name in ("dinokit", "timm", "hf")}
        assert counts["dinokit"] == counts["hf"] == counts["timm"] + spec["width"], (arch, counts)
    results = bench.main(["--arch", "vits14", "--device", "cpu", "--batch", "2", "--steps", "1", "--size", "28",
                          "--modes", "eager"])
    assert set(results) == {"dinokit/eager", "timm/eager", "hf/eager"} and all(v > 0 for v in results.values())


def test_gpu_suite_runs_its_steps_in_order_within_the_budget_and_keeps_going(load_benchmark, tmp_path):
    """``benchmarks/gpu_suite.py``: each step in its own process; JSON lines become results tagged with the step; a
    failing or timed-out step is recorded and the next one runs; a step that no longer fits is skipped."""
    suite = load_benchmark("gpu_suite")
    scripts = {"ok": 'print("noise"); print(\'{"a": 1}\'); print(\'[{"b": 2}, 3]\')',
               "bad": "import sys; sys.exit(3)", "slow": "import time; print('{\"c\": 0}', flush=True); time.sleep(30)"}
    for name, code in scripts.items():
        (tmp_path / f"{name}.py").write_text(code)
    steps = [suite.Step("ok", [str(tmp_path / "ok.py")], 60, min_s=0),
             suite.Step("bad", [str(tmp_path / "bad.py")], 60, min_s=0),
             suite.Step("slow", [str(tmp_path / "slow.py")], 2, min_s=0),
             suite.Step("big", [str(tmp_path / "ok.py")], 60, min_s=10_000)]
    out = tmp_path / "out"
    statuses = suite.run_steps(steps, out, budget_s=60)
    assert [(s["step"], s["status"]) for s in statuses] == [
        ("ok", "ran"), ("bad", "failed (exit 3)"), ("slow", "timed out"), ("big", "skipped")]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert results == [{"step": "ok", "a": 1}, {"step": "ok", "b": 2}, {"step": "slow", "c": 0}]
    assert "exit" not in (out / "ok.log").read_text() and (out / "bad.log").exists()
    assert "ok: ran" in suite.summary(out, statuses)


def test_gpu_suite_steps_name_existing_scripts_and_their_options(load_benchmark, tmp_path):
    """A GPU session cannot afford a typo: every step's script exists and every --option it passes is one of that
    script's (the toy-size run of every step is by hand: ``gpu_suite.py --device cpu --smoke``)."""
    suite = load_benchmark("gpu_suite")
    for smoke in (False, True):
        for step in suite.steps("cuda", smoke, tmp_path, workers=4):
            source = (suite.HERE / step.argv[0]).read_text()
            for option in (a for a in step.argv[1:] if a.startswith("--")):
                assert f'"{option}"' in source, (step.name, option)


def test_gpu_suite_refuses_a_run_that_could_only_skip_or_fail(load_benchmark, tmp_path, capsys, monkeypatch):
    """A budget of 0 skipped every step, and the default --device cuda on a machine without a GPU (or a device that
    does not exist) failed every step with a traceback in its log; each is one line before anything runs."""
    suite = load_benchmark("gpu_suite")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, message in ((["--budget-s", "0", "--device", "cpu"], "--budget-s must be above 0, got 0"),
                          ([], "no CUDA GPU here: pass --device cpu (with --smoke for toy sizes)"),
                          (["--device", "tpu"], "--device 'tpu' is not cpu, cuda or cuda:N")):
        with pytest.raises(SystemExit):
            suite.main(["--out", str(tmp_path / "out"), *argv])
        assert capsys.readouterr().err.strip().endswith(message)
    assert not (tmp_path / "out").exists()


def test_data_pipeline_times_the_official_composition_with_the_same_crops(load_benchmark):
    """``benchmarks/data_pipeline.py``'s peer row: the official multi-crop as composed from its published parameters
    gives what dinokit's PIL path gives (two global crops, the local crops, normalised tensors of their sizes)."""
    from PIL import Image

    from dinokit.data.augmentations import DataAugmentationDINO

    image = Image.new("RGB", (60, 45))  # black: every colour operation keeps it black (solarize: below 128)
    official = load_benchmark("data_pipeline").official_composition(32, 16, 3)(image)
    ours = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, global_crops_size=32, local_crops_size=16)(image)
    for key in ("global_crops", "local_crops"):
        assert [t.shape for t in official[key]] == [t.shape for t in ours[key]], key
    for t in official["global_crops"] + official["local_crops"]:  # normalised: black is -mean/std
        torch.testing.assert_close(t, (-torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))
                                   .view(3, 1, 1).expand_as(t))
