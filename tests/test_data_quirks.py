"""The quirks of the real benchmark files (README "Known quirks of the benchmark files"), each reproduced
on a tiny fake tree with the official file names: GTA5 image/label size mismatches, Cityscapes' placeholder
test labels, Foggy Cityscapes' official box filtering, BDD100K frames listed in the other split's json
(or in none) and the hand-checked night list, ACDC in MIC's flat rsync layout, VisDA's .png renders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from mic_uda.data.acdc import ACDC
from mic_uda.data.bdd100k import BDD100K
from mic_uda.data.cls_files import ClassFolderDataset
from mic_uda.data.det_files import CityscapesDetection
from mic_uda.data.seg_files import GTA5, Cityscapes


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# --- GTA5: image and label of different sizes ------------------------------------------------------

GTA_HW = (1052, 1914)  # the frames' size; a few labels are a few pixels off


def _gta_label(h: int, w: int) -> np.ndarray:
    """Cityscapes ids: road (7 -> 0) on the top half of the label's rows, car (26 -> 13) below."""
    lab = np.full((h, w), 7, np.uint8)
    lab[h // 2 :] = 26
    return lab


def _gta(root: Path, label_heights: dict[str, int]) -> Path:
    for stem, lh in label_heights.items():
        _write(root / "images" / f"{stem}.png", np.zeros((*GTA_HW, 3), np.uint8))
        _write(root / "labels" / f"{stem}.png", _gta_label(lh, GTA_HW[1]))
    return root


def _nearest_rows(src_h: int, out_h: int) -> np.ndarray:
    """The rows torch's 'nearest' resize picks: floor(i * src / out)."""
    return np.floor(np.arange(out_h) * (src_h / out_h)).astype(int)


def test_gta5_mismatched_pairs_are_resized_each_on_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 00001: label 2 rows taller (1054 -> 705 rows at the keep-ratio scale 1280/1914: one row cut);
    # 00002: label 2 rows shorter (1050 -> 702 rows: two rows of 255 padded); 00003: matching
    root = _gta(tmp_path / "gta", {"00001": 1054, "00002": 1050, "00003": 1052})
    ds = GTA5(root, crop_size=None)  # the preset's resize: (1280, 720) keeping the ratio
    caplog.set_level(logging.WARNING, logger="mic_uda.data.seg_files")
    tall, short, same = ds[0], ds[1], ds[2]
    for item in (tall, short, same):
        assert item["image"].shape == (3, 704, 1280) and item["label"].shape == (704, 1280)
    rows = _nearest_rows(1054, 705)[:704]  # 705 rows, the last one cut
    expected = np.where(rows >= 1054 // 2, 13, 0)
    assert (tall["label"].numpy() == expected[:, None]).all()
    rows = _nearest_rows(1050, 702)
    expected = np.concatenate([np.where(rows >= 1050 // 2, 13, 0), [255, 255]])
    assert (short["label"].numpy() == expected[:, None]).all()
    # one warning per mismatched pair, naming both files and both sizes, not repeated on re-reads
    ds[0], ds[1]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "labels/00001.png is 1914x1054, its image" in warnings[0]
    assert "images/00001.png is 1914x1052" in warnings[0]
    assert "to 1280x704 and 1280x705; the label is then cut or padded with 255" in warnings[0]
    assert "labels/00002.png is 1914x1050" in warnings[1] and "1280x704 and 1280x702" in warnings[1]
    # exact resize (keep_ratio=false): both to 1280x720, nothing left to cut
    exact = GTA5(root, crop_size=None, keep_ratio=False)[0]
    assert exact["label"].shape == (720, 1280)
    assert (exact["label"].numpy() == np.where(_nearest_rows(1054, 720) >= 527, 13, 0)[:, None]).all()
    # the preset's training crop goes through
    crop = GTA5(root, hflip=True, cat_max_ratio=0.75)[0]
    assert crop["image"].shape == (3, 512, 512) and crop["label"].shape == (512, 512)


def test_gta5_mismatch_is_logged_once_across_dataloader_workers(tmp_path: Path) -> None:
    root = _gta(tmp_path / "gta", {"00001": 1054, "00003": 1052})
    ds = GTA5(root, resize=(64, 36), crop_size=None)
    assert ds._size_mismatch_logged.is_shared()
    for _ in range(2):  # two epochs of fresh workers
        for batch in DataLoader(ds, batch_size=1, num_workers=2):
            assert batch["label"].shape[-2:] == (35, 64)  # 1914x1052 -> 64x35
    assert ds._size_mismatch_logged.tolist() == [True, False]  # set by a worker, seen by every process


def test_gta5_mismatch_errors(tmp_path: Path) -> None:
    root = _gta(tmp_path / "gta", {"00001": 1054})
    with pytest.raises(ValueError) as err:  # no resize: a clear error naming both files
        GTA5(root, resize=None, crop_size=None)[0]
    msg = _one_line(err)
    assert f"{root}/labels/00001.png: label size (1054, 1914) != image size (1052, 1914) of " in msg
    assert f"{root}/images/00001.png: expected the same size" in msg
    _write(root / "labels" / "00001.png", _gta_label(960, 1914))  # another aspect ratio: not its label
    with pytest.raises(ValueError) as err:
        GTA5(root, crop_size=None)[0]
    msg = _one_line(err)
    assert "labels/00001.png: label size (960, 1914) != image size (1052, 1914)" in msg
    assert "images/00001.png, aspect ratios 9.6% apart: expected the same size, or one within 2%" in msg


# --- Cityscapes: the test split's labels are placeholders ------------------------------------------


def _cityscapes_test(root: Path) -> Path:
    stem = "berlin_000000_000019"
    _write(
        root / "leftImg8bit" / "test" / "berlin" / f"{stem}_leftImg8bit.png", np.zeros((8, 16, 3), np.uint8)
    )
    gt = root / "gtFine" / "test" / "berlin"
    _write(gt / f"{stem}_gtFine_labelIds.png", np.zeros((8, 16), np.uint8))
    _write(gt / f"{stem}_gtFine_instanceIds.png", np.zeros((8, 16), np.uint16))
    _write(
        root / "leftImg8bit_foggy" / "test" / "berlin" / f"{stem}_leftImg8bit_foggy_beta_0.02.png",
        np.zeros((8, 16, 3), np.uint8),
    )
    return root


def test_cityscapes_test_split_with_labels_is_a_one_line_error(tmp_path: Path) -> None:
    root = _cityscapes_test(tmp_path / "cityscapes")
    with pytest.raises(ValueError) as err:
        Cityscapes(root, split="test")
    assert _one_line(err) == (
        f"Cityscapes/test: '{root}/gtFine/test' holds placeholder labels, not the test annotations (those "
        "stay on the benchmark server): expected split=val for scores, or with_labels=false to read the "
        "test images"
    )
    images = Cityscapes(root, split="test", with_labels=False, resize=None, crop_size=None)
    assert len(images) == 1 and "label" not in images[0]
    with pytest.raises(ValueError) as err:
        CityscapesDetection(root, split="test", foggy=True)
    assert "placeholder masks" in _one_line(err) and f"'{root}/gtFine/test'" in str(err.value)


# --- Foggy Cityscapes: the official box filtering --------------------------------------------------

FOGGY = "_leftImg8bit_foggy_beta_0.02.png"


def _instances_frame() -> np.ndarray:
    ids = np.zeros((16, 32), np.uint16)
    ids[:, :] = 7  # road (a stuff id)
    ids[2:5, 4:8] = 26000  # car: 3 x 4 block -> kept
    ids[8:12, 2:5] = 24000  # person: a block ...
    ids[14, 10] = 24000  # ... and a lone pixel (an outline of 1 point): the whole instance dropped
    ids[1, 20:22] = 33000  # bicycle: 2 pixels (an outline of 2 points): dropped
    ids[5, 20:22] = 25000  # rider: an L of 3 pixels (outline of 3 points), box 2 x 2: kept
    ids[6, 20] = 25000
    ids[8:12, 25] = 27000  # truck: a 1 px wide column of 4 pixels: passes the converter, too thin to train
    ids[14, 28:31] = 26  # a car group (id < 1000, no instance): never a box
    return ids


def _foggy(root: Path, split: str = "train") -> Path:
    thin_only = np.zeros((16, 32), np.uint16)
    thin_only[3:9, 12] = 26001  # only a 1 px wide car
    frames = {
        ("aachen", "aachen_000000_000019"): _instances_frame(),
        ("aachen", "aachen_000001_000019"): thin_only,
        ("bochum", "bochum_000000_000313"): np.full((16, 32), 7, np.uint16),  # no instance at all
    }
    for (city, stem), ids in frames.items():
        rgb = np.zeros((16, 32, 3), np.uint8)
        _write(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb)
        _write(root / "leftImg8bit_foggy" / split / city / f"{stem}{FOGGY}", rgb)
        _write(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", ids)
    return root


def _targets(item: dict) -> tuple[list[list[float]], list[int]]:
    keep = item["labels"] > 0
    return item["boxes"][keep].tolist(), item["labels"][keep].tolist()


def test_foggy_cityscapes_official_box_filtering(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _foggy(tmp_path)
    # off (the default, a user's data): every instance of the 8 classes
    every = CityscapesDetection(root, "train", foggy=True, resize=None)
    assert len(every) == 3
    assert _targets(every[0]) == (
        [[2, 8, 11, 15], [20, 5, 22, 7], [4, 2, 8, 5], [25, 8, 26, 12], [20, 1, 22, 2]],
        [1, 2, 3, 4, 8],  # person, rider, car, truck, bicycle
    )
    assert _targets(every[1]) == ([[12, 3, 13, 9]], [3]) and _targets(every[2]) == ([], [])
    # the converter's outline filter (every split; what the official evaluation json holds)
    converted = CityscapesDetection(root, "train", foggy=True, resize=None, drop_tiny_instances=True)
    assert len(converted) == 3
    assert _targets(converted[0]) == ([[20, 5, 22, 7], [4, 2, 8, 5], [25, 8, 26, 12]], [2, 3, 4])
    assert _targets(converted[1]) == ([[12, 3, 13, 9]], [3])
    # + the training loader: boxes 1 px wide or tall, then the images left without a box
    caplog.set_level(logging.WARNING, logger="mic_uda.data.det_files")
    train = CityscapesDetection(
        root, "train", foggy=True, resize=(64, 32), drop_tiny_instances=True, drop_thin_boxes=True
    )
    assert [p.name for p in train.images] == [f"aachen_000000_000019{FOGGY}"]
    assert _targets(train[0]) == ([[40, 10, 44, 14], [8, 4, 16, 10]], [2, 3])  # x2, after the filter
    assert caplog.messages == [
        "Cityscapes detection leftImg8bit_foggy/train: 2 of 3 images have no box wider and taller than "
        "1 px and are left out (drop_thin_boxes, as the official training loader)"
    ]


def test_foggy_cityscapes_filtering_errors(tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    _write(
        root / "leftImg8bit" / "train" / "ulm" / "ulm_000000_000019_leftImg8bit.png",
        np.zeros((8, 8, 3), np.uint8),
    )
    _write(
        root / "gtFine" / "train" / "ulm" / "ulm_000000_000019_gtFine_instanceIds.png",
        np.zeros((8, 8), np.uint16),
    )
    with pytest.raises(ValueError) as err:
        CityscapesDetection(root, "train", drop_thin_boxes=True)
    msg = _one_line(err)
    assert msg.startswith("Cityscapes detection leftImg8bit/train: none of the 1 instance masks under ")
    assert f"'{root}/gtFine/train' has a box wider and taller than 1 px" in msg


def test_cs2foggy_preset_switches_the_official_filtering_on(make_cfg, tmp_path: Path) -> None:
    from mic_uda.train import build_datamodule

    root = tmp_path / "data" / "cityscapes"
    _foggy(root, "train")
    _foggy(root, "val")
    cfg = make_cfg(
        [
            "experiment=mic_sada_cs2foggy",
            "backbone.backbone_weights=null",
            f"paths.data_dir={tmp_path / 'data'}",
            "data.datamodule.num_workers=0",
        ],
        tiny=False,
    )
    dm_cfg = cfg.data.datamodule
    assert cfg.data.official_boxes is True
    assert dm_cfg.source.drop_tiny_instances and dm_cfg.source.drop_thin_boxes
    assert dm_cfg.target.drop_tiny_instances and dm_cfg.target.drop_thin_boxes
    assert dm_cfg.val.drop_tiny_instances and "drop_thin_boxes" not in dm_cfg.val
    dm = build_datamodule(cfg)
    dm.setup("fit")
    assert [len(dm.datasets[k]) for k in ("source", "target", "val")] == [1, 1, 3]
    val_boxes, val_labels = _targets(dm.datasets["val"][0])  # 32x16 -> 1600x800: x50
    assert val_labels == [2, 3, 4] and val_boxes[2] == [1250, 400, 1300, 600]  # the thin truck stays


# --- BDD100K: frames in the other split's json, or in none; the night list --------------------------

BDD_TRAIN = ("0a0a0b1a-7c39d841", "0a0c3694-24b5193a", "0a1a0ec2-2ee9ea68", "0b2a2e1c-5f5e7a3c")
BDD_VAL = ("7d06fefd-f7be05a6", "7d128593-0ccfea4c")


def _bdd(root: Path) -> Path:
    for split, stems in (("train", BDD_TRAIN), ("val", BDD_VAL)):
        for i, stem in enumerate(stems):
            _write(root / "images" / "10k" / split / f"{stem}.jpg", np.full((12, 16, 3), 40 * i, np.uint8))
            _write(
                root / "labels" / "sem_seg" / "masks" / split / f"{stem}.png", np.full((12, 16), i, np.uint8)
            )

    def entry(stem: str, time: str) -> dict:
        return {"name": f"{stem}.jpg", "attributes": {"timeofday": time, "weather": "clear"}, "labels": []}

    train_json = [entry(BDD_TRAIN[0], "night"), entry(BDD_TRAIN[3], "daytime")]
    # BDD_TRAIN[1] is a 10k train frame listed only in the val json (bdd100k #132); [2] is in neither
    val_json = [entry(BDD_TRAIN[1], "night"), entry(BDD_VAL[0], "night"), entry(BDD_VAL[1], "daytime")]
    (root / "labels" / "bdd100k_labels_images_train.json").write_text(json.dumps(train_json))
    (root / "labels" / "bdd100k_labels_images_val.json").write_text(json.dumps(val_json))
    return root


def test_bdd100k_looks_frames_up_in_both_jsons(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _bdd(tmp_path / "bdd100k")
    caplog.set_level(logging.WARNING, logger="mic_uda.data.bdd100k")
    train = BDD100K(root, split="train", resize=None, crop_size=None)
    assert [p.stem for p, _ in train.pairs] == [BDD_TRAIN[0], BDD_TRAIN[1]]
    labels = root / "labels"
    assert caplog.messages == [
        f"BDD100K/train: 1 of 4 frames have no entry in '{labels}/bdd100k_labels_images_train.json' or "
        f"'{labels}/bdd100k_labels_images_val.json' and are left out"
    ]
    caplog.clear()
    val = BDD100K(root, split="val", resize=None, crop_size=None)
    assert [p.stem for p, _ in val.pairs] == [BDD_VAL[0]] and caplog.messages == []
    assert [p.stem for p, _ in BDD100K(root, split="train", time_of_day="daytime").pairs] == [BDD_TRAIN[3]]
    # without the other split's json the frame it alone lists is left out, in the same one warning
    (labels / "bdd100k_labels_images_val.json").unlink()
    caplog.clear()
    assert [p.stem for p, _ in BDD100K(root, split="train").pairs] == [BDD_TRAIN[0]]
    assert caplog.messages == [
        f"BDD100K/train: 2 of 4 frames have no entry in '{labels}/bdd100k_labels_images_train.json' and "
        "are left out"
    ]


def test_bdd100k_one_night_list_across_train_and_val(tmp_path: Path) -> None:
    root = _bdd(tmp_path / "bdd100k")
    (root / "lists").mkdir()
    lines = [
        BDD_TRAIN[0],  # a stem
        f"train/{BDD_TRAIN[3]}.jpg",  # <split>/<file name>
        f"images/10k/val/{BDD_VAL[1]}.jpg",  # a path below the root
        f"{BDD_VAL[0]}.jpg",  # a file name
    ]
    (root / "lists" / "night.txt").write_text("\n".join(lines) + "\n")
    train = BDD100K(root, split="train", split_file="lists/night.txt", resize=None, crop_size=None)
    val = BDD100K(root, split="val", split_file="lists/night.txt", resize=None, crop_size=None)
    assert [p.stem for p, _ in train.pairs] == [BDD_TRAIN[0], BDD_TRAIN[3]]
    assert [p.stem for p, _ in val.pairs] == [BDD_VAL[0], BDD_VAL[1]]
    assert val.name == "BDD100K/val/lists/night.txt" and val[1]["label"].unique().tolist() == [1]


def test_bdd100k_night_list_errors(tmp_path: Path) -> None:
    root = _bdd(tmp_path / "bdd100k")
    images = root / "images" / "10k"
    (root / "missing.txt").write_text(f"{BDD_VAL[0]}\nffffffff-00000000\n")
    with pytest.raises(FileNotFoundError) as err:
        BDD100K(root, split="val", split_file="missing.txt")
    assert _one_line(err) == (
        f"BDD100K: '{images}/val/ffffffff-00000000.jpg' listed in 'missing.txt' does not exist "
        f"(nor in {images}/train)"
    )
    (root / "wrong_split.txt").write_text(f"val/{BDD_TRAIN[0]}.jpg\n")  # a train frame said to be in val
    with pytest.raises(FileNotFoundError) as err:
        BDD100K(root, split="train", split_file="wrong_split.txt")
    assert _one_line(err) == (
        f"BDD100K: '{images}/val/{BDD_TRAIN[0]}.jpg' listed in 'wrong_split.txt' does not exist"
    )
    (root / "val_only.txt").write_text(f"{BDD_VAL[0]}\n")
    with pytest.raises(ValueError) as err:
        BDD100K(root, split="train", split_file="val_only.txt")
    assert _one_line(err).startswith(f"BDD100K: 'val_only.txt' lists no frame of '{images}/train'")


# --- ACDC: MIC README's flat rsync copy -------------------------------------------------------------

ACDC_FRAMES = {
    "fog": "GOPR0475_frame_000041",
    "night": "GOPR0351_frame_000159",
    "rain": "GOPR0400_frame_000001",
    "snow": "GOPR0122_frame_000161",
}


def _acdc_published(root: Path, split: str) -> None:
    for i, (cond, stem) in enumerate(ACDC_FRAMES.items()):
        seq = stem.split("_")[0]
        _write(
            root / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png", np.full((12, 16, 3), i, np.uint8)
        )
        gt = root / "gt" / cond / split / seq
        _write(gt / f"{stem}_gt_labelTrainIds.png", np.full((12, 16), i, np.uint8))
        _write(gt / f"{stem}_gt_labelIds.png", np.full((12, 16), 7, np.uint8))
        _write(gt / f"{stem}_gt_labelColor.png", np.zeros((12, 16, 3), np.uint8))


def _acdc_flat(root: Path, split: str) -> None:
    """What MIC's README's rsync lines leave: rgb_anon/<split>/*, gt/<split>/*_labelTrainIds.png."""
    for i, stem in enumerate(ACDC_FRAMES.values()):
        _write(root / "rgb_anon" / split / f"{stem}_rgb_anon.png", np.full((12, 16, 3), i, np.uint8))
        _write(root / "gt" / split / f"{stem}_gt_labelTrainIds.png", np.full((12, 16), i, np.uint8))


def test_acdc_reads_the_flat_rsync_layout(tmp_path: Path) -> None:
    root = tmp_path / "acdc"
    _acdc_flat(root, "train")
    _acdc_flat(root, "val")
    train = ACDC(root, split="train", with_labels=False, resize=(32, 24), crop_size=16, hflip=True)
    assert len(train) == 4 and train.name == "ACDC/train/all" and train[0]["image"].shape == (3, 16, 16)
    val = ACDC(root, split="val", resize=None, crop_size=None, native_label=True)
    assert [p.name for p, _ in val.pairs] == sorted(f"{s}_rgb_anon.png" for s in ACDC_FRAMES.values())
    assert val.pairs[0][1] == root / "gt" / "val" / "GOPR0122_frame_000161_gt_labelTrainIds.png"
    assert val[0]["label"].unique().tolist() == [3]  # snow's frame sorts first, train id 3
    with pytest.raises(ValueError) as err:  # the flat copy does not say which frame is which condition
        ACDC(root, split="val", conditions=["night"])
    assert _one_line(err) == (
        f"ACDC: conditions ['night'] need the per-condition folders '{root}/rgb_anon/<condition>/val'; "
        f"the flat '{root}/rgb_anon/val' mixes all four"
    )
    (root / "gt" / "val" / "GOPR0475_frame_000041_gt_labelTrainIds.png").unlink()
    with pytest.raises(FileNotFoundError) as err:
        ACDC(root, split="val")
    assert f"'{root}/gt/val/GOPR0475_frame_000041_gt_labelTrainIds.png' for image" in _one_line(err)


def test_acdc_published_layout_wins_next_to_the_flat_copy(tmp_path: Path) -> None:
    root = tmp_path / "acdc"
    _acdc_published(root, "val")
    _acdc_flat(root, "val")  # after the rsync both are there, the same frames
    both = ACDC(root, split="val", resize=None, crop_size=None)
    assert both.name == "ACDC/val/fog+night+rain+snow" and len(both) == 4
    assert [p.parent.parent.parent.name for p, _ in both.pairs] == list(ACDC_FRAMES)
    night = ACDC(root, split="val", conditions=["night"], resize=None, crop_size=None)
    assert len(night) == 1 and night[0]["label"].unique().tolist() == [1]


# --- VisDA-2017: .png renders, .jpg photos ----------------------------------------------------------

VISDA_CLASSES = ["aeroplane", "bicycle", "bus", "car", "horse", "knife", "motorcycle", "person", "plant",
                 "skateboard", "train", "truck"]  # fmt: skip


def test_visda_reads_png_renders_and_jpg_photos(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from mic_uda.utils.hydra_utils import CONFIG_DIR

    assert OmegaConf.load(Path(CONFIG_DIR) / "data" / "visda.yaml").class_names == VISDA_CLASSES
    root = tmp_path / "visda2017"
    for k, cls in enumerate(VISDA_CLASSES):
        render = f"src_1_0269115{k}_10155655850468db78d106ce0a280f87__1_1_150.png"
        _write(root / "train" / cls / render, np.full((20, 24, 3), 10 * k, np.uint8))
        _write(root / "validation" / cls / f"{cls}_{1000 + k}.jpg", np.full((20, 24, 3), 10 * k, np.uint8))
    (root / "train" / "image_list.txt").write_text("aeroplane/src_1_....png 0\n")
    train = ClassFolderDataset(root, "train", VISDA_CLASSES, image_size=8, pre_crop_size=10, train=True)
    val = ClassFolderDataset(root, "validation", VISDA_CLASSES, image_size=8, pre_crop_size=10)
    assert len(train) == len(val) == 12
    assert {p.suffix for p, _ in train.samples} == {".png"} and {p.suffix for p, _ in val.samples} == {".jpg"}
    assert train.targets.tolist() == list(range(12)) and val[11]["label"].item() == 11
