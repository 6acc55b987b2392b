"""Dense metrics against hand-computed values, aligned image/label transforms, dataset strings and bad inputs."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.dense.datasets import make_dense_dataset
from dinokit.dense.transforms import DenseTrainTransform
from dinokit.dense.losses import SigLoss, gradient_loss, seg_cross_entropy
from dinokit.dense.metrics import DepthMetrics, SegMetrics, depth_metrics, eigen_crop_mask, reduce_zero_label
from dinokit.errors import DinokitError


# ---------------------------------------------------------------------------------------------- metrics
def test_miou_is_pooled_over_the_dataset_and_ignores_255():
    m = SegMetrics(3)
    m.update(torch.tensor([[0, 0], [1, 2]]), torch.tensor([[0, 1], [1, 255]]))  # image 1
    m.update(torch.tensor([[2, 2, 2, 0]]), torch.tensor([[2, 2, 0, 0]]))  # image 2
    # class 0: I = 1 + 1 = 2, U = (pred 2+1) + (label 1+2) - 2 = 4; class 1: I 1, U = 1 + 2 - 1 = 2;
    # class 2: I 2, U = 3 + 2 - 2 = 3 (the pixel labelled 255 is ignored although predicted 2)
    r = m.compute()
    assert r["IoU"] == [50.0, 50.0, 66.67]
    assert r["mIoU"] == round(100 * (0.5 + 0.5 + 2 / 3) / 3, 2)
    assert r["aAcc"] == round(100 * 5 / 7, 2)
    # per-class accuracy (mmseg's Acc): class 0: 2 of its 3 pixels right, class 1: 1 of 2, class 2: 2 of 2
    assert r["Acc"] == [66.67, 50.0, 100.0] and r["mAcc"] == round(100 * (2 / 3 + 1 / 2 + 1) / 3, 2)
    # per-image averaging would give another number: pooling is what the protocol asks
    absent = SegMetrics(4)
    absent.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert math.isnan(absent.compute()["IoU"][3]) and absent.compute()["mIoU"] == 100.0
    assert math.isnan(absent.compute()["Acc"][3]) and absent.compute()["mAcc"] == 100.0  # absent: left out


def test_reduce_zero_label():
    assert reduce_zero_label(torch.tensor([0, 1, 150, 255])).tolist() == [255, 0, 149, 255]


def test_depth_metrics_by_hand_and_eigen_crop():
    gt = torch.tensor([1.0, 2.0, 4.0, 0.0])
    pred = torch.tensor([1.0, 2.6, 2.0, 5.0])  # the last pixel has no ground truth
    r = depth_metrics(pred, gt)
    assert r["delta1"] == pytest.approx(1 / 3)  # ratios 1, 1.3, 2
    assert r["delta2"] == pytest.approx(2 / 3)  # 1.3 < 1.5625
    assert r["delta3"] == pytest.approx(2 / 3)  # 2 > 1.953
    assert r["abs_rel"] == pytest.approx((0 + 0.3 + 0.5) / 3)
    assert r["rmse"] == pytest.approx(math.sqrt((0 + 0.36 + 4) / 3))
    assert r["log10"] == pytest.approx((0 + abs(math.log10(2 / 2.6)) + math.log10(2)) / 3)
    mask = eigen_crop_mask(480, 640)
    assert mask.sum() == (471 - 45) * (601 - 41) and mask[45, 41] and not mask[44, 41] and not mask[45, 601]
    assert eigen_crop_mask(240, 320).sum() == (235 - 22) * (300 - 20)
    # per image, then averaged over images (not pooled over pixels)
    meter = DepthMetrics(min_depth=0.1, max_depth=10.0)
    meter.update(torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[1.0, 2.0]]]))  # rmse sqrt(1/2)
    meter.update(torch.tensor([[[3.0, 3.0, 3.0, 3.0]]]), torch.tensor([[[3.0, 3.0, 3.0, 3.0]]]))  # rmse 0
    assert meter.compute()["rmse"] == pytest.approx(math.sqrt(0.5) / 2)
    crop = DepthMetrics(eigen_crop=True)
    gt2 = torch.full((1, 48, 64), 2.0)
    pred2 = gt2.clone()
    pred2[:, :4] = 9.0  # wrong only above the crop (rows 0-3 of 48; the crop starts at row 4)
    crop.update(pred2, gt2)
    assert crop.compute()["rmse"] == 0.0


def test_losses_by_hand():
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 1, 0, 0] = math.log(2.0)  # p(class 1) = 1/2 at pixel 0; uniform 1/3 at pixel 1
    loss = seg_cross_entropy(logits, torch.tensor([[[1, 255]]]))
    assert loss.item() == pytest.approx(math.log(2) / 2)  # the ignored pixel counts in the denominator
    sig = SigLoss(warm_up_iters=1)
    pred, gt, valid = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0]), torch.tensor([True, True])
    g = torch.log(pred + 1e-3) - torch.log(gt + 1e-3)
    warm, full = math.sqrt(0.15) * g.mean().item(), math.sqrt(g.var().item() + 0.15 * g.mean().item() ** 2)
    assert sig(pred, gt, valid, iteration=0).item() == pytest.approx(warm, rel=1e-5)  # warm-up
    assert sig(pred, gt, valid, iteration=1).item() == pytest.approx(full, rel=1e-5)
    # the warm-up follows the iteration, not a count of calls: a resumed run (a new loss) does not warm up again
    assert SigLoss(warm_up_iters=1)(pred, gt, valid, iteration=5).item() == pytest.approx(full, rel=1e-5)
    flat = gradient_loss(torch.full((1, 8, 8), 3.0), torch.full((1, 8, 8), 1.0), torch.ones(1, 8, 8, dtype=torch.bool))
    assert flat.item() == 0.0  # a constant offset has no gradient
    ramp = torch.arange(8.0).repeat(8, 1)[None]
    assert gradient_loss(ramp, torch.zeros(1, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool)).item() > 0


# ---------------------------------------------------------------------------------------------- transforms
def test_training_transform_keeps_image_and_label_aligned():
    random.seed(0)
    torch.manual_seed(0)
    h, w = 40, 60
    classes = (torch.arange(h)[:, None] // 20 * 3 + torch.arange(w)[None] // 20)  # 2 x 3 blocks of 20 px, classes 0-5
    image = (classes.float() / 5).expand(3, h, w).clone()  # the class written into the pixel values
    t = DenseTrainTransform(task="seg", crop_size=(32, 32), base_size=40, scale_range=(0.5, 2.0), photometric=False)
    for _ in range(20):
        img, label = t(image, classes)
        assert img.shape == (3, 32, 32) and label.shape == (32, 32)
        value = img[0] * 0.229 + 0.485  # undo the normalisation of channel 0
        valid = label != 255
        decoded = torch.round(value * 5).long()
        # bilinear (image) and nearest (label) resizing agree away from block borders: nearly all pixels match
        assert (decoded[valid] == label[valid]).float().mean() > 0.85  # a flip or shift of one of them: < 0.5
        assert (img[:, ~valid] == 0).all()  # padding: image 0, label 255
    depth = torch.rand(40, 60) + 1
    rgb = depth.expand(3, 40, 60).clone() / 2
    td = DenseTrainTransform(task="depth", crop_size=(24, 48), photometric=False)
    for _ in range(10):
        img, label = td(rgb, depth)  # no rescaling: crops and flips are exact
        assert torch.allclose((img[0] * 0.229 + 0.485) * 2, label, atol=1e-5)
    # with the depth recipe's rotation: a vertical edge stays where the depth edge is (within a pixel)
    step = torch.zeros(40, 60)
    step[:, 30:] = 1.0
    td = DenseTrainTransform(task="depth", crop_size=(40, 60), flip=0.0)
    for _ in range(10):
        img, label = td(step.expand(3, 40, 60).clone(), step + 1)
        rows = slice(10, 30)  # away from the rotated-in corners
        edge_img = (img[0, rows] > img[0, rows].mean()).float().argmax(1)
        edge_label = (label[rows] > 1.5).float().argmax(1)
        assert (edge_img - edge_label).abs().max() <= 1


# ---------------------------------------------------------------------------------------------- datasets
def _write_pair(root, name, image_size=(8, 6), mask=None, mask_size=None, depth=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", image_size, (10, 20, 30)).save(root / "images" / f"{name}.jpg")
    if mask is not None:
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.full(mask_size[::-1] if mask_size else image_size[::-1], mask, np.uint8)).save(root / "masks" / f"{name}.png")
    if depth is not None:
        (root / "depth").mkdir(exist_ok=True)
        np.save(root / "depth" / f"{name}.npy", np.full(image_size[::-1], depth, np.float32))


def test_folder_datasets_and_their_errors(tmp_path):
    seg = tmp_path / "seg"
    _write_pair(seg, "a", mask=1)
    _write_pair(seg, "b", mask=255)
    ds = make_dense_dataset(f"SegFolder:root={seg}")
    assert ds.info.num_classes == 2 and len(ds) == 2
    # an EXIF orientation does not turn an image away from its label, drawn on the stored pixels
    stored = Image.open(seg / "images" / "a.jpg")
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(seg / "images" / "a.jpg", exif=exif)
    assert tuple(ds[0]["image"].shape[-2:]) == tuple(ds[0]["label"].shape) == (6, 8)
    item = ds[0]
    assert item["image"].shape == (3, 6, 8) and item["label"].dtype == torch.int64 and item["label"].unique().tolist() == [1]
    (seg / "classes.txt").write_text("sky\n")  # one class: the mask value 1 is now out of range
    with pytest.raises(DinokitError, match=r"mask '.*a.png' holds class 1, but the dataset has 1 classes"):
        make_dense_dataset(f"SegFolder:root={seg}")[0]
    (seg / "classes.txt").unlink()
    _write_pair(seg, "c")
    with pytest.raises(DinokitError, match=r"no label for '.*c.jpg': expected '.*masks/c.png'"):
        make_dense_dataset(f"SegFolder:root={seg}")
    _write_pair(seg, "c", mask=0, mask_size=(5, 5))
    with pytest.raises(DinokitError, match=r"label '.*c.png' is 5x5 but its image '.*c.jpg' is 8x6"):
        make_dense_dataset(f"SegFolder:root={seg}")  # from the headers, when the folder opens
    from dinokit.dense.datasets import DenseDataset, DenseInfo

    pairs = [(seg / "images" / "c.jpg", seg / "masks" / "c.png")]
    with pytest.raises(DinokitError, match=r"label '.*c.png' is 5x5 but its image '.*c.jpg' is 8x6"):
        DenseDataset(pairs, DenseInfo("seg", num_classes=2), name="c")[0]  # and when an item is read

    dep = tmp_path / "depth"
    _write_pair(dep, "x", depth=2.5)
    (dep / "depth").mkdir(exist_ok=True)
    _write_pair(dep, "y")
    Image.fromarray(np.full((6, 8), 1500, np.uint16)).save(dep / "depth" / "y.png")  # millimetres
    d = make_dense_dataset(f"DepthFolder:root={dep}")
    assert d[0]["label"].unique().tolist() == [2.5] and d[1]["label"].unique().tolist() == [1.5]
    for picture in (Image.new("L", (8, 6), 200), Image.new("RGB", (8, 6))):  # would read as 0-255 mm
        picture.save(dep / "depth" / "y.png")
        with pytest.raises(DinokitError, match=rf"depth '.*y.png' is not 16-bit \(Pillow mode {picture.mode}\); depth PNGs must be "
                                               r"single-channel 16-bit millimetres \(0 = invalid\), or save float "
                                               r"metres as 'y.npy'"):
            d[1]
    (dep / "depth" / "y.png").unlink()
    depth = np.full((1, 6, 8), 1.5, np.float32)
    depth[0, 0, :3] = [np.nan, np.inf, -np.inf]
    np.save(dep / "depth" / "y.npy", depth)  # (1, H, W), with non-finite pixels: squeezed, invalid (0)
    label = make_dense_dataset(f"DepthFolder:root={dep}")[1]["label"]
    assert label.shape == (6, 8) and label[0, :3].tolist() == [0.0, 0.0, 0.0] and label[1:].unique().tolist() == [1.5]
    for array, expected in ((np.zeros((2, 6, 8)), r"is a float64 array of shape \(2, 6, 8\); save one \(H, W\) array"),
                            (np.array([{"a": 1}]), "cannot be read as a numpy array")):
        np.save(dep / "depth" / "y.npy", array, allow_pickle=True)
        with pytest.raises(DinokitError, match=rf"depth '.*y.npy' {expected}"):
            make_dense_dataset(f"DepthFolder:root={dep}")[1]
    with pytest.raises(DinokitError, match="is not a dense dataset"):
        make_dense_dataset(str(dep))
    with pytest.raises(DinokitError, match="unknown dataset 'Seg'"):
        make_dense_dataset("Seg:root=/x")
    with pytest.raises(DinokitError, match="ADE20K split must be training or validation"):
        make_dense_dataset(f"ADE20K:root={tmp_path}:split=val")


def test_ade20k_voc_and_nyu_layouts(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    (ade / "images" / "validation").mkdir(parents=True)
    (ade / "annotations" / "validation").mkdir(parents=True)
    Image.new("RGB", (4, 3)).save(ade / "images" / "validation" / "ADE_val_1.jpg")
    Image.fromarray(np.array([[0, 1, 150, 2]] * 3, np.uint8)).save(ade / "annotations" / "validation" / "ADE_val_1.png")
    label = make_dense_dataset(f"ADE20K:root={ade}:split=validation")[0]["label"]
    assert label[0].tolist() == [255, 0, 149, 1]  # reduce-zero-label
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    Image.new("RGB", (4, 3)).save(voc / "JPEGImages" / "2007_1.jpg")
    palette_mask = Image.fromarray(np.array([[0, 15, 255, 20]] * 3, np.uint8), mode="L").convert("P")
    palette_mask.save(voc / "SegmentationClass" / "2007_1.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_1\n")
    v = make_dense_dataset(f"VOC2012:root={voc}:split=val")
    assert v.info.num_classes == 21 and v[0]["label"][0].tolist() == [0, 15, 255, 20]
    nyu = tmp_path / "nyu"
    (nyu / "kitchen").mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(nyu / "kitchen" / "rgb_00001.jpg")
    Image.fromarray(np.full((48, 64), 2000, np.uint16)).save(nyu / "kitchen" / "sync_depth_00001.png")
    (nyu / "nyu_test.txt").write_text("/kitchen/rgb_00001.jpg /kitchen/sync_depth_00001.png 518.8579\n")
    n = make_dense_dataset(f"NYU:root={nyu}:split=test")
    assert n.info.eigen_crop and n[0]["label"].max().item() == 2.0


def test_kitti_layout_scale_crops_and_range_note(tmp_path, capsys):
    """KITTI (the depth toolboxes' Eigen lists): 1/256 m PNGs, lines without ground truth skipped, every image and
    label cut to the KB crop (bottom 352 rows, middle 1216 columns), the Garg crop at evaluation, and a note when
    a head's max_depth is below the 80 m the data reaches."""
    from dinokit.cli import main
    from dinokit.dense.metrics import garg_crop_mask

    kitti = tmp_path / "kitti"
    (kitti / "drive").mkdir(parents=True)
    rows = np.arange(375, dtype=np.float32)[:, None].repeat(1242, 1)  # depth = row index / 10 m
    Image.fromarray(np.zeros((375, 1242, 3), np.uint8)).save(kitti / "drive" / "0001.png")
    Image.fromarray((rows / 10 * 256).astype(np.uint16)).save(kitti / "drive" / "0001_depth.png")
    (kitti / "kitti_eigen_test.txt").write_text("drive/0001.png drive/0001_depth.png 721.5377\n"
                                                "drive/0002.png None 721.5377\n")
    ds = make_dense_dataset(f"KITTI:root={kitti}:split=test")
    assert len(ds) == 1 and ds.info.garg_crop and ds.info.depth_range == 80
    item = ds[0]
    assert item["image"].shape == (3, 352, 1216) and item["label"].shape == (352, 1216)
    # the bottom rows: the first kept row is 375 - 352 = 23, i.e. 2.3 m
    assert item["label"][0, 0].item() == pytest.approx(2.3, abs=1 / 256)
    assert item["label"][-1, 0].item() == pytest.approx(37.4, abs=1 / 256)
    mask = garg_crop_mask(352, 1216)
    assert mask[int(0.41 * 352), int(0.5 * 1216)] and not mask[0, 600] and not mask[200, 10]
    meter = DepthMetrics(max_depth=80, garg_crop=True)
    meter.update(item["label"] + 1, item["label"])
    assert meter.compute()["rmse"] == pytest.approx(1.0)
    # training on it with the default max_depth of 10 m: said before anything runs
    (kitti / "train" / "images").mkdir(parents=True)
    (kitti / "train" / "depth").mkdir(parents=True)
    Image.fromarray(np.zeros((375, 1242, 3), np.uint8)).save(kitti / "train" / "images" / "a.png")
    Image.fromarray((rows / 10 * 256).astype(np.uint16)).save(kitti / "train" / "depth" / "a.png")
    argv = ["dense", "train", "--task", "depth", "--head", "linear", "--model", "dinov2_vits14", "--random-init",
            "--train-dataset", f"KITTI:root={kitti}:split=train", "--val-dataset", f"KITTI:root={kitti}:split=test",
            "--output-dir", str(tmp_path / "out"), "--no-progress", "--device", "cpu", "iterations=1", "batch_size=1",
            "augment=false", "crop_size=28,56", "eval_size=28", "eval_period=0", "num_workers=0"]
    assert main(argv) == 2  # within the Garg crop every val depth is beyond 10 m: nothing to score (it was NaN)
    captured = capsys.readouterr()
    assert ("holds depths up to 80 m but the head's max_depth is 10; set max_depth=80 (KITTI's own settings: "
            "max_depth=80 crop_size=352,704)") in captured.out
    assert captured.err.strip().endswith("has a depth within the head's range (0.001-10 m): nothing to score; check "
                                         "the labels, or min_depth/max_depth")


def test_generated_sets(tmp_path):
    from dinokit.dense.generated import write_dense_sample

    root = write_dense_sample("seg", tmp_path / "s", counts={"train": 3})
    seg = make_dense_dataset(f"SegFolder:root={tmp_path / 's' / 'train'}")
    assert root == tmp_path / "s" and len(seg) == 3 and seg.info.num_classes == 9 and seg.classes[0] == "background"
    labels = torch.cat([seg[i]["label"].flatten() for i in range(3)])
    assert labels.min() == 0 and labels.max() <= 8 and len(labels.unique()) >= 2
    write_dense_sample("depth", tmp_path / "d", counts={"train": 3})
    depth = make_dense_dataset(f"DepthFolder:root={tmp_path / 'd' / 'train'}")
    d = depth[0]["label"]
    assert d.shape == (64, 64) and 0.2 < d.min() and d.max() <= 10.0
    assert d[-1].mean() < d[32].mean()  # the floor comes nearer towards the bottom of the picture


def test_texture_on_texture_mosaic():
    from dinokit.dense.generated import render_mosaic

    for seed in range(6):
        flat_image, flat_mask = render_mosaic(np.random.default_rng(seed))
        image, mask = render_mosaic(np.random.default_rng(seed), textured_background=True)
        inside, classes = flat_mask > 0, np.unique(mask)
        # same object (texture and outline; its pixels are drawn later); the background is another texture
        assert (mask > 0).all() and len(classes) == 2 and (mask[inside] == flat_mask[inside]).all()
        assert (mask[~inside] != flat_mask[inside][0]).all()
        outside = np.asarray(image)[~inside].astype(float)
        assert outside.std() > 1.5 * np.asarray(flat_image)[~inside].astype(float).std()  # a pattern, not flat noise


def test_voc_palette():
    from dinokit.dense.inference import colourise_seg, palette

    voc = palette("voc", 21)
    assert voc[0].tolist() == [0, 0, 0] and voc[1].tolist() == [128, 0, 0] and voc[2].tolist() == [0, 128, 0]
    assert voc[15].tolist() == [192, 128, 128]  # person
    picture = colourise_seg(np.array([[1, 255]]), "voc", 21)
    assert picture.tolist() == [[[128, 0, 0], [0, 0, 0]]]
