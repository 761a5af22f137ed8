"""Detection data derived from segmentation labels, and the padded box format batches use.

``boxes_from_label`` turns the connected regions of "thing" classes of a semantic label map into
boxes (scipy's connected-component labelling, 8-connected). Its limits, by construction: touching
instances of one class merge into one box, an occluded object split in two gives two boxes, and
regions below ``min_area`` pixels are dropped. It builds ``data=synthetic_det`` and
``data=camvid_det_day2dusk`` from their segmentation labels.

Batches stay plain tensors (so the task-agnostic datamodule and default collate work unchanged):
each item carries ``boxes`` (max_boxes, 4) xyxy and ``labels`` (max_boxes,) with 0 = padding (and
background), real classes 1..K. :func:`unpad_targets` gives torchvision's list of dicts back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def boxes_from_label(
    label: torch.Tensor, thing_ids: Sequence[int], min_area: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``(N, 4)`` (x1, y1, x2, y2; pixel edges, so a single pixel at (y, x) is (x, y, x+1, y+1))
    and 1-based labels ``(N,)`` (position in ``thing_ids`` + 1) of the connected regions of each thing
    class with at least ``min_area`` pixels, ordered by class then by scan order."""
    lab = label.cpu().numpy()
    boxes: list[list[float]] = []
    labels: list[int] = []
    for k, cid in enumerate(thing_ids):
        components, n = ndimage.label(lab == cid, structure=_EIGHT_CONNECTED)
        if n == 0:
            continue
        areas = ndimage.sum_labels(np.ones_like(components), components, index=np.arange(1, n + 1))
        for idx, sl in enumerate(ndimage.find_objects(components)):
            if sl is None or areas[idx] < min_area:
                continue
            ys, xs = sl
            boxes.append([float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)])
            labels.append(k + 1)
    return (
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
    )


def pad_targets(
    boxes: torch.Tensor, labels: torch.Tensor, max_boxes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-size (max_boxes) boxes/labels; extra boxes (beyond max_boxes, largest kept) are dropped."""
    if len(boxes) > max_boxes:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = area.argsort(descending=True)[:max_boxes].sort().values
        boxes, labels = boxes[keep], labels[keep]
    out_b = torch.zeros(max_boxes, 4)
    out_l = torch.zeros(max_boxes, dtype=torch.int64)
    out_b[: len(boxes)] = boxes
    out_l[: len(labels)] = labels
    return out_b, out_l


def unpad_targets(boxes: torch.Tensor, labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Batched padded boxes ``(B, M, 4)`` / labels ``(B, M)`` -> torchvision targets (one dict per image)."""
    return [{"boxes": b[lab > 0], "labels": lab[lab > 0]} for b, lab in zip(boxes, labels)]


class DetectionFromSegDataset(Dataset):
    """Wraps a segmentation dataset: boxes of the connected regions of its thing classes.

    The segmentation label itself is dropped from the item (a detector never sees it); an item is
    ``{"image", "boxes", "labels"}`` in the padded format above (``labels`` 1..K follow ``thing_ids``).
    """

    def __init__(
        self, dataset: Dataset, thing_ids: Sequence[int], min_area: int = 16, max_boxes: int = 50
    ) -> None:
        self.dataset, self.thing_ids = dataset, [int(c) for c in thing_ids]
        self.min_area, self.max_boxes = int(min_area), int(max_boxes)
        if not self.thing_ids:
            raise ValueError("DetectionFromSegDataset needs at least one thing class id (thing_ids)")

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if "label" not in item:
            raise ValueError(f"{type(self.dataset).__name__} item {i} has no 'label' to derive boxes from")
        boxes, labels = boxes_from_label(item["label"], self.thing_ids, self.min_area)
        boxes, labels = pad_targets(boxes, labels, self.max_boxes)
        return {"image": item["image"], "boxes": boxes, "labels": labels}
