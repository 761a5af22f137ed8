"""ImageNet Feature Distance (DAFormer, SPEC 2): keep the student's bottleneck features of
*thing*-class source pixels close to those of the frozen ImageNet encoder, so the classes ImageNet
knows well (train, bus, truck, ...) are not forgotten while fitting the synthetic source.

Facts from the official DAFormer/MIC code (``seg/mmseg/models/uda/dacs.py:173-252``,
``mmseg/utils/utils.py:18-39``, ``configs/_base_/uda/dacs_a999_fdthings.py``): the last encoder stage,
L2 distance per feature cell averaged over the cells whose downscaled label is a thing class, the label
downscaled by the majority class of each cell kept only where it covers >= 0.75 of the cell, weight
0.005, source images only, the ImageNet model in eval mode without gradients. The official code returns
NaN for an empty mask (harmless there, it has no graph to the weights); here it is an exact zero that
keeps the graph, so the step's other losses are still finite.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def downscale_label_ratio(
    labels: Tensor, scale: int, min_ratio: float, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """``(B, H, W)`` labels -> ``(B, H // scale, W // scale)``: each cell's majority class (void
    counted as a class of its own), ``ignore_index`` where that class covers less than ``min_ratio``
    of the cell or is void."""
    if scale < 1:
        raise ValueError(f"downscale_label_ratio: scale must be >= 1, got {scale}")
    void = num_classes
    lbl = labels.clone()
    lbl[lbl == ignore_index] = void
    one_hot = F.one_hot(lbl.long(), num_classes + 1).permute(0, 3, 1, 2).float()
    share, cls = F.avg_pool2d(one_hot, kernel_size=scale).max(dim=1)
    cls[cls == void] = ignore_index
    cls[share < min_ratio] = ignore_index
    return cls


def masked_feature_distance(features: Tensor, reference: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the masked cells of ``||f - f_ref||_2`` along channels; an exact, graph-connected
    zero when no cell is masked (never NaN)."""
    dist = torch.linalg.vector_norm(features - reference, dim=1)  # (B, h, w)
    if mask is None:
        return dist.mean()
    if not bool(mask.any()):
        return features.sum() * 0.0
    return dist[mask].mean()


class ImageNetFeatureDistance(nn.Module):
    """The FD term: a frozen copy of the encoder as it was loaded from the ImageNet weights file.

    ``encoder`` is any module mapping a *normalised* image to a list of stage features (the network's
    own ``forward_features`` decides the normalisation; this term receives features, not images, from
    the student, and computes the reference with ``reference_fn``). Works with BN encoders (the copy
    runs in eval mode on the ImageNet statistics) and LayerNorm ones alike.
    """

    def __init__(
        self,
        weight: float,
        thing_classes: Sequence[int] | None,
        scale_min_ratio: float,
        num_classes: int,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        self.weight = float(weight)
        self.scale_min_ratio = float(scale_min_ratio)
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        classes = torch.tensor(list(thing_classes) if thing_classes is not None else [], dtype=torch.long)
        self.use_classes = thing_classes is not None
        self.register_buffer("thing_classes", classes, persistent=False)
        self.imagenet: nn.Module | None = None
        self._memory_bytes = 0

    def build_reference(self, network: nn.Module, weights_file: str | None) -> None:
        """The frozen reference: a copy of the network (its head dropped) with the encoder loaded from
        the ImageNet ``weights_file``, whatever the student holds (e.g. after ``init_from``). A network
        that wraps another (HRDA) names the encoder's owner in ``feature_network``."""
        network = getattr(network, "feature_network", network)
        if not hasattr(network, "forward_features") or not hasattr(network, "load_encoder_weights"):
            raise ValueError(
                f"method.fd needs a network with forward_features/load_encoder_weights (DAFormerNet, e.g. "
                f"backbone=mit_b5|efficientnet_lite0), got {type(network).__name__}"
            )
        reference = copy.deepcopy(network)
        if hasattr(reference, "head"):
            reference.head = nn.Identity()  # only the encoder is used
        self.imagenet = reference.requires_grad_(False).eval()
        tensors = [*reference.parameters(), *reference.buffers()]
        self._memory_bytes = sum(t.numel() * t.element_size() for t in tensors)
        if weights_file:
            self.load_reference(weights_file)

    def load_reference(self, weights_file: str) -> None:
        """(Re)load the reference encoder from the ImageNet file, in place (no second copy)."""
        if self.imagenet is None:
            raise RuntimeError("ImageNetFeatureDistance: build_reference() was not called")
        self.imagenet.load_encoder_weights(weights_file)

    def train(self, mode: bool = True) -> ImageNetFeatureDistance:
        """The ImageNet copy is always in eval mode (BN statistics, no dropout/drop-path)."""
        return super().train(False)

    def memory_bytes(self) -> int:
        """Parameters + buffers of the frozen copy: what FD adds to the model's memory (computed once)."""
        return self._memory_bytes if self.imagenet is not None else 0

    def forward(self, images: Tensor, labels: Tensor, student_last: Tensor) -> tuple[Tensor, Tensor]:
        """``weight * FD`` on the last stage and the thing-cell mask; ``images`` in [0, 1]."""
        if self.imagenet is None:
            raise RuntimeError("ImageNetFeatureDistance: build_reference() was not called")
        with torch.no_grad():
            reference = self.imagenet.forward_features(images)[-1].detach()
        mask = None
        if self.use_classes:
            scale = labels.shape[-1] // student_last.shape[-1]
            cells = downscale_label_ratio(
                labels, scale, self.scale_min_ratio, self.num_classes, self.ignore_index
            )
            mask = torch.isin(cells, self.thing_classes.to(cells.device))
        return self.weight * masked_feature_distance(student_last, reference, mask), mask
