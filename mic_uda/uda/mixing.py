"""ClassMix (DACS): paste half of the source classes onto the target image."""

from __future__ import annotations

import torch


def classmix_masks(labels: torch.Tensor, generator: torch.Generator, ignore_index: int = 255) -> torch.Tensor:
    """``(B, 1, H, W)`` float mask, 1 where the pixel's source class is among the chosen half.

    Per image, ``ceil(n / 2)`` of the ``n`` present classes (ignore excluded) are drawn without
    replacement, as in DACS. The loop is over images only; pixels are handled by ``torch.isin``.
    """
    masks = []
    for lbl in labels:
        classes = torch.unique(lbl)
        classes = classes[classes != ignore_index]
        n = classes.numel()
        chosen = classes[
            torch.randperm(n, generator=generator, device=generator.device)[: (n + 1) // 2].to(classes.device)
        ]
        masks.append(torch.isin(lbl, chosen))
    return torch.stack(masks).unsqueeze(1).float()


def mix(mask: torch.Tensor, pasted: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """``pasted`` where ``mask`` is 1, ``background`` elsewhere; broadcasts over channels.

    Works for images ``(B, C, H, W)`` and for label/weight maps ``(B, H, W)`` (mask squeezed).
    """
    if pasted.dim() == 3:
        mask = mask[:, 0]
    return torch.where(mask.bool(), pasted, background)
