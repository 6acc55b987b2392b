"""Linear probes: official grid and names, feature layout, training to separable accuracy, hub heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinokit.eval.linear import (
    LEARNING_RATES,
    LinearProbes,
    ProbeSetting,
    check_linear_options,
    probe_input,
    probe_settings,
    train_probes,
)
from dinokit.eval.linear_results import best_classifier, probe_predictions, save_linear_head, score_probes
from dinokit.errors import DinokitError
from dinokit.eval.linear_data import cached_batches
from dinokit.eval.feature_cache import linear_feature_parts
from dinokit.models import DinoVisionTransformer
from dinokit.models.linear_classifier import linear_features
from dinokit.models.registry import create_model
from test_knn import one_thread  # noqa: F401  (autouse fixture)



def tiny_backbone(seed: int = 0) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    return DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2).eval()


def test_official_grid_and_names():
    settings = probe_settings(total_batch=1024)  # 128 per GPU x 8 GPUs
    assert len(settings) == 52 and len(LEARNING_RATES) == 13
    assert settings[0] == ProbeSetting(1, False, 1e-5 * 4)
    assert ProbeSetting(4, True, 1e-3).name() == "classifier_4_blocks_avgpool_True_lr_0_00100"
    probes = LinearProbes(settings, embed_dim=8, num_classes=3)
    assert len(probes.classifiers_dict) == 52
    assert "classifier_1_blocks_avgpool_False_lr_0_40000" in probes.settings
    in_features = {name: probes.classifiers_dict[name].in_features for name in probes.settings}
    assert in_features["classifier_4_blocks_avgpool_True_lr_0_00400"] == 5 * 8
    assert in_features["classifier_1_blocks_avgpool_True_lr_0_00400"] == 2 * 8
    assert in_features["classifier_4_blocks_avgpool_False_lr_0_00400"] == 4 * 8
    weights = torch.cat([m.weight.flatten() for m in probes.classifiers_dict.values()])
    assert abs(weights.std().item() - 0.01) < 0.002  # N(0, 0.01) init
    assert all(torch.count_nonzero(m.bias) == 0 for m in probes.classifiers_dict.values())


def test_small_batches_keep_names_unique():
    probes = LinearProbes(probe_settings(total_batch=16), embed_dim=4, num_classes=2)
    assert len(probes.classifiers_dict) == 52  # 1e-5 * 16/256 and 2e-5 * 16/256 both round to 0.00000
    assert "classifier_1_blocks_avgpool_False_lr_6_25e-07" in probes.settings


def test_probe_input_matches_the_hub_linear_head_layout():
    backbone = tiny_backbone()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        parts = linear_feature_parts(backbone, x)
        assert parts["cls_tokens"].shape == (3, 4, 32) and parts["patch_mean"].shape == (3, 32)
        for layers in (1, 4):
            expected = linear_features(backbone, x, layers=layers)
            got = probe_input(parts["cls_tokens"], parts["patch_mean"], n_last_blocks=layers, avgpool=True)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        # n=1 without avgpool is forward(): the final-norm class token
        got = probe_input(parts["cls_tokens"], parts["patch_mean"], n_last_blocks=1, avgpool=False)
        torch.testing.assert_close(got, backbone(x))


def separable_features(n_per_class: int, num_classes: int, *, dim=16, seed=0):
    """Class tokens (N, 4, D) and patch means whose class is readable from every layout."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    cls_tokens = centres[labels][:, None, :] + 0.5 * torch.randn(len(labels), 4, dim, generator=g)
    patch_mean = centres[labels] + 0.5 * torch.randn(len(labels), dim, generator=g)
    return cls_tokens, patch_mean, labels


def test_probes_reach_full_accuracy_on_separable_features():
    cls_tokens, patch_mean, labels = separable_features(40, 5)
    val = separable_features(10, 5, seed=1)
    settings = probe_settings(learning_rates=(1e-4, 1e-2, 1.0), total_batch=32)
    torch.manual_seed(0)
    probes = LinearProbes(settings, embed_dim=16, num_classes=5)
    before = score_probes(probe_predictions(probes, *val[:2]), val[2])
    batches = cached_batches(cls_tokens, patch_mean, labels, batch_size=32, seed=0)
    train_probes(probes, batches, iterations=150)
    acc = score_probes(probe_predictions(probes, *val[:2]), val[2])
    best = best_classifier(acc, probes.settings)
    assert acc[best] == 100.0 and max(before.values()) < 100.0
    tiny_lr = [n for n, s in probes.settings.items() if s.lr < 1e-4]
    assert all(acc[n] <= acc[best] for n in tiny_lr)
    best_4 = best_classifier(acc, probes.settings, n_last_blocks=4, avgpool=True)
    assert best_4.startswith("classifier_4_blocks_avgpool_True")


