"""The real-data layouts of SPEC 9 (SYNTHIA, ACDC, Dark Zurich, BDD100K, + class subsets and crop
recipes) on tiny fixtures written in each layout: loading, id mapping, and errors that name the path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_layouts import random_rgb, write_png16
from data_layouts import write_png as _write
from PIL import Image

from mic_uda.data.acdc import ACDC
from mic_uda.data.bdd100k import BDD100K
from mic_uda.data.dark_zurich import DarkZurich
from mic_uda.data.seg_files import Cityscapes, FolderSegDataset
from mic_uda.data.synthia import SYNTHIA, SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES

SHAPE = (12, 16)


def _rgb(seed: int = 0) -> np.ndarray:
    return random_rgb(SHAPE, seed)


# --- SYNTHIA -------------------------------------------------------------------------------------


def _synthia_ids() -> np.ndarray:
    ids = np.zeros((*SHAPE, 3), dtype=np.uint16)
    ids[..., 0] = 3  # road
    ids[:, 4:8, 0] = 8  # car
    ids[:, 8:12, 0] = 21  # wall
    ids[:, 12:, 0] = 22  # lanemarking -> ignore
    ids[0, :, 0] = 0  # void
    ids[..., 1] = 1000 + np.arange(SHAPE[1])  # instance ids in channel 1 must not leak into the class
    return ids


def _synthia(root: Path, stems: tuple[str, ...] = ("0000000", "0000001")) -> Path:
    for i, stem in enumerate(stems):
        _write(root / "RGB" / f"{stem}.png", _rgb(i))
        write_png16(root / "GT" / "LABELS" / f"{stem}.png", _synthia_ids())
    return root


def test_synthia_reads_16bit_labels_and_maps_to_train_ids(tmp_path: Path) -> None:
    root = _synthia(tmp_path)
    label_file = root / "GT" / "LABELS" / "0000000.png"
    assert np.array(Image.open(label_file))[..., 0].max() == 0  # why PIL is not used for these files
    s = SYNTHIA(root, resize=None, crop_size=None)[0]
    assert s["image"].shape == (3, *SHAPE)
    lab = s["label"]
    assert lab[1:, :4].unique().tolist() == [0] and lab[1:, 4:8].unique().tolist() == [13]
    assert lab[1:, 8:12].unique().tolist() == [3] and lab[:, 12:].unique().tolist() == [255]
    assert lab[0].unique().tolist() == [255]
    s16 = SYNTHIA(root, resize=None, crop_size=None, class_subset=SYNTHIA_16_CLASSES)
    assert s16.num_classes == 16 and s16[0]["label"][1:, 4:8].unique().tolist() == [12]  # car
    s13 = SYNTHIA(root, resize=None, crop_size=None, class_subset=SYNTHIA_13_CLASSES)
    assert s13.num_classes == 13 and s13[0]["label"][1:, 8:12].unique().tolist() == [255]  # wall dropped
    crop = SYNTHIA(root, resize=(32, 24), crop_size=8, hflip=True)[1]
    assert crop["image"].shape == (3, 8, 8) and crop["label"].shape == (8, 8)


def test_synthia_uses_daformer_converted_train_ids(tmp_path: Path) -> None:
    root = _synthia(tmp_path)
    for stem in ("0000000", "0000001"):
        _write(root / "GT" / "LABELS" / f"{stem}_labelTrainIds.png", np.full(SHAPE, 6, dtype=np.uint8))
    ds = SYNTHIA(root, resize=None, crop_size=None)
    assert len(ds) == 2 and ds[0]["label"].unique().tolist() == [6]


def test_synthia_errors_name_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere/RGB.*GT/LABELS/\*\.png"):
        SYNTHIA(tmp_path / "nowhere")
    _write(tmp_path / "RGB" / "0000005.png", _rgb())
    with pytest.raises(FileNotFoundError, match=r"GT/LABELS' not found"):
        SYNTHIA(tmp_path)
    (tmp_path / "GT" / "LABELS").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"label file '.*GT/LABELS/0000005\.png' for image"):
        SYNTHIA(tmp_path)
    assert "label" not in SYNTHIA(tmp_path, with_labels=False, resize=None, crop_size=None)[0]
    (tmp_path / "GT" / "LABELS" / "0000005.png").write_bytes(b"broken")
    with pytest.raises(OSError, match=r"0000005\.png: cannot read label PNG"):
        SYNTHIA(tmp_path, resize=None, crop_size=None)[0]


# --- ACDC ----------------------------------------------------------------------------------------


def _acdc(
    root: Path, conditions: tuple[str, ...] = ("fog", "night"), split: str = "val", value: int = 13
) -> Path:
    for ci, cond in enumerate(conditions):
        seq = "GOPR0475" if cond == "fog" else "GP010376"
        stem = f"{seq}_frame_00000{ci}"
        _write(root / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png", _rgb(ci))
        _write(
            root / "gt" / cond / split / seq / f"{stem}_gt_labelTrainIds.png", np.full(SHAPE, value, np.uint8)
        )
        _write(root / "gt" / cond / split / seq / f"{stem}_gt_labelColor.png", _rgb(9))  # ignored
    return root


def test_acdc_reads_conditions_in_the_published_layout(tmp_path: Path) -> None:
    root = _acdc(tmp_path)
    both = ACDC(root, split="val", conditions=["fog", "night"], resize=None, crop_size=None)
    assert len(both) == 2 and both[1]["label"].unique().tolist() == [13]
    assert both.pairs[1][1].name == "GP010376_frame_000001_gt_labelTrainIds.png"
    night = ACDC(root, split="val", conditions="night", resize=(16, 12), crop_size=None)
    assert len(night) == 1 and night.name == "ACDC/val/night"
    target = ACDC(
        root, split="val", conditions=["fog"], with_labels=False, resize=(32, 24), crop_size=16, hflip=True
    )
    assert "label" not in target[0] and target[0]["image"].shape == (3, 16, 16)


def test_acdc_label_ids_are_mapped_when_no_train_ids(tmp_path: Path) -> None:
    root = tmp_path
    img = _write(root / "rgb_anon" / "rain" / "val" / "s1" / "s1_frame_000001_rgb_anon.png", _rgb())
    _write(
        root / "gt" / "rain" / "val" / "s1" / "s1_frame_000001_gt_labelIds.png", np.full(SHAPE, 26, np.uint8)
    )
    ds = ACDC(root, split="val", conditions=["rain"], resize=None, crop_size=None)
    assert ds[0]["label"].unique().tolist() == [13] and img == ds.pairs[0][0]


def test_acdc_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere/rgb_anon/fog/train' not found.*rgb_anon/<fog"):
        ACDC(tmp_path / "nowhere")
    root = _acdc(tmp_path, conditions=("fog",), split="val")
    with pytest.raises(FileNotFoundError, match=r"rgb_anon/snow/val' not found"):
        ACDC(root, split="val", conditions=["fog", "snow"])
    with pytest.raises(ValueError, match=r"conditions \['haze'\].*'fog', 'night', 'rain', 'snow'"):
        ACDC(root, split="val", conditions=["haze"])
    (root / "rgb_anon" / "fog" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no \*/\*_rgb_anon\.png in '.*fog/train'"):
        ACDC(root, split="train", conditions=["fog"])
    _write(root / "rgb_anon" / "fog" / "val" / "GOPR0475" / "GOPR0475_frame_000099_rgb_anon.png", _rgb())
    with pytest.raises(FileNotFoundError, match=r"GOPR0475_frame_000099_gt_labelTrainIds\.png' for image"):
        ACDC(root, split="val", conditions=["fog"])


def test_label_id_outside_the_classes_names_the_file(tmp_path: Path) -> None:
    root = _acdc(tmp_path, conditions=("fog",), value=30)
    with pytest.raises(
        ValueError, match=r"GOPR0475_frame_000000_gt_labelTrainIds\.png: label ids \[30\] outside 0\.\.18"
    ):
        ACDC(root, split="val", conditions=["fog"], resize=None, crop_size=None)[0]


# --- Dark Zurich ---------------------------------------------------------------------------------


def _dark_zurich(root: Path) -> Path:
    for i, tod in enumerate(("night", "day")):
        _write(
            root / "rgb_anon" / "train" / tod / "GOPR0348" / f"GOPR0348_frame_00010{i}_rgb_anon.png", _rgb(i)
        )
    img = root / "rgb_anon" / "val" / "night" / "GOPR0356" / "GOPR0356_frame_000321_rgb_anon.png"
    _write(img, _rgb(5))
    gt = root / "gt" / "val" / "night" / "GOPR0356"
    _write(gt / "GOPR0356_frame_000321_gt_labelTrainIds.png", np.full(SHAPE, 10, np.uint8))
    _write(gt / "GOPR0356_frame_000321_gt_invIds.png", np.zeros(SHAPE, np.uint8))  # ignored
    return root


def test_dark_zurich_train_unlabelled_and_val_night(tmp_path: Path) -> None:
    root = _dark_zurich(tmp_path)
    train = DarkZurich(root, split="train", with_labels=False, resize=(32, 24), crop_size=16)
    assert len(train) == 1 and train.pairs[0][0].parent.parent.name == "night"
    assert "label" not in train[0] and train[0]["image"].shape == (3, 16, 16)
    assert len(DarkZurich(root, split="train", time_of_day="day", with_labels=False)) == 1
    val = DarkZurich(root, split="val", resize=(16, 12), crop_size=None)
    assert val[0]["label"].unique().tolist() == [10] and val[0]["image"].shape == (3, 12, 16)


def test_dark_zurich_errors(tmp_path: Path) -> None:
    root = _dark_zurich(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"gt/train/night' not found.*with_labels=false"):
        DarkZurich(root, split="train")
    with pytest.raises(ValueError, match=r"time_of_day 'dusk'"):
        DarkZurich(root, time_of_day="dusk")
    with pytest.raises(FileNotFoundError, match=r"nowhere/rgb_anon/val/night' not found"):
        DarkZurich(tmp_path / "nowhere", split="val")
    _write(root / "rgb_anon" / "val" / "night" / "GOPR0356" / "GOPR0356_frame_000999_rgb_anon.png", _rgb())
    with pytest.raises(FileNotFoundError, match=r"GOPR0356_frame_000999_gt_labelTrainIds\.png' for image"):
        DarkZurich(root, split="val")


# --- BDD100K -------------------------------------------------------------------------------------

BDD_TIMES = {"a1": "night", "a2": "daytime", "a3": "night", "a4": None}


def _bdd(root: Path, split: str = "val") -> Path:
    for i, stem in enumerate(BDD_TIMES):
        _write(root / "images" / "10k" / split / f"{stem}.jpg", _rgb(i))
        _write(root / "labels" / "sem_seg" / "masks" / split / f"{stem}.png", np.full(SHAPE, i, np.uint8))
    entries = [
        {"name": f"{s}.jpg", "attributes": {"timeofday": t}} for s, t in BDD_TIMES.items() if t is not None
    ]
    entries.append({"name": "other.jpg", "attributes": {"timeofday": "night"}})  # not in the 10k set
    (root / "labels" / f"bdd100k_labels_images_{split}.json").write_text(json.dumps(entries))
    return root


def test_bdd100k_selects_night_frames_by_attribute_or_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _bdd(tmp_path)
    night = BDD100K(root, split="val", resize=None, crop_size=None)
    assert [p.stem for p, _ in night.pairs] == ["a1", "a3"] and night[1]["label"].unique().tolist() == [2]
    assert "1 of 4 frames have no entry" in caplog.text  # a4 is untagged
    assert len(BDD100K(root, split="val", time_of_day="daytime")) == 1
    assert len(BDD100K(root, split="val", time_of_day=None)) == 4
    (root / "lists").mkdir()
    (root / "lists" / "night_val.txt").write_text("a3\na4\n")
    listed = BDD100K(root, split="val", split_file="lists/night_val.txt", resize=(32, 24), crop_size=16)
    assert [p.stem for p, _ in listed.pairs] == ["a3", "a4"] and listed[0]["label"].shape == (16, 16)


def test_bdd100k_errors(tmp_path: Path) -> None:
    root = _bdd(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"images/10k/train' not found"):
        BDD100K(root, split="train")
    (root / "labels" / "bdd100k_labels_images_val.json").rename(root / "labels" / "moved.json")
    with pytest.raises(FileNotFoundError, match=r"bdd100k_labels_images_val\.json' not found.*split_file"):
        BDD100K(root, split="val")
    with pytest.raises(ValueError, match=r"none of the 4 images .* timeofday='dawn/dusk'"):
        BDD100K(root, split="val", time_of_day="dawn/dusk", attributes_json="labels/moved.json")
    with pytest.raises(ValueError, match=r"time_of_day 'evening'"):
        BDD100K(root, split="val", time_of_day="evening")
    (root / "labels" / "moved.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match=r"moved\.json: expected a json list"):
        BDD100K(root, split="val", attributes_json="labels/moved.json")
    (root / "list.txt").write_text("a9\n")
    with pytest.raises(FileNotFoundError, match=r"a9\.jpg' listed in 'list\.txt'"):
        BDD100K(root, split="val", split_file="list.txt")
    (root / "labels" / "sem_seg" / "masks" / "val" / "a1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"masks/val/a1\.png' for image"):
        BDD100K(root, split="val", time_of_day=None)


# --- shared recipe pieces ------------------------------------------------------------------------


def test_cityscapes_val_in_the_16_class_space(tmp_path: Path) -> None:
    lab = np.zeros(SHAPE, np.uint8)
    lab[:, 4:8], lab[:, 8:12], lab[:, 12:] = 9, 10, 16  # terrain, sky, train
    _write(tmp_path / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000019_leftImg8bit.png", _rgb())
    _write(tmp_path / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_labelTrainIds.png", lab)
    ds = Cityscapes(tmp_path, split="val", resize=None, crop_size=None, class_subset=SYNTHIA_16_CLASSES)
    label = ds[0]["label"]
    assert ds.num_classes == 16
    assert [label[0, c].item() for c in (0, 4, 8, 12)] == [0, 255, 9, 255]
    with pytest.raises(ValueError, match=r"class_subset \[0, 19\]"):
        Cityscapes(tmp_path, split="val", class_subset=[0, 19])


def test_cat_max_ratio_redraws_crops_dominated_by_one_class(tmp_path: Path) -> None:
    lab = np.zeros((16, 64), np.uint8)
    lab[:, 48:] = 1
    _write(tmp_path / "images" / "a.png", np.zeros((16, 64, 3), np.uint8))
    _write(tmp_path / "labels" / "a.png", lab)
    torch.manual_seed(0)

    def mixed_share(ratio: float) -> float:
        ds = FolderSegDataset(tmp_path, num_classes=2, crop_size=16, cat_max_ratio=ratio)
        shares = [(ds[0]["label"] == 1).float().mean().item() for _ in range(200)]
        return float(np.mean([0.25 < s < 0.75 for s in shares]))

    # 7 of 49 crop offsets are mixed (neither class > 75 %): ~14 % per draw, ~78 % with 10 re-draws
    assert mixed_share(1.0) < 0.3 and mixed_share(0.75) > 0.6


# --- the data configs on fixtures in every layout ------------------------------------------------


def _cityscapes(root: Path) -> None:
    for split in ("train", "val"):
        for i in range(2):
            stem = f"ulm_00000{i}_000019"
            _write(root / "leftImg8bit" / split / "ulm" / f"{stem}_leftImg8bit.png", _rgb(i))
            lab = np.full(SHAPE, 7, np.uint8)  # label ids: road ...
            lab[:, 8:] = 26  # ... and car
            _write(root / "gtFine" / split / "ulm" / f"{stem}_gtFine_labelIds.png", lab)


def _data_dir(root: Path) -> Path:
    _cityscapes(root / "cityscapes")
    _synthia(root / "synthia")
    gta_ids = np.full(SHAPE, 7, np.uint8)
    gta_ids[:, 8:] = 26
    for i in range(2):
        _write(root / "gta" / "images" / f"0000{i}.png", _rgb(i))
        _write(root / "gta" / "labels" / f"0000{i}.png", gta_ids)
    for split in ("train", "val"):
        _acdc(root / "acdc", conditions=("fog", "night", "rain", "snow"), split=split)
        _bdd(root / "bdd100k", split=split)
    _dark_zurich(root / "dark_zurich")
    return root


CONFIGS = {  # data option -> (num_classes, resized validation (h, w))
    "gta2cs": (19, (512, 1024)),
    "synthia2cs": (19, (512, 1024)),
    "synthia2cs_16": (16, (512, 1024)),
    "synthia2cs_13": (13, (512, 1024)),
    "cs2acdc": (19, (540, 960)),
    "cs2darkzurich": (19, (540, 960)),
    "cs2bdd_night": (19, (720, 1280)),
}


@pytest.mark.parametrize("option", sorted(CONFIGS))
def test_data_config_reads_its_layout(option: str, make_cfg, tmp_path: Path) -> None:
    from mic_uda.train import build_datamodule

    data_dir = _data_dir(tmp_path / "data")
    overrides = [
        f"data={option}",
        f"paths.data_dir={data_dir}",
        f"data.rcs.cache_dir={tmp_path / 'cache'}",
        "data.rcs.min_pixels=20",  # the fixtures are 12x16 frames
        "data.datamodule.num_workers=0",
    ]
    dm = build_datamodule(make_cfg(overrides, tiny=False))
    dm.prepare_data()
    dm.setup("fit")
    num_classes, val_size = CONFIGS[option]
    src, tgt, val = (dm.datasets[k][0] for k in ("source", "target", "val"))
    assert src["image"].shape == (3, 512, 512) and src["label"].shape == (512, 512)
    assert int(src["label"][src["label"] != 255].max()) < num_classes
    assert tgt["image"].shape == (3, 512, 512) and "label" not in tgt
    assert val["image"].shape == (3, *val_size) and val["label"].shape == val_size
    assert dm.rcs_enabled and len(list((tmp_path / "cache").glob("*.json"))) == 1
