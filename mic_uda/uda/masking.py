"""MIC block masks (SPEC section 1, step 7): pure functions with an explicit generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_mask(
    batch: int,
    height: int,
    width: int,
    block_size: int,
    ratio: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Keep-mask ``(B, 1, H, W)`` in {0, 1}: each ``b x b`` block is kept iff ``u > ratio``.

    The block grid has ``round(H / b) x round(W / b)`` cells (as the official code) and is
    nearest-upsampled to ``H x W``. Drawn on the CPU generator (tiny) and moved, so masks are
    identical on CPU and GPU for the same generator state.
    """
    if block_size <= 0:
        raise ValueError(f"mask block_size must be positive, got {block_size}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    gh, gw = max(1, round(height / block_size)), max(1, round(width / block_size))
    u = torch.rand((batch, 1, gh, gw), generator=generator, device=generator.device)
    keep = (u > ratio).float()
    return F.interpolate(keep, size=(height, width), mode="nearest").to(device)


def apply_mask(images: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Masked pixels take ``fill``; with ``fill`` = the normalisation mean this equals zeroing a
    normalised image, which is what the official code does.

    ``images`` ``(B, C, H, W)``, ``keep`` ``(B, 1, H, W)`` from :func:`block_mask`, ``fill`` a float or a
    ``(C,)`` tensor; returns ``(B, C, H, W)``."""
    if isinstance(fill, torch.Tensor):
        fill = fill.to(images).view(1, -1, 1, 1)
    return images * keep + fill * (1.0 - keep)
