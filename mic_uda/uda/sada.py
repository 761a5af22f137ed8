"""SADA-style alignment for Faster R-CNN (Chen et al., "Scale-Aware Domain Adaptive Faster R-CNN"),
as the official MIC detection code (det/maskrcnn_benchmark/modeling/da_heads/{da_heads,loss}.py) does it:

- image level: one discriminator per FPN level (1x1 convs) on the maps behind gradient reversal
  (``image_grl``, official 0.025). Every level's logits are upsampled (bilinear, align_corners) to the
  finest level's size and the BCE is one mean over levels, locations and images of *both* domains
  (loss.py:85-101);
- instance level: a discriminator on the box-head features of the ROIs behind gradient reversal
  (``instance_grl``, 0.1), one BCE mean over the ROIs of both domains (loss.py:112-114);
- consistency: L1 between each ROI's image-level domain probability (the sigmoid maps ROI-pooled
  7x7 as the box head pools, then averaged) and its instance probability (loss.py:116-121), one mean
  over both domains. Both discriminators are run a second time for it on the features behind
  *non-reversed* gradient scalers ``+consistency_grl * image_grl`` and ``+consistency_grl *
  instance_grl`` (official COS_WEIGHT 0.1; da_heads.py:215-218, 253-266): the discriminators get the
  full consistency gradient, the features a small one that also *reduces* the inconsistency.

The three losses are added with weights 1 (``image_weight``, ``instance_weight``,
``consistency_weight``). Domain labels as official: source 1, target 0. Initialisation as official:
normal std 0.001 (image head) and 0.01 (instance head), zero biases.

Instance heads (``instance_heads``): ``per_level`` (default): one head per ROI pooling level, the ROI's
level from the box pooler's mapping (SADA's scale-aware design, what da_heads.py:131-191 builds);
``shared``: one head for every ROI; ``official_first_level``: the official code as it runs, with its
``return`` inside the level loop (da_heads.py:191): only level-0 ROIs get logits from head 0, every
other ROI keeps logit 0 (BCE log 2, probability 0.5, no gradient). The last is a bug reproduced
only on request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mic_uda.uda.adversarial import grad_reverse

INSTANCE_HEADS = ("per_level", "shared", "official_first_level")
SOURCE_LABEL, TARGET_LABEL = 1.0, 0.0  # official: is_source -> 1 (da_heads/loss.py:35-41, 92)

#: pools per-level maps at ROIs: (maps by level name, boxes per image, image sizes) -> (R, C, 7, 7)
RoIPool = Callable[[Mapping[str, Tensor], list[Tensor], list[tuple[int, int]]], Tensor]


class DomainInputs(Protocol):
    """One domain's detector pass as the alignment reads it (a ``DetectorPass``)."""

    features: Mapping[str, Tensor]
    roi_features: Tensor
    rois: list[Tensor]
    roi_levels: Tensor
    image_sizes: list[tuple[int, int]]


def scale_grad(x: Tensor, coeff: float) -> Tensor:
    """Identity forward (exactly); the gradient is multiplied by ``coeff`` on the way back (the
    official ``GradientScalarLayer`` with a positive weight)."""
    return x.detach() + coeff * (x - x.detach())


class ImageDiscriminator(nn.Module):
    """Per-location domain logit of an FPN map (1x1 convs, as the official ``DAImgHead``)."""

    def __init__(self, channels: int, hidden: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, 1, 1))
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class InstanceDiscriminator(nn.Sequential):
    """Domain logit per ROI feature (official ``DAInsHead``, per level: 2 x (Linear, ReLU, Dropout))."""

    def __init__(self, in_dim: int, hidden: int = 1024, dropout: float = 0.5) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)


def image_level_loss(logits_per_domain: Sequence[Sequence[Tensor]], labels: Sequence[float]) -> Tensor:
    """One BCE mean over both domains: each domain's per-level logits ``(B, 1, H_l, W_l)`` (finest
    first) upsampled (bilinear, align_corners) to its finest level's size, every level, location and
    image counting once (official loss.py:85-101; the two domains share one padded batch there)."""
    total, count = None, 0
    for logits, label in zip(logits_per_domain, labels, strict=True):
        size = logits[0].shape[-2:]
        up = torch.stack([F.interpolate(lg, size=size, mode="bilinear", align_corners=True) for lg in logits])
        bce = F.binary_cross_entropy_with_logits(up, torch.full_like(up, label), reduction="sum")
        total = bce if total is None else total + bce
        count += up.numel()
    assert total is not None, "no domain given"
    return total / count


