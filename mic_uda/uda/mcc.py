"""Minimum Class Confusion (Jin et al., 2020), the self-training-free target term of SDAT."""

from __future__ import annotations

import torch

from mic_uda.uda.adversarial import entropy


def mcc_loss(logits: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """Between-class confusion of the target batch, as tllib's ``MinimumClassConfusionLoss``.

    Predictions are temperature-scaled, samples weighted by ``1 + exp(-H)`` (normalised to sum to
    the batch size), the confusion ``C = (p * w)^T p`` divided by its row sums *broadcast over the
    last dimension* (tllib divides ``C / C.sum(dim=1)``, i.e. column j by row-sum j: kept so the
    published hyper-parameters mean the same), loss = off-diagonal mass / num_classes.
    """
    batch, num_classes = logits.shape
    p = torch.softmax(logits.float() / temperature, dim=1)
    w = 1.0 + torch.exp(-entropy(p).detach())
    w = (batch * w / w.sum()).unsqueeze(1)
    confusion = (p * w).transpose(0, 1) @ p
    confusion = confusion / confusion.sum(dim=1)
    return (confusion.sum() - confusion.trace()) / num_classes
