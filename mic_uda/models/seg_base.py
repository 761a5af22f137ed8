"""The segmentation network seam: what every segmentation network answers, so no loss term needs to
know which network it trains (HRDA answers with its multi-resolution loss and sliding windows).

A network answers four questions:

* ``forward(x)`` -> logits at ``x``'s size for a training-crop-sized image (the teacher's
  pseudo-labels, AdaBN, the media callback);
* ``predict(x)`` -> logits at ``x``'s size for a whole evaluation image (HRDA: sliding windows);
* ``train_loss(images, labels, weight, ...)`` -> :class:`SegTrainOutput`: *its* training loss for
  (image, label, pixel weight) and, when asked, the :class:`FeatureView` s of that very pass;
* ``forward_features(x)`` / ``load_encoder_weights(path)`` on ``feature_network``: the encoder a
  frozen ImageNet copy is made of (FD).

Feature views are named by what they see: ``context`` (the whole input; HRDA's low-resolution pass,
which FD uses) and ``detail`` (what the head saw at full resolution; HRDA's high-resolution crop,
with the label cropped to it, which pixel-level terms such as PiPa use). A single-scale network
gives one pass under both names. Images are in [0, 1] and normalised inside, so mixing, masking and
jitter stay in image space and the normalisation travels into the EMA teacher.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mic_uda.uda.losses import weighted_cross_entropy

#: the names a network's feature views may have (see the module docstring)
VIEW_NAMES = ("context", "detail")


@dataclass
class FeatureView:
    """One encoder pass of a training step and what is aligned with it.

    ``image``: the [0, 1] image the encoder saw (B, 3, h, w); ``stages``: its stage features,
    coarsest last; ``labels`` (B, H, W) / ``weight`` (B, H, W) or None: the labels and pixel weights
    of the same field of view, at the label's resolution (not resized to ``image``).
    """

    image: Tensor
    stages: list[Tensor]
    labels: Tensor
    weight: Tensor | None = None


@dataclass
class SegTrainOutput:
    """A network's answer to "your loss for (image, label, weight)"."""

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)
    views: dict[str, FeatureView] = field(default_factory=dict)


class SegNetwork(nn.Module):
    """A single-scale network: ``forward`` is all it needs; the loss is the pixel-weighted CE of its
    logits (mmseg's: mean over all pixels, ignored ones counting 0). Subclass this for your own
    network (``_target_`` in a backbone config) and override what differs."""

    def predict(self, x: Tensor) -> Tensor:
        """Logits for a whole evaluation image (a single pass here)."""
        return self(x)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError(
            f"{type(self).__name__} gives no encoder features: a term asked for feature views "
            "(e.g. method.fd); use a network with stage features (DAFormerNet, DeepLabV2Net, HRDANet)"
        )

    def train_loss(
        self,
        images: Tensor,
        labels: Tensor,
        weight: Tensor | None = None,
        *,
        ignore_index: int = 255,
        generator: torch.Generator | None = None,
        with_views: bool = False,
    ) -> SegTrainOutput:
        """``with_views``: also return the pass's :class:`FeatureView` s (one pass: both names)."""
        if not with_views:
            loss = weighted_cross_entropy(self(images), labels, weight, ignore_index)
            return SegTrainOutput(loss)
        logits, stages = self.forward_with_features(images)
        view = FeatureView(images, stages, labels, weight)
        loss = weighted_cross_entropy(logits, labels, weight, ignore_index)
        return SegTrainOutput(loss, views=dict.fromkeys(VIEW_NAMES, view))

    @property
    def feature_network(self) -> nn.Module:
        """The module whose ``forward_features`` / ``load_encoder_weights`` are the encoder's."""
        return self


class EncoderHeadSegNet(SegNetwork):
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

    def make_head(
        self, out_channels: int, attention: bool = False, embed_dim: int | None = None
    ) -> nn.Module:
        """A head of this network's type on its stage features with ``out_channels`` outputs;
        ``attention``: HRDA's scale-attention variant (lighter where the official code makes it so)."""
        raise NotImplementedError(f"{type(self).__name__} has no head factory (needed by HRDA)")

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The stage features of a [0, 1] image (e.g. for feature distance)."""
        return self.stage_features(self.normalize(x))

    def decode(self, features: Sequence[Tensor]) -> Tensor:
        """Head logits at the head's own stride (4 for DAFormer, 8 for DeepLabV2)."""
        return self.head(features)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits at x's size and the encoder features, from one encoder pass (FD needs both)."""
        features = self.forward_features(x)
        logits = F.interpolate(self.decode(features), size=x.shape[-2:], mode="bilinear", align_corners=False)
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
