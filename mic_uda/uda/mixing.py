"""ClassMix (DACS): paste half of the source classes onto the target image."""

from __future__ import annotations

import torch

from mic_uda.uda.bn import check_choice

CLASSMIX_CLASSES = ("per_image", "batch_union")


def classmix_masks(
    labels: torch.Tensor,
    generator: torch.Generator,
    ignore_index: int = 255,
    classes: str = "per_image",
    include_ignore: bool = False,
) -> torch.Tensor:
    """``(B, 1, H, W)`` float mask, 1 where the pixel's source class is among the chosen half.

    For each image ``ceil(n / 2)`` of ``n`` candidate classes are drawn without replacement (the loop
    is over images only; pixels are handled by ``torch.isin``). Candidates:
    ``classes="per_image"``: the classes present in that image (DACS's description, the default);
    ``"batch_union"``: the classes present anywhere in the batch, as the official DACS/DAFormer/MIC
    ``get_class_masks`` (``torch.unique(labels)`` over the batch), so an image may draw classes it does
    not contain and pastes fewer of its own. ``include_ignore``: ``ignore_index`` counts as a class
    (the official code does not drop 255, so void pixels are sometimes pasted).
    """
    check_choice("method.mix.classes", classes, CLASSMIX_CLASSES)

    def candidates(lbl: torch.Tensor) -> torch.Tensor:
        c = torch.unique(lbl)
        return c if include_ignore else c[c != ignore_index]

    union = candidates(labels) if classes == "batch_union" else None
    masks = []
    for lbl in labels:
        cand = union if union is not None else candidates(lbl)
        n = cand.numel()
        chosen = cand[
            torch.randperm(n, generator=generator, device=generator.device)[: (n + 1) // 2].to(cand.device)
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
