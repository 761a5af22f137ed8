"""Colourised label maps with a dataset palette (for PNGs, loggers and notebooks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def colourise(
    labels: torch.Tensor, palette: Sequence[Sequence[int]], ignore_index: int = 255
) -> torch.Tensor:
    """``(..., H, W)`` class ids -> ``(..., 3, H, W)`` uint8 RGB; ignored pixels black."""
    lut = torch.zeros(256, 3, dtype=torch.uint8)
    lut[: len(palette)] = torch.tensor(palette, dtype=torch.uint8)
    lut[ignore_index] = 0
    rgb = lut[labels.long().clamp(0, 255).cpu()]
    return rgb.movedim(-1, -3)
