"""Feature extraction under ``dinokit embed`` and the evaluations (``dinokit.features``): dataset order, unreadable
images, the GPU path's host copies, one compiled graph, the gather across ranks, repeated indices."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dinokit.data import ImageFiles, make_classification_eval_transform
from dinokit.features import HostCopies, embedding_feature_fn, extract_features
from dinokit.models import create_model
from test_embed import BAD, GOOD, TINY, expected_cls, images, weights  # noqa: F401  (images, weights: fixtures)


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
@pytest.mark.parametrize("queued", [False, True], ids=["cpu", "gpu-copy-queue"])
def test_extract_features_keeps_dataset_order_and_reports_bad(images, weights, queued, monkeypatch) -> None:
    """``queued``: the outputs go through the GPU path's one-batch-late host copies (run on CPU tensors)."""
    if queued:
        from dinokit import features

        monkeypatch.setattr(features, "HostCopies", lambda device: HostCopies(device, asynchronous=True))
    model, _ = weights
    paths = [images / n for n in ("sub/c.png", "broken.png", "a.png", "sub/fake.jpg", "b.jpg")]
    dataset = ImageFiles(paths, targets=[3, 4, 5, 6, 7], transform=make_classification_eval_transform(crop_size=56))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        result = extract_features(model, dataset, batch_size=2, progress=False)
    assert result.indices.tolist() == [0, 2, 4] and result.targets.tolist() == [3, 5, 7] and result.bad == [1, 3]
    want = expected_cls(model, images, ["sub/c.png", "a.png", "b.jpg"])
    np.testing.assert_allclose(result.features["cls"].numpy(), want, rtol=1e-4, atol=1e-5)
    assert not result.features["cls"].is_inference()  # usable to train probes
    model.train()
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU; running in fp32"):
        fp16 = extract_features(model, dataset, dtype="fp16", progress=False)
    assert model.training  # mode restored
    torch.testing.assert_close(fp16.features["cls"], result.features["cls"])
    bf16 = extract_features(model, dataset, dtype=torch.bfloat16, progress=False)
    torch.testing.assert_close(bf16.features["cls"], result.features["cls"], rtol=0.1, atol=0.05)


def test_host_copies_collect_each_batch_one_batch_later_in_order() -> None:
    """The GPU path's queue (run on CPU tensors): a batch is collected when the next one is queued, or by flush."""
    copies = HostCopies(torch.device("cpu"), asynchronous=True)
    batches = [{"cls": torch.full((2, 3), float(i), dtype=torch.bfloat16), "patch": torch.randn(2, 4, 3)}
               for i in range(3)]
    copies.add(batches[0])
    assert copies.parts == {}  # still in flight
    copies.add(batches[1])
    assert [t[0, 0].item() for t in copies.parts["cls"]] == [0.0]
    copies.add(batches[2])
    copies.flush()
    copies.flush()  # nothing left: no duplicate
    assert [t[0, 0].item() for t in copies.parts["cls"]] == [0.0, 1.0, 2.0]
    assert all(t.dtype == torch.float32 for key in copies.parts for t in copies.parts[key])
    for got, batch in zip(copies.parts["patch"], batches):
        assert torch.equal(got, batch["patch"]) and got.data_ptr() != batch["patch"].data_ptr()
    cpu = HostCopies(torch.device("cpu"))  # the CPU default keeps each batch at once
    cpu.add(batches[0])
    assert not cpu.asynchronous and len(cpu.parts["cls"]) == 1