def instance_level_loss(logits_per_domain: Sequence[Tensor], labels: Sequence[float]) -> Tensor:
    """One BCE mean over the ROIs of both domains (official loss.py:112-114)."""
    logits = torch.cat([lg.reshape(-1) for lg in logits_per_domain])
    target = torch.cat(
        [torch.full_like(lg.reshape(-1), y) for lg, y in zip(logits_per_domain, labels, strict=True)]
    )
    return F.binary_cross_entropy_with_logits(logits, target)


def consistency_loss(pooled_image_probs: Sequence[Tensor], instance_probs: Sequence[Tensor]) -> Tensor:
    """L1 between each ROI's pooled image-level probability and its instance probability, one mean
    over the ROIs of both domains (official loss.py:116-121)."""
    a = torch.cat([p.reshape(-1) for p in pooled_image_probs])
    b = torch.cat([p.reshape(-1) for p in instance_probs])
    return F.l1_loss(a, b)


class ScaleAwareAlignment(nn.Module):
    """The weighted sum of the image, instance and consistency domain losses (and the parts)."""

    def __init__(
        self,
        feature_channels: int,
        instance_dim: int,
        levels: Sequence[str],
        roi_levels: int = 1,
        image_weight: float = 1.0,
        instance_weight: float = 1.0,
        consistency_weight: float = 1.0,
        image_grl: float = 0.025,
        instance_grl: float = 0.1,
        consistency_grl: float = 0.1,
        instance_heads: str = "per_level",
    ) -> None:
        """``levels``: the FPN level names (one image discriminator each, finest first);
        ``roi_levels``: how many levels the box pooler maps ROIs to (instance heads for ``per_level``)."""
        super().__init__()
        if instance_heads not in INSTANCE_HEADS:
            raise ValueError(
                f"method.sada.instance_heads={instance_heads!r} is not one of {list(INSTANCE_HEADS)}"
            )
        self.levels = list(levels)
        self.instance_heads = instance_heads
        self.image = nn.ModuleDict({lv: ImageDiscriminator(feature_channels) for lv in self.levels})
        n_heads = max(1, int(roi_levels)) if instance_heads == "per_level" else 1
        self.instance = nn.ModuleList([InstanceDiscriminator(instance_dim) for _ in range(n_heads)])
        self.weights = (image_weight, instance_weight, consistency_weight)
        self.grl = (image_grl, instance_grl)
        self.consistency_grl = consistency_grl

    def instance_logits(self, x: Tensor, levels: Tensor) -> Tensor:
        """``(R,)`` domain logits of ROI features ``x`` pooled from FPN levels ``levels``."""
        if self.instance_heads == "shared":
            return self.instance[0](x).view(-1)
        out = x.new_zeros(x.shape[0])
        for lv, head in enumerate(self.instance):
            idx = torch.where(levels == lv)[0]
            # every head runs, on no ROI if need be, so each parameter is in the graph (DDP)
            out = out.index_put((idx,), head(x[idx]).view(-1))
        return out

    def forward(
        self,
        source: DomainInputs,
        target: DomainInputs,
        roi_pool: RoIPool,
        grl_scale: float = 1.0,
    ) -> dict[str, Tensor]:
        """``roi_pool``: the detector's ROI pooling (``FasterRCNNDetector.pool_rois``) for the image
        probabilities. ``grl_scale`` multiplies every gradient coefficient reaching the features (the
        reversed ones and the consistency scalers; a warm-start ramp, 1 = constant as official);
        the discriminators' own gradients are not scaled."""
        img_grl, ins_grl = (c * grl_scale for c in self.grl)
        img_cst, ins_cst = self.consistency_grl * img_grl, self.consistency_grl * ins_grl
        img_logits, ins_logits, pooled, ins_probs = [], [], [], []
        for d in (source, target):
            img_logits.append([self.image[lv](grad_reverse(d.features[lv], img_grl)) for lv in self.levels])
            ins_logits.append(self.instance_logits(grad_reverse(d.roi_features, ins_grl), d.roi_levels))
            probs = {
                lv: torch.sigmoid(self.image[lv](scale_grad(d.features[lv], img_cst))) for lv in self.levels
            }
            pooled.append(roi_pool(probs, d.rois, d.image_sizes).mean(dim=(1, 2, 3)))
            ins_probs.append(
                torch.sigmoid(self.instance_logits(scale_grad(d.roi_features, ins_cst), d.roi_levels))
            )
        labels = (SOURCE_LABEL, TARGET_LABEL)
        img = image_level_loss(img_logits, labels)
        ins = instance_level_loss(ins_logits, labels)
        cst = consistency_loss(pooled, ins_probs)
        wi, wn, wc = self.weights
        return {"img": img, "ins": ins, "cst": cst, "total": wi * img + wn * ins + wc * cst}
