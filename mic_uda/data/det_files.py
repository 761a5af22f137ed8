"""Detection datasets as users have them on disk: Cityscapes / Foggy Cityscapes (boxes from gtFine
instance masks, SPEC section 9) and any COCO-json dataset. Items use the padded box format of
:mod:`mic_uda.data.boxes`; images are resized (``resize`` = (W, H)) with their boxes scaled.

The official Foggy Cityscapes benchmark (MIC ``det/``, inherited from maskrcnn-benchmark) does not train
on every instance of the masks: its converter (``det/tools/cityscapes/convert_foggy_cityscapes_to_coco.py``
with cityscapesscripts' ``instances2dict_with_polygons``) traces each instance's outer outlines
(``cv2.findContours``, ``RETR_EXTERNAL``, ``CHAIN_APPROX_NONE``) and drops an instance when one outline
has two points or fewer (``min(len_p) <= 4`` coordinates), i.e. when one of its 8-connected parts has at
most 2 pixels; its training loader (``COCODataset``) then drops boxes 1 px wide or tall
(``clip_to_image(remove_empty=True)``, xywh -> xyxy with ``TO_REMOVE = 1``) and, in the training splits
(``remove_images_without_annotations = is_train``), images without a box wider and taller than 1 px.
:class:`CityscapesDetection` does the same with ``drop_tiny_instances`` (every split: the json the
evaluation scores against) and ``drop_thin_boxes`` (training splits); both are off by default and on in
``data=cs2foggy`` (``data.official_boxes``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import masks_to_boxes

from mic_uda.data.boxes import pad_targets
from mic_uda.data.seg_files import require_dir

log = logging.getLogger(__name__)

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


def instance_boxes(
    instance_ids: torch.Tensor, class_ids: Sequence[int], drop_tiny: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of the Cityscapes instances (``id = class * 1000 + k``) of ``class_ids``; labels 1..K
    in ``class_ids`` order. ``drop_tiny``: leave out an instance one of whose 8-connected parts has at
    most 2 pixels (the official converter's outline of <= 2 points, see the module docstring)."""
    ids = torch.unique(instance_ids)
    ids = ids[ids >= 1000]
    lut = {c: i + 1 for i, c in enumerate(class_ids)}
    keep = [int(i) for i in ids.tolist() if int(i) // 1000 in lut]
    if not keep:
        return torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    masks = torch.stack([instance_ids == i for i in keep])
    boxes = masks_to_boxes(masks)
    boxes[:, 2:] += 1  # pixel edges: a one-pixel instance is 1 x 1
    labels = torch.tensor([lut[i // 1000] for i in keep], dtype=torch.int64)
    if drop_tiny:
        kept = torch.tensor([not _has_tiny_part(m, b) for m, b in zip(masks, boxes)], dtype=torch.bool)
        boxes, labels = boxes[kept], labels[kept]
    return boxes, labels


_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _has_tiny_part(mask: torch.Tensor, box: torch.Tensor) -> bool:
    """Whether an 8-connected part of ``mask`` (inside its ``box``) has at most 2 pixels: the parts whose
    outer outline ``cv2.findContours`` traces as 1 or 2 points."""
    x1, y1, x2, y2 = (int(v) for v in box.tolist())
    parts, n = ndimage.label(mask[y1:y2, x1:x2].numpy(), structure=_EIGHT_CONNECTED)
    return bool(n) and int(np.bincount(parts.ravel())[1:].min()) <= 2


def drop_thin(boxes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes wider and taller than 1 px (the official training loader drops the others)."""
    keep = ((boxes[:, 2] - boxes[:, 0]) > 1) & ((boxes[:, 3] - boxes[:, 1]) > 1)
    return boxes[keep], labels[keep]


def read_instance_ids(path: Path) -> torch.Tensor:
    try:
        return decode_image(str(path), mode=ImageReadMode.UNCHANGED)[0].long()
    except (RuntimeError, OSError) as err:
        raise ValueError(f"could not decode instance mask '{path}': {err}") from err


class CityscapesDetection(Dataset):
    """Cityscapes (``foggy=false``) or Foggy Cityscapes (``foggy=true``, fog density ``beta``) with
    boxes of the 8 instance classes derived from gtFine instance masks.

    ``drop_tiny_instances``: leave out instances the official converter drops (an outline of <= 2
    points: an 8-connected part of <= 2 pixels). ``drop_thin_boxes`` (training splits): also leave out
    boxes 1 px wide or tall (at the mask's resolution) and the images left without a box, as the official
    training loader; the split's instance masks are then read once at construction (images without a box
    are logged with their count). Both off by default (a user's data keeps every instance); on in
    ``data=cs2foggy``. ``split=test`` is an error: the published ``gtFine/test`` masks are placeholders.
    """

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
        drop_tiny_instances: bool = False,
        drop_thin_boxes: bool = False,
    ) -> None:
        root = Path(root)
        unknown = [c for c in classes if c not in CITYSCAPES_DET_CLASSES]
        if unknown:
            raise ValueError(
                f"unknown Cityscapes detection classes {unknown}; allowed {list(CITYSCAPES_DET_CLASSES)}"
            )
        if split == "test":
            raise ValueError(
                f"Cityscapes detection/test: '{root / 'gtFine' / 'test'}' holds placeholder masks, not the "
                "test annotations: expected split=train or split=val"
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
        self.drop_tiny_instances, self.drop_thin_boxes = bool(drop_tiny_instances), bool(drop_thin_boxes)
        self.targets: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] | None = None
        if self.drop_thin_boxes:
            self._keep_images_with_boxes(f"{folder}/{split}")

    def _keep_images_with_boxes(self, name: str) -> None:
        """Boxes of every image (read once, kept for ``__getitem__``); images without one dropped."""
        log.info("Cityscapes detection %s: reading %d instance masks (drop_thin_boxes)", name, len(self))
        with ThreadPoolExecutor(max_workers=min(8, len(self.instances))) as pool:
            targets = list(pool.map(self._scan, self.instances))
        keep = [i for i, t in enumerate(targets) if len(t[0])]
        if not keep:
            raise ValueError(
                f"Cityscapes detection {name}: none of the {len(self)} instance masks under "
                f"'{self.instances[0].parents[1]}' has a box wider and taller than 1 px of the classes "
                f"{self.class_ids} (drop_thin_boxes=true keeps only images with one)"
            )
        if len(keep) < len(self):
            log.warning(
                "Cityscapes detection %s: %d of %d images have no box wider and taller than 1 px and are "
                "left out (drop_thin_boxes, as the official training loader)",
                name,
                len(self) - len(keep),
                len(self),
            )
        self.images = [self.images[i] for i in keep]
        self.instances = [self.instances[i] for i in keep]
        self.targets = [targets[i] for i in keep]

    def _boxes_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, labels = instance_boxes(ids, self.class_ids, self.drop_tiny_instances)
        return drop_thin(boxes, labels) if self.drop_thin_boxes else (boxes, labels)

    def _scan(self, path: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        ids = read_instance_ids(path)
        return (*self._boxes_of(ids), (int(ids.shape[0]), int(ids.shape[1])))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = read_image(self.images[i])
        target = self.targets[i] if self.targets is not None else self._scan(self.instances[i])
        boxes, labels, mask_hw = target  # read at construction with drop_thin_boxes, else now
        if mask_hw != tuple(image.shape[-2:]):
            raise ValueError(
                f"instance mask '{self.instances[i]}' is {mask_hw}, image '{self.images[i]}' is "
                f"{tuple(image.shape[-2:])}: expected the same size"
            )
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