def test_compiled_extraction_pads_to_one_static_graph_and_gives_the_eager_features(images, weights) -> None:
    """``compile_backend``: batches of 2 and 1 real images (bad images dropped, short last batch) are padded to the
    batch size, so dynamo captures one graph for the whole dataset, and the real rows equal the eager ones."""
    from torch._dynamo.testing import CompileCounter


    model, _ = weights
    paths = [images / n for n in ("sub/c.png", "broken.png", "a.png", "sub/fake.jpg", "b.jpg")]
    dataset = ImageFiles(paths, transform=make_classification_eval_transform(crop_size=56))
    feature_fn = embedding_feature_fn(patch_mean=True, patch_tokens=True)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        eager = extract_features(model, dataset, feature_fn=feature_fn, batch_size=3, progress=False)
    counter = CompileCounter()  # counts the graphs dynamo hands it and runs them eagerly
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        compiled = extract_features(model, dataset, feature_fn=feature_fn, batch_size=3, progress=False,
                                    compile_backend=counter)
    assert counter.frame_count == 1  # batches of 2 and 1 real images, one graph
    assert compiled.indices.tolist() == [0, 2, 4] and compiled.bad == [1, 3]
    for key in ("cls", "patch_mean", "patch_tokens"):
        assert compiled.features[key].shape == eager.features[key].shape
        torch.testing.assert_close(compiled.features[key], eager.features[key], rtol=1e-5, atol=1e-5)


def _two_rank_extract(rank: int, port: int, folder: str, out: str) -> None:
    import warnings

    import torch.distributed as dist

    import dinokit.features as features

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    warnings.simplefilter("ignore")  # the unreadable images' warnings
    model = create_model("dinov2_vits14", **TINY).eval()
    model.load_state_dict(torch.load(f"{folder}/model.pt"))
    dataset = ImageFiles([f"{folder}/{n}" for n in (*GOOD, *BAD)], transform=make_classification_eval_transform(
        crop_size=56))
    features.GATHER_CHUNK_BYTES = 100  # a few rows per collective: several chunks, and a short last one
    result = extract_features(model, dataset, batch_size=2, progress=False,
                              feature_fn=embedding_feature_fn(patch_mean=True))
    torch.save({"features": result.features, "indices": result.indices, "targets": result.targets, "bad": result.bad},
               f"{out}.{rank}")
    dist.destroy_process_group()


