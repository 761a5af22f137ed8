"""Teacher pseudo-labels and their confidence weights (SPEC section 1, step 3)."""

from __future__ import annotations

from typing import Literal

import torch

WeightScope = Literal["image", "batch"]


def pseudo_label_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, confidence)`` = argmax and max of the softmax over dim 1, computed in float32."""
    conf, labels = torch.softmax(logits.float(), dim=1).max(dim=1)
    return labels, conf


def confidence_weight(
    confidence: torch.Tensor,
    threshold: float,
    scope: WeightScope = "image",
    ignore_top: int = 0,
    ignore_bottom: int = 0,
) -> torch.Tensor:
    """Per-pixel weight map ``(B, H, W)`` = fraction of pixels with confidence > ``threshold``.

    ``scope="image"`` gives one scalar per image (the papers' description), ``"batch"`` one over the
    whole batch (the official DACS/DAFormer code). Rows within the top/bottom margins get weight 0
    (Cityscapes ego-car and rectification borders); the fraction itself is computed before that.
    """
    confident = (confidence > threshold).float()
    if scope == "image":
        q = confident.flatten(1).mean(1).view(-1, 1, 1)
    elif scope == "batch":
        q = confident.mean().view(1, 1, 1)
    else:
        raise ValueError(f"pseudo_label.weight_scope={scope!r} is not one of ['image', 'batch']")
    weight = q.expand_as(confidence).clone()
    if ignore_top > 0:
        weight[:, :ignore_top] = 0.0
    if ignore_bottom > 0:
        weight[:, weight.shape[1] - ignore_bottom :] = 0.0
    return weight
