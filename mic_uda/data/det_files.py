"""Detection datasets as users have them on disk: Cityscapes / Foggy Cityscapes (boxes from gtFine
instance masks, SPEC section 9) and any COCO-json dataset. Items use the padded box format of
:mod:`mic_uda.data.boxes`; images are resized (``resize`` = (W, H)) with their boxes scaled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import masks_to_boxes

from mic_uda.data.boxes import pad_targets
from mic_uda.data.seg_files import require_dir

#: Cityscapes label ids of the 8 detection classes of Cityscapes -> Foggy Cityscapes
CITYSCAPES_DET_CLASSES = {
    "person": 24,
    "rider": 25,
    "car": 26,
    "truck": 27,
    "bus": 28,
    "train": 31,
    "motorcycle": 32,
    "bicycle": 33,
}
CITYSCAPES_DET_LAYOUT = (
    "<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png (or, foggy=true, "
    "<root>/leftImg8bit_foggy/<split>/<city>/*_leftImg8bit_foggy_beta_<beta>.png) and "
    "<root>/gtFine/<split>/<city>/*_gtFine_instanceIds.png"
)


def read_image(path: Path) -> torch.Tensor:
    """RGB float [0, 1] (3, H, W); an unreadable file is an error naming it."""
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB).float() / 255.0
    except (RuntimeError, OSError) as err:
        raise ValueError(f"could not decode image '{path}': {err}") from err


def resize_with_boxes(
    image: torch.Tensor, boxes: torch.Tensor, size: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if size is None:
        return image, boxes
    w, h = int(size[0]), int(size[1])
    sy, sx = h / image.shape[-2], w / image.shape[-1]
    image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    return image, boxes * torch.tensor([sx, sy, sx, sy])


def hflip_with_boxes(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = image.shape[-1]
    return image.flip(-1), torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)


def instance_boxes(instance_ids: torch.Tensor, class_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of the Cityscapes instances (``id = class * 1000 + k``) of ``class_ids``; labels 1..K
    in ``class_ids`` order."""
    ids = torch.unique(instance_ids)
    ids = ids[ids >= 1000]
    lut = {c: i + 1 for i, c in enumerate(class_ids)}
    keep = [int(i) for i in ids.tolist() if int(i) // 1000 in lut]
    if not keep:
        return torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    masks = torch.stack([instance_ids == i for i in keep])
    boxes = masks_to_boxes(masks)
    boxes[:, 2:] += 1  # pixel edges: a one-pixel instance is 1 x 1
    return boxes, torch.tensor([lut[i // 1000] for i in keep], dtype=torch.int64)


class CityscapesDetection(Dataset):
    """Cityscapes (``foggy=false``) or Foggy Cityscapes (``foggy=true``, fog density ``beta``) with
    boxes of the 8 instance classes derived from gtFine instance masks."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        foggy: bool = False,
        beta: float = 0.02,
        resize: Sequence[int] | None = (1024, 512),
        hflip: bool = False,
        classes: Sequence[str] = tuple(CITYSCAPES_DET_CLASSES),
        max_boxes: int = 100,
    ) -> None:
        root = Path(root)
        unknown = [c for c in classes if c not in CITYSCAPES_DET_CLASSES]
        if unknown:
            raise ValueError(
                f"unknown Cityscapes detection classes {unknown}; allowed {list(CITYSCAPES_DET_CLASSES)}"
            )
        self.class_ids = [CITYSCAPES_DET_CLASSES[c] for c in classes]
        folder = "leftImg8bit_foggy" if foggy else "leftImg8bit"
        suffix = f"_leftImg8bit_foggy_beta_{beta}.png" if foggy else "_leftImg8bit.png"
        img_dir = require_dir(root / folder / split, "Cityscapes detection", CITYSCAPES_DET_LAYOUT)
        gt_dir = require_dir(root / "gtFine" / split, "Cityscapes detection", CITYSCAPES_DET_LAYOUT)
        self.images = sorted(img_dir.glob(f"*/*{suffix}"))
        if not self.images:
            raise FileNotFoundError(
                f"no '*{suffix}' images under '{img_dir}'. Expected: {CITYSCAPES_DET_LAYOUT}"
            )
        self.instances = [
            gt_dir / p.parent.name / p.name.replace(suffix, "_gtFine_instanceIds.png") for p in self.images
        ]
        for img, inst in zip(self.images, self.instances):
            if not inst.is_file():
                raise FileNotFoundError(
                    f"instance mask '{inst}' for image '{img}' not found ({CITYSCAPES_DET_LAYOUT})"
                )
        self.resize, self.hflip, self.max_boxes = resize, hflip, int(max_boxes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = read_image(self.images[i])
        try:
            ids = decode_image(str(self.instances[i]), mode=ImageReadMode.UNCHANGED)[0].long()
        except (RuntimeError, OSError) as err:
            raise ValueError(f"could not decode instance mask '{self.instances[i]}': {err}") from err
        if ids.shape != image.shape[-2:]:
            raise ValueError(
                f"instance mask '{self.instances[i]}' is {tuple(ids.shape)}, image '{self.images[i]}' is "
                f"{tuple(image.shape[-2:])}: expected the same size"
            )
        boxes, labels = instance_boxes(ids, self.class_ids)
        image, boxes = resize_with_boxes(image, boxes, self.resize)
        if self.hflip and torch.rand(()) < 0.5:
            image, boxes = hflip_with_boxes(image, boxes)
        boxes, labels = pad_targets(boxes, labels, self.max_boxes)
        return {"image": image.contiguous(), "boxes": boxes, "labels": labels}


class CocoJsonDetection(Dataset):
    """A user's own detection data in COCO layout: ``images_dir`` + an annotation json (``images``,
    ``annotations`` with ``bbox`` = [x, y, w, h], ``categories``). ``class_names`` picks and orders the
    categories (labels 1..K); crowd annotations are skipped."""

    def __init__(
        self,
        images_dir: str | Path,
        annotation_file: str | Path,
        class_names: Sequence[str],
        resize: Sequence[int] | None = None,
        hflip: bool = False,
        max_boxes: int = 100,
    ) -> None:
        self.images_dir = require_dir(Path(images_dir), "COCO-json detection", "<images_dir>/<file_name>")
        ann_path = Path(annotation_file)
        if not ann_path.is_file():
            raise FileNotFoundError(f"COCO annotation file '{ann_path}' not found")
        try:
            coco = json.loads(ann_path.read_text())
            cats = {c["name"]: c["id"] for c in coco["categories"]}
            images = {im["id"]: im["file_name"] for im in coco["images"]}
            annotations = coco.get("annotations", [])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"'{ann_path}' is not a COCO detection json (images/annotations/categories): {err}"
            ) from err
        missing = [c for c in class_names if c not in cats]
        if missing:
            raise ValueError(
                f"class_names {missing} are not categories of '{ann_path}' (it has {sorted(cats)})"
            )
        lut = {cats[c]: k + 1 for k, c in enumerate(class_names)}
        per_image: dict[int, list[tuple[list[float], int]]] = {i: [] for i in images}
        for a in annotations:
            if a.get("iscrowd", 0) or a["category_id"] not in lut or a["image_id"] not in per_image:
                continue
            x, y, w, h = a["bbox"]
            if w > 0 and h > 0:
                per_image[a["image_id"]].append(([x, y, x + w, y + h], lut[a["category_id"]]))
        self.items = [(images[i], per_image[i]) for i in sorted(images)]
        if not self.items:
            raise ValueError(f"'{ann_path}' lists no images")
        self.resize, self.hflip, self.max_boxes = resize, hflip, int(max_boxes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name, anns = self.items[i]
        path = self.images_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"image '{path}' listed in the annotation file does not exist")
        image = read_image(path)
        boxes = torch.tensor([b for b, _ in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([c for _, c in anns], dtype=torch.int64)
        image, boxes = resize_with_boxes(image, boxes, self.resize)
        if self.hflip and torch.rand(()) < 0.5:
            image, boxes = hflip_with_boxes(image, boxes)
        boxes, labels = pad_targets(boxes, labels, self.max_boxes)
        return {"image": image.contiguous(), "boxes": boxes, "labels": labels}
