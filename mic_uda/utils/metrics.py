"""Metrics derived from a (DDP-synced) torchmetrics confusion matrix: IoU (seg), accuracy (cls)."""

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


def nan_mean(values: torch.Tensor) -> float:
    """Mean over the classes that exist (NaN entries skipped); NaN if none does."""
    return float(torch.nanmean(values)) if not torch.isnan(values).all() else float("nan")


def mean_iou(iou: torch.Tensor) -> float:
    return nan_mean(iou)


def format_iou_table(
    class_names: Sequence[str], columns: dict[str, torch.Tensor], mean_label: str = "mIoU"
) -> str:
    """A plain-text per-class table (percent; IoU, or AP for detection), one column per model, with
    the mean row (NaN classes skipped)."""
    names = list(class_names)
    width = max(8, *(len(n) for n in names))
    header = f"{'class':<{width}} " + " ".join(f"{c:>9}" for c in columns)
    lines = [header, "-" * len(header)]
    for i, n in enumerate(names):
        lines.append(f"{n:<{width}} " + " ".join(f"{100 * float(v[i]):9.2f}" for v in columns.values()))
    lines.append("-" * len(header))
    lines.append(f"{mean_label:<{width}} " + " ".join(f"{100 * nan_mean(v):9.2f}" for v in columns.values()))
    return "\n".join(lines)


def class_accuracy_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class accuracy (recall) ``tp / support``; NaN for classes absent from the labels."""
    confusion = confusion.double()
    support = confusion.sum(1)
    return torch.where(
        support > 0, confusion.diag() / support.clamp_min(1), torch.full_like(support, float("nan"))
    )


def overall_accuracy(confusion: torch.Tensor) -> float:
    total = float(confusion.sum())
    return float(confusion.diag().sum()) / total if total > 0 else float("nan")


def format_accuracy_table(
    class_names: Sequence[str], per_class: dict[str, torch.Tensor], overall: dict[str, float]
) -> str:
    """Per-class accuracy table (percent), one column per model, with mean-class and overall rows."""
    names = list(class_names)
    width = max(14, *(len(n) for n in names))
    header = f"{'class':<{width}} " + " ".join(f"{c:>9}" for c in per_class)
    lines = [header, "-" * len(header)]
    for i, n in enumerate(names):
        lines.append(f"{n:<{width}} " + " ".join(f"{100 * float(v[i]):9.2f}" for v in per_class.values()))
    lines.append("-" * len(header))
    lines.append(
        f"{'mean class acc':<{width}} " + " ".join(f"{100 * nan_mean(v):9.2f}" for v in per_class.values())
    )
    lines.append(f"{'overall acc':<{width}} " + " ".join(f"{100 * overall[k]:9.2f}" for k in per_class))
    return "\n".join(lines)
