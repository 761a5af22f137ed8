"""Image classifier for classification UDA: a timm backbone + bottleneck + linear head (SDAT/CDAN).

The bottleneck (Linear, BatchNorm1d, ReLU to 256 features, as the Transfer-Learning-Library SDAT and
MIC build on) gives the features that CDAN conditions on. Networks are built with
``pretrained=False``; ImageNet weights come from a local timm checkpoint file only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from mic_uda.models.weights import check_state_dict, read_weights_file, require_weights_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageClassifier(nn.Module):
    """``forward(x)`` -> logits; ``forward_with_features(x)`` -> (logits, bottleneck features).

    Takes images in [0, 1] and normalises internally (like the segmentation networks), so masking
    fills with ``mean`` and augmentation stays in image space. ``backbone_kwargs`` go to
    ``timm.create_model`` (e.g. ``img_size``/``patch_size`` for a ViT on 32 px digits).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        bottleneck_dim: int = 256,
        backbone_kwargs: dict[str, Any] | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        try:
            self.backbone = timm.create_model(
                backbone, pretrained=False, num_classes=0, **(backbone_kwargs or {})
            )
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise ValueError(f"backbone.backbone={backbone!r}: {err}") from err
        self.feature_dim = int(bottleneck_dim)
        self.bottleneck = nn.Sequential(
            nn.Linear(self.backbone.num_features, bottleneck_dim), nn.BatchNorm1d(bottleneck_dim), nn.ReLU()
        )
        self.head = nn.Linear(bottleneck_dim, num_classes)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.bottleneck(self.backbone((x - self.mean) / self.std))
        return self.head(f), f

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_features(x)[0]

    def load_encoder_weights(self, path: str | os.PathLike) -> None:
        """Load a local timm ImageNet checkpoint (``.pth``/``.bin``/``.safetensors``) into the backbone.

        The ImageNet classifier is dropped; ViT position embeddings are resampled to this input size
        with timm's own checkpoint filter; any other mismatch is an error listing the keys.
        """
        load_backbone_weights(self.backbone, Path(path), self.backbone_name)


def read_state_dict(path: Path, name: str = "this network") -> dict[str, Tensor]:
    """A plain state dict from a torch or safetensors file, unwrapping ``state_dict``/``model``."""
    obj: Any = read_weights_file(path, name)  # torch or safetensors; a clear error otherwise
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"'{path}' does not hold a state dict (a dict of tensors)")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in obj.items()}


def load_backbone_weights(backbone: nn.Module, path: Path, name: str) -> None:
    require_weights_file(path, name)
    state = read_state_dict(path, name)
    filter_fn = getattr(__import__(type(backbone).__module__, fromlist=["_"]), "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's own key/shape adaptation (ViT pos-embed resampling, ...)
        state = filter_fn(state, backbone)
    classifier_keys = {
        f"{prefix}.{suffix}"
        for prefix in ("head", "fc", "classifier", "head.fc", "last_linear")
        for suffix in ("weight", "bias")
    }
    expected = backbone.state_dict()
    state = {k: v for k, v in state.items() if k not in classifier_keys or k in expected}
    check_state_dict(backbone, state, name, str(path))
    backbone.load_state_dict(state, strict=True)
