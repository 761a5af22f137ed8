"""Pixel-weighted cross-entropy shared by the supervised, mixed and masked terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, ignore_index: int = 255
) -> torch.Tensor:
    """Mean over all pixels of ``weight * CE`` (ignored pixels count as 0, as mmseg's default).

    Logits are upsampled by the network already; the loss is computed in float32 for bf16 safety.
    ``logits`` ``(B, C, H, W)`` (or ``(B, C)``), ``target`` ``(B, H, W)`` (or ``(B,)``) class ids,
    ``weight`` shaped like ``target`` (e.g. :func:`~mic_uda.uda.pseudo_label.confidence_weight`); a scalar.
    """
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    if weight is not None:
        ce = ce * weight
    return ce.mean()
