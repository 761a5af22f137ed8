"""Detection data: boxes from label masks (exact), Cityscapes instance boxes, COCO json, padding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mic_uda.data.boxes import DetectionFromSegDataset, boxes_from_label, pad_targets, unpad_targets
from mic_uda.data.det_files import CityscapesDetection, CocoJsonDetection, instance_boxes


def test_boxes_from_hand_built_label() -> None:
    lab = torch.full((10, 12), 0)
    lab[1:3, 1:4] = 5  # car A: 2 x 3 = 6 px
    lab[6:9, 8:10] = 5  # car B: 3 x 2 = 6 px
    lab[5, 2] = 5  # a lone car pixel: below min_area
    lab[4:8, 2:3] = 6  # person: 4 px tall column
    lab[3, 4] = 5  # touches car A diagonally: 8-connected, merges into A
    boxes, labels = boxes_from_label(lab, thing_ids=[5, 6], min_area=4)
    expected = torch.tensor([[1.0, 1, 5, 4], [8, 6, 10, 9], [2, 4, 3, 8]])
    torch.testing.assert_close(boxes, expected)
    torch.testing.assert_close(labels, torch.tensor([1, 1, 2]))


def test_boxes_from_label_without_things() -> None:
    boxes, labels = boxes_from_label(torch.zeros(4, 4, dtype=torch.long), [1])
    assert boxes.shape == (0, 4) and labels.shape == (0,)


def test_padding_round_trip_and_overflow_keeps_largest() -> None:
    boxes = torch.tensor([[0.0, 0, 2, 2], [0, 0, 10, 10], [0, 0, 5, 5]])
    labels = torch.tensor([1, 2, 3])
    pb, pl = pad_targets(boxes, labels, 5)
    (t,) = unpad_targets(pb[None], pl[None])
    torch.testing.assert_close(t["boxes"], boxes)
    pb, pl = pad_targets(boxes, labels, 2)
    torch.testing.assert_close(pl, torch.tensor([2, 3]))  # the two largest, original order


def test_detection_from_seg_dataset_drops_the_label() -> None:
    class Seg(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> dict:
            lab = torch.zeros(8, 8, dtype=torch.long)
            lab[2:6, 2:6] = 3
            return {"image": torch.rand(3, 8, 8), "label": lab}

    item = DetectionFromSegDataset(Seg(), thing_ids=[3], min_area=1, max_boxes=4)[0]
    assert set(item) == {"image", "boxes", "labels"}
    torch.testing.assert_close(item["boxes"][0], torch.tensor([2.0, 2, 6, 6]))
    torch.testing.assert_close(item["labels"], torch.tensor([1, 0, 0, 0]))


def test_cityscapes_instance_ids_to_boxes() -> None:
    ids = torch.zeros(6, 6, dtype=torch.long)
    ids[0:2, 0:3] = 26001  # car #1
    ids[3:6, 4:6] = 24000  # person #0
    ids[4, 0] = 7  # road (a stuff id < 1000): no box
    ids[5, 0:2] = 33002  # bicycle, not asked for
    boxes, labels = instance_boxes(ids, [24, 26])
    torch.testing.assert_close(boxes, torch.tensor([[4.0, 3, 6, 6], [0, 0, 3, 2]]))
    torch.testing.assert_close(labels, torch.tensor([1, 2]))


def _write_cityscapes(root: Path, foggy: bool) -> None:
    img_dir = root / ("leftImg8bit_foggy" if foggy else "leftImg8bit") / "val" / "aachen"
    gt_dir = root / "gtFine" / "val" / "aachen"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    stem = "aachen_000000_000019"
    name = f"{stem}_leftImg8bit_foggy_beta_0.02.png" if foggy else f"{stem}_leftImg8bit.png"
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(img_dir / name)
    ids = np.zeros((16, 32), np.uint16)
    ids[2:6, 4:12] = 26000
    Image.fromarray(ids).save(gt_dir / f"{stem}_gtFine_instanceIds.png")


@pytest.mark.parametrize("foggy", [False, True])
def test_cityscapes_detection_layout_and_resize(tmp_path: Path, foggy: bool) -> None:
    _write_cityscapes(tmp_path, foggy)
    ds = CityscapesDetection(tmp_path, "val", foggy=foggy, resize=(64, 32), max_boxes=3)
    item = ds[0]
    assert item["image"].shape == (3, 32, 64)
    torch.testing.assert_close(item["boxes"][0], torch.tensor([8.0, 4, 24, 12]))  # x2 scale
    assert int(item["labels"][0]) == 3  # car is the 3rd of the 8 classes


def test_cityscapes_detection_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="leftImg8bit_foggy"):
        CityscapesDetection(tmp_path, "val", foggy=True)
    _write_cityscapes(tmp_path, False)
    next((tmp_path / "gtFine").rglob("*instanceIds.png")).unlink()
    with pytest.raises(FileNotFoundError, match=r"instanceIds\.png.*not found"):
        CityscapesDetection(tmp_path, "val")


def test_coco_json_detection(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    ann = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 40, "height": 20}],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [2, 4, 10, 6], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    item = CocoJsonDetection(tmp_path / "img", tmp_path / "ann.json", ["car", "person"], max_boxes=2)[0]
    torch.testing.assert_close(item["boxes"][0], torch.tensor([2.0, 4, 12, 10]))
    torch.testing.assert_close(item["labels"], torch.tensor([1, 0]))  # crowd skipped
    with pytest.raises(ValueError, match=r"\['bus'\] are not categories"):
        CocoJsonDetection(tmp_path / "img", tmp_path / "ann.json", ["bus"])


def test_camvid_detection_boxes_on_real_labels() -> None:
    root = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid"
    if not root.is_dir():
        pytest.skip(f"real CamVid not present at {root} (SPEC 10)")
    from mic_uda.data.seg_files import FolderSegDataset

    seg = FolderSegDataset(root=root, num_classes=11, split_file="splits/dusk_val.txt", resize=[320, 240])
    ds = DetectionFromSegDataset(seg, thing_ids=[8, 9, 10], min_area=20)
    counts = torch.stack([ds[i]["labels"] for i in range(0, len(ds), 8)])
    assert (counts == 1).sum() > 0  # cars exist in dusk frames