def test_probes_ranked_by_the_mean_per_class_accuracy():
    """--val-metric-type mean_per_class_accuracy (official): each classifier's value is the mean over the classes of
    its per-class top-1, by hand from its logits; on an unbalanced set it differs from the top-1."""
    val_tokens, val_mean, val_labels = separable_features(10, 5, seed=1)
    keep = torch.cat([torch.arange(10), torch.arange(10, 50, 4)])  # class 0: 10 images, the others 2-3 each
    val = (val_tokens[keep], val_mean[keep], val_labels[keep])
    torch.manual_seed(0)
    probes = LinearProbes(probe_settings(learning_rates=(1e-4, 1e-2), total_batch=32), embed_dim=16, num_classes=5)
    per_class = score_probes(probe_predictions(probes, *val[:2]), val[2], "mean_per_class_accuracy")
    top1 = score_probes(probe_predictions(probes, *val[:2]), val[2])
    with torch.no_grad():
        logits = probes(val[0], val[1])
    for name, out in logits.items():
        right = (out.argmax(dim=1) == val[2]).double()
        by_hand = 100 * torch.stack([right[val[2] == c].mean() for c in range(5)]).mean()
        assert per_class[name] == pytest.approx(float(by_hand)) and top1[name] == pytest.approx(100 * float(right.mean()))
    assert per_class != top1


