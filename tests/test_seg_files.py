"""File-layout datasets on tiny generated fixtures: loading, id mapping, recipes and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mic_uda.data.seg_files import GTA5, Cityscapes, FolderSegDataset


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_gta5_maps_cityscapes_ids_to_train_ids(tmp_path: Path) -> None:
    ids = np.zeros((24, 32), dtype=np.uint8)
    ids[:, :8], ids[:, 8:16], ids[:, 16:24], ids[:, 24:] = 7, 26, 33, 3  # road, car, bicycle, unlabelled
    _write(tmp_path / "images" / "00001.png", _rgb())
    _write(tmp_path / "labels" / "00001.png", ids)
    ds = GTA5(tmp_path, resize=None, crop_size=None)
    sample = ds[0]
    assert sample["image"].shape == (3, 24, 32) and sample["image"].max() <= 1
    assert sample["label"][0, :8].unique().tolist() == [0]
    assert sample["label"][0, 8:16].unique().tolist() == [13]
    assert sample["label"][0, 16:24].unique().tolist() == [18]
    assert sample["label"][0, 24:].unique().tolist() == [255]


def test_gta5_missing_label_names_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "images" / "00002.png", _rgb())
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match=r"labels/00002\.png"):
        GTA5(tmp_path)


def test_cityscapes_prefers_train_ids_and_maps_label_ids(tmp_path: Path) -> None:
    img = tmp_path / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000019_leftImg8bit.png"
    _write(img, _rgb())
    _write(
        img.parents[3] / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_labelIds.png",
        np.full((24, 32), 24, dtype=np.uint8),
    )  # person id 24 -> train id 11
    ds = Cityscapes(tmp_path, split="val", resize=(16, 12), crop_size=None)
    s = ds[0]
    assert s["image"].shape == (3, 12, 16) and s["label"].unique().tolist() == [11]
    _write(
        tmp_path / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_labelTrainIds.png",
        np.full((24, 32), 5, dtype=np.uint8),
    )
    assert Cityscapes(tmp_path, split="val", resize=None, crop_size=None)[0]["label"].unique().tolist() == [5]
    unlabelled = Cityscapes(tmp_path, split="val", with_labels=False, crop_size=8)[0]
    assert "label" not in unlabelled and unlabelled["image"].shape == (3, 8, 8)


def _camvid(tmp_path: Path, stems: list[str], label_value: int = 3) -> Path:
    for i, stem in enumerate(stems):
        _write(tmp_path / "images" / f"{stem}.jpg", _rgb(seed=i))
        _write(tmp_path / "labels" / f"{stem}.png", np.full((24, 32), label_value, dtype=np.uint8))
    (tmp_path / "splits").mkdir(exist_ok=True)
    (tmp_path / "splits" / "day.txt").write_text("\n".join(stems) + "\n")
    return tmp_path


def test_folder_dataset_reads_split_list_crops_and_flips(tmp_path: Path) -> None:
    root = _camvid(tmp_path, ["a_001", "a_002", "b_003"])
    (root / "splits" / "some.txt").write_text("b_003\na_001\n")
    ds = FolderSegDataset(root, num_classes=11, split_file="splits/some.txt", crop_size=16, hflip=True)
    assert [p[0].name for p in ds.pairs] == ["b_003.jpg", "a_001.jpg"]
    s = ds[0]
    assert s["image"].shape == (3, 16, 16) and s["label"].shape == (16, 16)
    assert s["label"].unique().tolist() == [3]


def test_folder_dataset_errors_name_file_and_expectation(tmp_path: Path) -> None:
    root = _camvid(tmp_path, ["a_001"], label_value=12)  # 12 is outside 11 classes
    with pytest.raises(ValueError, match=r"a_001\.png: label ids \[12\] outside 0\.\.10"):
        FolderSegDataset(root, num_classes=11)[0]
    (root / "splits" / "bad.txt").write_text("missing_007\n")
    with pytest.raises(FileNotFoundError, match=r"missing_007"):
        FolderSegDataset(root, num_classes=11, split_file="splits/bad.txt")
    (root / "splits" / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="lists no images"):
        FolderSegDataset(root, num_classes=11, split_file="splits/empty.txt")
    with pytest.raises(FileNotFoundError, match=r"nowhere/images"):
        FolderSegDataset(tmp_path / "nowhere", num_classes=11)
    _write(root / "labels" / "a_001.png", np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="label size"):
        FolderSegDataset(root, num_classes=11)[0]


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = _camvid(tmp_path, ["a_001"])
    (root / "images" / "a_001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match=r"a_001\.jpg"):
        FolderSegDataset(root, num_classes=11)[0]


@pytest.mark.skipif(
    not (Path(__file__).parents[2] / "shared" / "data" / "camvid").is_dir(),
    reason="the real CamVid copy (../shared/data/camvid) is not on this machine",
)
def test_real_camvid_layout_through_config(make_cfg) -> None:
    from mic_uda.train import build_datamodule

    dm = build_datamodule(make_cfg(["data=camvid_day2dusk"], tiny=False))
    dm.setup("fit")
    assert [len(dm.datasets[k]) for k in ("source", "target", "val")] == [577, 62, 62]
    s = dm.datasets["source"][0]
    assert s["image"].shape == (3, 192, 192) and "label" not in dm.datasets["target"][0]
    v = dm.datasets["val"][0]
    assert v["image"].shape == (3, 240, 320) and int(v["label"][v["label"] != 255].max()) <= 10
    assert torch.is_tensor(v["label"])


def _gta(tmp_path: Path, h: int, w: int) -> Path:
    for name in ("images", "labels"):
        _write(tmp_path / name / "00001.png", np.zeros((h, w, 3) if name == "images" else (h, w), np.uint8))
    return tmp_path


@pytest.mark.parametrize(
    ("size", "expected"),
    [((1052, 1914), (704, 1280)), ((720, 1280), (720, 1280))],  # (height, width)
)
def test_gta_resize_keeps_the_aspect_ratio_as_mmseg(tmp_path: Path, size, expected) -> None:
    """mmseg Resize(img_scale=(1280, 720), keep_ratio=True) = mmcv rescale_size: one factor
    s = min(1280 / long side, 720 / short side), sides int(x * s + 0.5). 1914x1052: s = 1280 / 1914,
    1052 * s = 703.53 -> 704."""
    s = GTA5(_gta(tmp_path, *size), crop_size=None)[0]  # the class default: (1280, 720), keep_ratio
    assert s["image"].shape == (3, *expected) and s["label"].shape == expected
    exact = GTA5(tmp_path, crop_size=None, keep_ratio=False)[0]  # the old forced size
    assert exact["image"].shape == (3, 720, 1280) and exact["label"].shape == (720, 1280)
    cropped = GTA5(tmp_path, crop_size=512)[0]
    assert cropped["image"].shape == (3, 512, 512)


def test_keep_ratio_size_rule(tmp_path: Path) -> None:
    ds = GTA5(_gta(tmp_path, 24, 32), crop_size=None)
    assert ds.resized_size(1052, 1914) == (704, 1280)
    assert ds.resized_size(1000, 1000) == (720, 720)  # the short-side limit binds
    assert ds.resized_size(360, 640) == (720, 1280)  # upscaling too, as mmcv
    assert ds.resized_size(1914, 1052) == (1280, 704)  # portrait: long side to 1280
    city = Cityscapes.__new__(Cityscapes)  # the size rule only needs resize / keep_ratio
    city.resize, city.keep_ratio = (1024, 512), True
    assert city.resized_size(1024, 2048) == (512, 1024)
    city.resize = (960, 540)
    assert city.resized_size(1080, 1920) == (540, 960)  # ACDC / Dark Zurich


def test_native_label_is_for_evaluation_splits(tmp_path: Path) -> None:
    _gta(tmp_path, 24, 32)
    with pytest.raises(ValueError, match="native_label=true is for evaluation splits"):
        GTA5(tmp_path, crop_size=16, native_label=True)
    with pytest.raises(ValueError, match="native_label=true is for evaluation splits"):
        GTA5(tmp_path, crop_size=None, hflip=True, native_label=True)
    with pytest.raises(ValueError, match=r"resize \[16\]"):
        GTA5(tmp_path, resize=[16], crop_size=None)
    s = GTA5(tmp_path, resize=(16, 12), keep_ratio=False, crop_size=None, native_label=True)[0]
    assert s["image"].shape == (3, 12, 16) and s["label"].shape == (12, 16)
    assert s["label_native"].shape == (24, 32)
    assert "label_native" not in GTA5(tmp_path, resize=(16, 12), crop_size=None)[0]


def _folder(tmp_path: Path, h: int, w: int) -> None:
    ids = np.arange(h * w, dtype=np.int64).reshape(h, w) % 3
    _write(tmp_path / "images" / "a.png", _rgb(h, w))
    _write(tmp_path / "labels" / "a.png", ids.astype(np.uint8))


def test_rectangular_crop_pads_like_mmseg_and_margins_follow_the_crop(tmp_path: Path) -> None:
    """A 20x16 crop of a 12x32 frame: the height is padded (image = pad colour, label 255, valid 0);
    the pseudo-label margins are cut from the uncropped frame, so they move with the crop."""
    _folder(tmp_path, 12, 32)
    ds = FolderSegDataset(
        tmp_path, num_classes=3, crop_size=[20, 16], pad_crop=True, pseudo_margins=[2, 3, 1, 4]
    )
    torch.manual_seed(0)
    s = ds[0]
    assert (
        s["image"].shape == (3, 20, 16) and s["label"].shape == (20, 16) and s["valid_mask"].shape == (20, 16)
    )
    pad = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    assert torch.equal(s["image"][:, 12:], pad.expand(3, 8, 16)) and (s["label"][12:] == 255).all()
    assert (s["valid_mask"][12:] == 0).all()
    # recover the crop's left offset from the (random, unique) image
    full = FolderSegDataset(tmp_path, num_classes=3, crop_size=None)[0]
    left = next(x for x in range(17) if torch.equal(full["image"][:, :, x : x + 16], s["image"][:, :12]))
    expected = torch.zeros(12, 32)
    expected[2 : 12 - 3, 1 : 32 - 4] = 1
    assert torch.equal(s["valid_mask"][:12], expected[:, left : left + 16])
    with pytest.raises(ValueError, match="pad_crop=true pads it"):
        FolderSegDataset(tmp_path, num_classes=3, crop_size=[20, 16])[0]
    with pytest.raises(ValueError, match="pseudo_margins"):
        FolderSegDataset(tmp_path, num_classes=3, pseudo_margins=[1, 2])


def test_margins_flip_with_the_image(tmp_path: Path) -> None:
    _folder(tmp_path, 8, 8)
    ds = FolderSegDataset(tmp_path, num_classes=3, crop_size=8, hflip=True, pseudo_margins=[0, 0, 3, 0])
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        v = ds[0]["valid_mask"]
        seen.add(int(v[0, :3].sum()))  # left margin where not flipped, moved right when flipped
        assert v.sum() == 8 * 5
    assert seen == {0, 3}


def test_every_file_dataset_takes_the_reading_options_over_its_own_defaults(tmp_path: Path) -> None:
    """One pass-through (``PairedSegDataset.read_files``): a dataset's recipe defaults (GTA5: 1280x720
    keeping the ratio, 512 crops), the caller's options over them, an option no subclass repeated
    (``pad_value``) reaching the crop padding, and an unknown option named in one line."""
    from mic_uda.data.acdc import ACDC
    from mic_uda.data.bdd100k import BDD100K
    from mic_uda.data.dark_zurich import DarkZurich
    from mic_uda.data.seg_files import READ_OPTIONS
    from mic_uda.data.synthia import SYNTHIA

    assert GTA5.READ_DEFAULTS == {"resize": (1280, 720), "crop_size": 512, "keep_ratio": True}
    assert Cityscapes.READ_DEFAULTS == {"resize": (1024, 512), "crop_size": 512}
    assert SYNTHIA.READ_DEFAULTS["resize"] == (1280, 760) and ACDC.READ_DEFAULTS["resize"] == (960, 540)
    assert DarkZurich.READ_DEFAULTS["resize"] == (960, 540) and BDD100K.READ_DEFAULTS["resize"] == (1280, 720)
    assert FolderSegDataset.READ_DEFAULTS == {}
    for cls in (GTA5, Cityscapes, SYNTHIA, ACDC, DarkZurich, BDD100K):
        assert set(cls.READ_DEFAULTS) <= set(READ_OPTIONS), cls

    _write(tmp_path / "gta" / "images" / "00001.png", _rgb(24, 32))
    _write(tmp_path / "gta" / "labels" / "00001.png", np.full((24, 32), 7, np.uint8))
    gta = GTA5(tmp_path / "gta", crop_size=None)
    assert (gta.resize, gta.keep_ratio, gta.crop_size) == ((1280, 720), True, None)
    gta = GTA5(tmp_path / "gta", resize=(16, 12), keep_ratio=False, crop_size=8, hflip=True)
    assert (gta.resize, gta.keep_ratio, gta.hflip, gta[0]["image"].shape) == (
        (16, 12),
        False,
        True,
        (3, 8, 8),
    )

    _folder(tmp_path / "f", 12, 32)
    grey = FolderSegDataset(
        tmp_path / "f", num_classes=3, crop_size=[20, 16], pad_crop=True, pad_value=(0.5,) * 3
    )
    assert (grey[0]["image"][:, 12:] == 0.5).all()
    with pytest.raises(TypeError, match=r"GTA5: unknown option\(s\) \['crop'\]: expected some of \['resize'"):
        GTA5(tmp_path / "gta", crop=8)
