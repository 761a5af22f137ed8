"""What every encoder + head segmentation network here shares: images in [0, 1] normalised inside
(so the UDA code mixes, masks and jitters in image space and the normalisation travels into the EMA
teacher), stage features for terms that ask for them (FD), logits upsampled to the input, and the
encoder/head split for the 10x head learning rate."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EncoderHeadSegNet(nn.Module):
    """Subclasses set ``self.encoder`` and ``self.head`` and implement :meth:`stage_features`."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), False)

    def normalize(self, x: Tensor) -> Tensor:
        """[0, 1] image -> encoder input (ImageNet statistics by default)."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def stage_features(self, x: Tensor) -> list[Tensor]:
        """The encoder's stage features of a normalised image, coarsest last."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The stage features of a [0, 1] image (e.g. for feature distance)."""
        return self.stage_features(self.normalize(x))

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits at x's size and the encoder features, from one encoder pass (FD needs both)."""
        features = self.forward_features(x)
        logits = F.interpolate(self.head(features), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, features

    def forward(self, x: Tensor) -> Tensor:
        """[0, 1] images (B, 3, H, W) -> logits (B, num_classes, H, W)."""
        return self.forward_with_features(x)[0]

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Encoder parameters (base learning rate)."""
        return self.encoder.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Head parameters (the DAFormer recipe trains them with a 10x learning rate)."""
        return self.head.parameters()