def test_saved_head_loads_through_the_lc_hub_entry_point(tmp_path):
    backbone = tiny_backbone(seed=3)
    linear = nn.Linear(5 * 32, 8)
    nn.init.normal_(linear.weight, std=0.1)
    head_file = save_linear_head(linear, tmp_path / "linear_head_4.pth")
    state = torch.load(head_file, weights_only=True)
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (8, 160)
    nn.Linear(160, 8).load_state_dict(state, strict=True)
    classifier = create_model(
        "dinov2_vits14_lc", pretrained=False, weights=str(head_file), layers=4, backbone_weights=backbone.state_dict(),
        embed_dim=32, depth=4, num_heads=2, patch_size=8, img_size=32,
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        parts = linear_feature_parts(backbone, x)
        expected = linear(probe_input(parts["cls_tokens"], parts["patch_mean"], n_last_blocks=4, avgpool=True))
        torch.testing.assert_close(classifier(x), expected)



def test_option_checks_name_the_wrong_option():
    """One checker for ``dinokit eval linear`` and :func:`linear_protocol`: the same wording from both."""
    check_linear_options(n_last_blocks=[1, 4, 50], depth=4)  # 50 is left out; 1 and 4 fit
    for bad, message in [
        (dict(epochs=0), "--epochs must be at least 1, got 0"),
        (dict(epoch_length=-3), "--epoch-length must be at least 1, got -3"),
        (dict(batch_size=0), "--batch-size must be at least 1, got 0"),
        (dict(eval_period=-1), "--eval-period-iterations must be 0 (only at the end) or more, got -1"),
        (dict(learning_rates=[0.1, 0.0]), "--learning-rates must be positive, got 0"),
        (dict(n_last_blocks=[0]), "--n-last-blocks must be at least 1, got 0"),
        (dict(n_last_blocks=[50], depth=12), "--n-last-blocks 50 exceeds the backbone's 12 blocks; give at most 12"),
    ]:
        with pytest.raises(DinokitError) as err:
            check_linear_options(**bad)
        assert str(err.value) == message


def test_the_training_stream_continues_where_it_stopped():
    """InfiniteShuffle(start=k) gives the stream from its k-th index on, across passes and for each rank."""
    from dinokit.eval.linear_data import InfiniteShuffle

    for rank, world in ((0, 1), (1, 3)):
        stream = iter(InfiniteShuffle(10, seed=4, rank=rank, world_size=world))
        whole = [next(stream) for _ in range(25)]
        for start in (0, 3, 4, 11, 20):
            later = iter(InfiniteShuffle(10, seed=4, rank=rank, world_size=world, start=start))
            assert [next(later) for _ in range(25 - start)] == whole[start:]


def test_the_augmented_stream_is_the_same_with_any_workers_and_leaves_the_callers_random_state(tmp_path):
    """Each image's crop and flip draw from a seed of (seed, rank, batch, place): 0 and 2 workers, two runs and a
    stream resumed at batch 2 give the same features; the global random states are untouched. (The workers'
    running states, or the unseeded global one with 0 workers, gave other crops per machine and per run.)"""
    import random

    import numpy as np

    from dinokit.data import ImageFiles, make_classification_train_transform, write_sample_dataset
    from dinokit.eval.linear_data import StreamPosition, augmented_batches

    root = write_sample_dataset(tmp_path, counts={"train": 2, "val": 0}, image_size=48)
    paths = sorted((root / "train").rglob("*.png"))
    dataset = ImageFiles(paths, targets=list(range(len(paths))), transform=make_classification_train_transform(crop_size=32))
    model = tiny_backbone()

    def stream(workers, batches=4, position=None):
        out = augmented_batches(model, dataset, batch_size=3, num_workers=workers, seed=5, position=position)
        try:
            return [next(out)[0] for _ in range(batches)]
        finally:
            out.close()

    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first = stream(0)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()
    for other in (stream(0), stream(2)):
        assert all(torch.equal(a, b) for a, b in zip(first, other))
    resumed = stream(0, batches=2, position=StreamPosition(batches=2))
    assert all(torch.equal(a, b) for a, b in zip(first[2:], resumed))
    assert not torch.equal(first[0], first[1])  # the batches differ (not one repeated draw)


def test_a_classifier_of_an_official_linear_evaluation_checkpoint_loads_as_a_head(tmp_path):
    """``model_final.pth`` of the official linear evaluation holds the whole grid (``classifiers_dict.<name>.linear``,
    DDP's ``module.`` prefix included): ``file#name`` reads one as a hub head; without a name, one line lists how."""
    from dinokit.models.linear_classifier import LinearClassifier, load_linear_head, read_linear_head

    backbone = tiny_backbone()
    g = torch.Generator().manual_seed(0)
    names = {"classifier_4_blocks_avgpool_True_lr_0_00100": 5 * 32, "classifier_1_blocks_avgpool_False_lr_0_00100": 32}
    sd = {}
    for name, width in names.items():
        sd[f"module.classifiers_dict.{name}.linear.weight"] = torch.randn(7, width, generator=g)
        sd[f"module.classifiers_dict.{name}.linear.bias"] = torch.randn(7, generator=g)
    path = tmp_path / "model_final.pth"
    torch.save({"model": sd, "iteration": 12499}, path)
    head = read_linear_head(f"{path}#classifier_4_blocks_avgpool_True_lr_0_00100")
    assert torch.equal(head["weight"], sd["module.classifiers_dict.classifier_4_blocks_avgpool_True_lr_0_00100.linear.weight"])
    model = load_linear_head(LinearClassifier(backbone, layers=4, num_classes=7),
                             f"{path}#classifier_4_blocks_avgpool_True_lr_0_00100")
    assert torch.equal(model.linear_head.bias, head["bias"])
    with pytest.raises(DinokitError, match=r"holds the 2 classifiers of an official linear evaluation; name one after "
                                           r"a '#', e.g. .*model_final.pth#classifier_4_blocks_avgpool_True_lr_0_00100"):
        read_linear_head(path)
    with pytest.raises(DinokitError, match="it has no 'classifier_x'"):
        read_linear_head(f"{path}#classifier_x")


_MIXED = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:32]  # 32 rows of the 5 classes


def _two_rank_probes(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cls_tokens, patch_mean, labels = (t[_MIXED] for t in separable_features(8, 5))
    rows = slice(rank * 16, rank * 16 + 16)  # each rank its own half of every batch
    torch.manual_seed(0)
    probes = LinearProbes(probe_settings(learning_rates=(1e-2, 1.0), total_batch=32), embed_dim=16, num_classes=5)
    batches = iter([(cls_tokens[rows], patch_mean[rows], labels[rows])] * 5)
    train_probes(probes, batches, iterations=5)
    torch.save(probes.state_dict(), f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_average_their_gradients_in_one_collective():
    """The probes' 104 gradients went to 104 collectives per step; they go in one now, with the same mean: two ranks
    with half a batch each train exactly as one process with the whole batch."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/probes"
        # spawn: autograd refuses to run in a child forked after the parent used it (as another test of this worker
        # may have: the test failed or passed by the order of the tests)
        mp.start_processes(_two_rank_probes, args=(port, out), nprocs=2, join=True, start_method="spawn")
        ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    cls_tokens, patch_mean, labels = (t[_MIXED] for t in separable_features(8, 5))
    torch.manual_seed(0)
    whole = LinearProbes(probe_settings(learning_rates=(1e-2, 1.0), total_batch=32), embed_dim=16, num_classes=5)
    train_probes(whole, iter([(cls_tokens, patch_mean, labels)] * 5), iterations=5)
    for key, value in whole.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key])
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6)