def test_ranks_embed_strided_shards_and_gather_in_dataset_order(images, weights) -> None:
    """Two processes (gloo) embed strided shards and gather them, by tensor collectives in chunks (pickled objects
    were staged whole on every GPU under NCCL), in dataset order: the result is the one process's on every rank."""
    import socket
    import warnings

    import torch.multiprocessing as mp

    model, _ = weights
    torch.save(model.state_dict(), images / "model.pt")
    dataset = ImageFiles([images / n for n in (*GOOD, *BAD)],
                         transform=make_classification_eval_transform(crop_size=56))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = extract_features(model, dataset, batch_size=2, progress=False,
                                  feature_fn=embedding_feature_fn(patch_mean=True))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(images / "ranks")
    mp.start_processes(_two_rank_extract, args=(port, str(images), out), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        merged = torch.load(f"{out}.{rank}")
        assert merged["indices"].tolist() == single.indices.tolist() == [0, 1, 2, 3, 4]
        assert merged["bad"] == single.bad == [5, 6] and merged["targets"].tolist() == [-1] * 5
        assert merged["features"].keys() == single.features.keys() == {"cls", "patch_mean"}
        for key, value in single.features.items():
            torch.testing.assert_close(merged["features"][key], value)


def test_gather_puts_rows_in_dataset_order_and_lets_each_batch_go() -> None:
    """The batches, their concatenation and its reordered copy were alive together (3.5x the features at peak): each
    batch is now copied into its rows and let go; the rows are in dataset-index order whatever the batches' order."""
    from dinokit.features import _gather

    gen = torch.Generator().manual_seed(0)
    index = torch.randperm(10, generator=gen)
    values = torch.randn(10, 3, generator=gen)
    splits = [index[:4], index[4:5], index[5:]]
    parts = {"cls": [values[s] for s in splits], "pair": [values[s, :2] for s in splits]}
    targets = [s * 10 for s in splits]
    features, order, target, bad = _gather(parts, list(splits), targets, [12, 11], distributed=False)
    assert order.tolist() == list(range(10)) and target.tolist() == [10 * i for i in range(10)] and bad == [11, 12]
    torch.testing.assert_close(features["cls"], values, rtol=0, atol=0)
    torch.testing.assert_close(features["pair"], values[:, :2], rtol=0, atol=0)
    assert all(b is None for batches in parts.values() for b in batches)  # no batch kept beside the result


def test_extract_features_keeps_every_row_of_a_dataset_that_repeats_an_index(images, weights) -> None:
    """A ConcatDataset of two image sets (both count from 0) gave uninitialised memory for the repeated indices: each
    row of a repeated index now keeps its own features, in the order the rows were read."""
    from torch.utils.data import ConcatDataset, Subset

    model, _ = weights
    transform = make_classification_eval_transform(crop_size=56)
    one = ImageFiles([images / n for n in GOOD[:3]], transform=transform)
    other = ImageFiles([images / n for n in GOOD[3:5]], transform=transform)
    single = extract_features(model, ImageFiles([images / n for n in GOOD[:5]], transform=transform), batch_size=2,
                              progress=False)
    both = extract_features(model, ConcatDataset([one, other]), batch_size=2, progress=False)
    assert both.indices.tolist() == [0, 0, 1, 1, 2]
    torch.testing.assert_close(both.features["cls"], single.features["cls"][[0, 3, 1, 4, 2]])
    twice = extract_features(model, Subset(one, [2, 0, 2]), batch_size=2, progress=False)
    assert twice.indices.tolist() == [0, 2, 2]  # Subset items carry the wrapped dataset's index
    torch.testing.assert_close(twice.features["cls"], single.features["cls"][[0, 2, 2]])


@pytest.mark.parametrize("workers", [0, 2])
def test_extract_features_leaves_the_callers_random_state(images, weights, workers) -> None:
    """The loader drew its workers' seed from the global generator: every extraction (the training loop's k-NN
    monitor too) shifted the caller's random stream by one draw."""
    model, _ = weights
    dataset = ImageFiles([images / n for n in GOOD], transform=make_classification_eval_transform(crop_size=56))
    torch.manual_seed(3)
    state = torch.get_rng_state()
    extract_features(model, dataset, batch_size=2, num_workers=workers, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_datasets_of_pairs_or_bare_images_are_numbered_and_wrong_inputs_are_one_line() -> None:
    """torchvision's (image, target) items were 'not enough values to unpack (expected 3, got 2)'; PIL images and a
    CUDA device on a machine without one were errors from deep in torch."""
    from PIL import Image
    from torch.utils.data import TensorDataset

    from dinokit.errors import DinokitError

    torch.manual_seed(0)
    x, y = torch.randn(5, 3), torch.tensor([3, 1, 4, 1, 5])
    pairs = extract_features(torch.nn.Identity(), TensorDataset(x, y), batch_size=2, progress=False)
    assert torch.equal(pairs.features["cls"], x) and pairs.targets.tolist() == [3, 1, 4, 1, 5]
    assert pairs.indices.tolist() == [0, 1, 2, 3, 4]
    bare = extract_features(torch.nn.Identity(), list(x), batch_size=2, progress=False)
    assert torch.equal(bare.features["cls"], x) and bare.targets.tolist() == [-1] * 5
    with pytest.raises(DinokitError, match="the dataset's images are Image objects, not tensors: give it a transform"):
        extract_features(torch.nn.Identity(), [(Image.new("RGB", (8, 8)), 0)], progress=False)
    # (index, image, target) items whose index is numpy's or torch's (a Subset with such indices passes them on)
    class Triples(torch.utils.data.Dataset):  # gives back the index it was asked for, as dinokit's datasets do
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return i, x[i], 7

    triples = Triples()
    for picked in (np.arange(0, 5, 2), torch.tensor([0, 2, 4])):
        chosen = extract_features(torch.nn.Identity(), torch.utils.data.Subset(triples, picked), progress=False)
        assert chosen.indices.tolist() == [0, 2, 4] and torch.equal(chosen.features["cls"], x[[0, 2, 4]])
    with pytest.raises(DinokitError, match=r"the dataset's items are \(int, Tensor, int, str\): extract_features"):
        extract_features(torch.nn.Identity(), [(0, x[0], 1, "meta")], progress=False)

    class Stream(torch.utils.data.IterableDataset):  # items as they come, not by index
        def __len__(self):
            return len(x)

        def __iter__(self):
            return iter([(i, row, 1) for i, row in enumerate(x)])

    assert torch.equal(extract_features(torch.nn.Identity(), Stream(), progress=False).features["cls"], x)
    if not torch.cuda.is_available():
        with pytest.raises(DinokitError, match="device='cuda' was asked for but no CUDA GPU is available"):
            extract_features(torch.nn.Identity(), list(x), device="cuda", progress=False)


def test_items_that_are_not_image_and_class_index_are_one_line_and_streams_need_no_length() -> None:
    """A path or name as target was a collate traceback (12 lines with workers), 0.5 was taken as class 0, a dict item
    (Hugging Face datasets) said 'images are dict objects', an (index, image) pair 'images are int objects'; a stream
    of pairs was 'not enough values to unpack', one without a length 'no len()'."""
    from dinokit.errors import DinokitError

    x = torch.randn(4, 3)
    for items, message in [
        ([(x[0], "a.jpg")], "the dataset's targets are str objects, not class indices: give \\(image, int\\) pairs"),
        ([(x[0], 0.5)], "the dataset's targets are float objects, not class indices"),
        ([(x[0], torch.ones(3))], r"the dataset's targets are Tensor \(3,\) objects, not class indices"),
        ([{"image": x[0], "label": 1}], r"the dataset's items are dicts \(keys image, label\): extract_features reads"),
        ([(0, x[0])], r"the dataset's items are \(int, Tensor\): extract_features reads \(image, target\) pairs, the "
                      "image first"),
    ]:
        with pytest.raises(DinokitError, match=f"^{message}") as err:
            extract_features(torch.nn.Identity(), items, progress=False)
        assert "\n" not in str(err.value)

    class Pairs(torch.utils.data.IterableDataset):  # WebDataset's .to_tuple("jpg", "cls"): pairs, no length
        def __iter__(self):
            return iter([(row, 2) for row in x])

    column = extract_features(torch.nn.Identity(), torch.utils.data.TensorDataset(x, torch.arange(4)[:, None]),
                              progress=False)  # labels as a (N, 1) column: each row one class index
    assert column.targets.tolist() == [0, 1, 2, 3]
    got = extract_features(torch.nn.Identity(), Pairs(), progress=False)
    assert torch.equal(got.features["cls"], x)
    assert got.indices.tolist() == [0, 1, 2, 3] and got.targets.tolist() == [2] * 4
    # raised in a worker, it still comes back as the one line (a path as target was 12 lines from a worker)
    with pytest.raises(DinokitError, match="^the stream's items carry no index, and with several workers their order"):
        extract_features(torch.nn.Identity(), Pairs(), num_workers=2, progress=False)


def test_half_precision_images_run_and_integer_images_are_one_line() -> None:
    """fp16 images of an fp32 model were a dtype-mismatch traceback from the first matmul; uint8 images (pixels before
    the normalising transform) the same."""
    from dinokit.errors import DinokitError

    torch.manual_seed(0)
    x = torch.randn(4, 3)
    linear = torch.nn.Linear(3, 2)
    got = extract_features(linear, list(x.half()), progress=False)
    torch.testing.assert_close(got.features["cls"], linear(x.half().float()).detach())
    with pytest.raises(DinokitError, match=r"^the dataset's images are uint8 tensors: give normalised float images"):
        extract_features(linear, [torch.zeros(3, dtype=torch.uint8)], progress=False)
