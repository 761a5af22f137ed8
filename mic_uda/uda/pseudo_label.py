"""Teacher pseudo-labels and their confidence weights (SPEC section 1, step 3)."""

from __future__ import annotations

from typing import Literal

import torch

WeightScope = Literal["image", "batch"]
WeightType = Literal["fraction", "probability"]


def pseudo_label_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, confidence)`` = argmax and max of the softmax over dim 1, computed in float32:
    logits ``(B, C, H, W)`` -> two ``(B, H, W)`` tensors (``(B, C)`` -> two ``(B,)``)."""
    conf, labels = torch.softmax(logits.float(), dim=1).max(dim=1)
    return labels, conf


def confidence_weight(
    confidence: torch.Tensor,
    threshold: float,
    scope: WeightScope = "image",
    ignore_top: int = 0,
    ignore_bottom: int = 0,
    weight_type: WeightType = "fraction",
) -> torch.Tensor:
    """Weight of each pseudo-labelled element, shaped like ``confidence`` (``(B, H, W)`` or ``(B,)``).

    ``weight_type="fraction"``: the fraction of elements with confidence >= ``threshold``, one scalar
    per image (``scope="image"``, the papers' description) or over the whole batch (``"batch"``, the
    official DACS/DAFormer code); for classification (``(B,)``) per-image it is the 0/1 indicator.
    ``"probability"``: the teacher's confidence itself (MIC for classification).
    Rows within the top/bottom margins of a ``(B, H, W)`` map get weight 0 (Cityscapes ego-car and
    rectification borders); the fraction itself is computed before that.
    """
    if weight_type == "probability":
        weight = confidence.detach().float().clone()
    elif weight_type == "fraction":
        confident = (confidence >= threshold).float()  # official .ge
        if scope == "image":
            q = confident.reshape(confident.shape[0], -1).mean(1)
        elif scope == "batch":
            q = confident.mean().expand(confident.shape[0])
        else:
            raise ValueError(f"pseudo_label.weight_scope={scope!r} is not one of ['image', 'batch']")
        weight = q.view(-1, *([1] * (confidence.dim() - 1))).expand_as(confidence).clone()
    else:
        raise ValueError(
            f"pseudo_label.weight_type={weight_type!r} is not one of ['fraction', 'probability']"
        )
    if confidence.dim() == 3:
        if ignore_top > 0:
            weight[:, :ignore_top] = 0.0
        if ignore_bottom > 0:
            weight[:, weight.shape[1] - ignore_bottom :] = 0.0
    return weight
