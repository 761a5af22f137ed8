"""SADA-style alignment for Faster R-CNN (Chen et al., "Scale-Aware Domain Adaptive Faster R-CNN"):
image-level discriminators (one per FPN level: scale-aware), an instance-level discriminator on the
ROI box-head features, both behind gradient reversal, and the consistency between the image-level and
instance-level domain predictions of each image.

Defaults follow the DA/SA-Faster R-CNN code: reversal weight 0.1 for both levels, loss weights
image 1.0, instance 1.0, consistency 0.1; domain label source = 0, target = 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mic_uda.uda.adversarial import grad_reverse


class ImageDiscriminator(nn.Module):
    """Per-location domain logit of an FPN map (1x1 convs, as DA-Faster's image-level head)."""

    def __init__(self, channels: int, hidden: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class InstanceDiscriminator(nn.Sequential):
    """Domain logit per ROI feature (DA-Faster's instance-level head: 2 x (Linear, ReLU, Dropout))."""

    def __init__(self, in_dim: int, hidden: int = 1024, dropout: float = 0.5) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )


def consistency_loss(
    image_logits: Sequence[Tensor], instance_logits: Tensor, rois_per_image: Sequence[int]
) -> Tensor:
    """Mean squared difference between each ROI's domain probability and its image's mean
    image-level probability (averaged over locations and FPN levels)."""
    per_image = torch.stack([torch.sigmoid(lg).flatten(1).mean(1) for lg in image_logits]).mean(0)  # (B,)
    image_prob = torch.repeat_interleave(
        per_image, torch.as_tensor(list(rois_per_image), device=per_image.device)
    )
    return F.mse_loss(torch.sigmoid(instance_logits.view(-1)), image_prob)


class ScaleAwareAlignment(nn.Module):
    """Returns the weighted sum of image, instance and consistency domain losses (and the parts)."""

    def __init__(
        self,
        feature_channels: int,
        instance_dim: int,
        levels: Sequence[str],
        image_weight: float = 1.0,
        instance_weight: float = 1.0,
        consistency_weight: float = 0.1,
        image_grl: float = 0.1,
        instance_grl: float = 0.1,
    ) -> None:
        super().__init__()
        self.levels = list(levels)
        self.image = nn.ModuleDict({lv: ImageDiscriminator(feature_channels) for lv in self.levels})
        self.instance = InstanceDiscriminator(instance_dim)
        self.weights = (image_weight, instance_weight, consistency_weight)
        self.grl = (image_grl, instance_grl)

    def _domain(
        self,
        features: Mapping[str, Tensor],
        instances: Tensor,
        rois: Sequence[int],
        domain: float,
        grl_scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        img_grl, ins_grl = (c * grl_scale for c in self.grl)
        img_logits = [self.image[lv](grad_reverse(features[lv], img_grl)) for lv in self.levels]
        ins_logits = self.instance(grad_reverse(instances, ins_grl))
        img_loss = torch.stack(
            [F.binary_cross_entropy_with_logits(lg, torch.full_like(lg, domain)) for lg in img_logits]
        ).mean()
        ins_loss = F.binary_cross_entropy_with_logits(ins_logits, torch.full_like(ins_logits, domain))
        cst = consistency_loss([lg.detach() for lg in img_logits], ins_logits, rois)
        return img_loss, ins_loss, cst

    def forward(
        self,
        features_s: Mapping[str, Tensor],
        instances_s: Tensor,
        rois_s: Sequence[int],
        features_t: Mapping[str, Tensor],
        instances_t: Tensor,
        rois_t: Sequence[int],
        grl_scale: float = 1.0,
    ) -> dict[str, Tensor]:
        """``grl_scale`` multiplies both reversal coefficients (a warm-start ramp; 1 = constant)."""
        parts_s = self._domain(features_s, instances_s, rois_s, 0.0, grl_scale)
        parts_t = self._domain(features_t, instances_t, rois_t, 1.0, grl_scale)
        img, ins, cst = (a + b for a, b in zip(parts_s, parts_t))
        wi, wn, wc = self.weights
        return {"img": img, "ins": ins, "cst": cst, "total": wi * img + wn * ins + wc * cst}
