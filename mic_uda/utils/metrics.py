"""Segmentation metrics derived from a (DDP-synced) torchmetrics confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def iou_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``tp / (tp + fp + fn)``; NaN for classes absent from both prediction and label.

    Rows are targets, columns predictions (torchmetrics' convention). mIoU is the NaN-mean, as
    mmseg computes it, so a class missing from an evaluation split does not count as 0.
    """
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(iou: torch.Tensor) -> float:
    return float(torch.nanmean(iou)) if not torch.isnan(iou).all() else float("nan")


def format_iou_table(class_names: Sequence[str], columns: dict[str, torch.Tensor]) -> str:
    """A plain-text per-class IoU table (percent), one column per model, with the mIoU row."""
    names = list(class_names)
    width = max(8, *(len(n) for n in names))
    header = f"{'class':<{width}} " + " ".join(f"{c:>9}" for c in columns)
    lines = [header, "-" * len(header)]
    for i, n in enumerate(names):
        lines.append(f"{n:<{width}} " + " ".join(f"{100 * float(v[i]):9.2f}" for v in columns.values()))
    lines.append("-" * len(header))
    lines.append(f"{'mIoU':<{width}} " + " ".join(f"{100 * mean_iou(v):9.2f}" for v in columns.values()))
    return "\n".join(lines)
