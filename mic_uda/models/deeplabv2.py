"""DeepLabV2 (ResNet-101, output stride 8, summed ASPP), the CNN row of every DAFormer/HRDA/MIC table.

What the official UDA code runs (lhoyer/MIC ``seg/configs/_base_/models/deeplabv2red_r50-d8.py`` with
``experiments.py`` backbone ``r101v1c``): mmseg ``ResNetV1c`` depth 101 (the deep 3 x 3 stem of width
32/32/64), strides (1, 2, 1, 1) and dilations (1, 1, 2, 4) with ``contract_dilation`` (the first
block of a dilated stage uses half the dilation), BN trainable; ``DLV2Head``: one 3 x 3 convolution
per dilation (bias, no norm, no activation, N(0, 0.01) init) from the 2048-channel last stage straight
to the classes, their outputs summed; dilations (6, 12) ("dlv2red", the UDA setting), (6, 12, 18, 24) in
the original DeepLabV2.

The body is timm's (``resnet101c`` = the V1c deep stem, ``resnet101`` = torchvision's 7 x 7 stem),
built with ``output_stride=8``, whose dilation rule is the same contract-dilation one; nothing is
written by hand but the four-convolution head. Weights come from a local file: a timm or torchvision
ResNet-101 state dict (same key names), or mmcv's ``open-mmlab://resnet101_v1c`` (``stem.*`` keys,
mapped). A mismatch lists the missing/unexpected keys and shapes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from mic_uda.models.daformer import IMAGENET_MEAN, IMAGENET_STD, extract_encoder_state_dict
from mic_uda.models.seg_base import EncoderHeadSegNet
from mic_uda.models.weights import check_state_dict, read_weights_file

#: mmcv ResNetV1c deep-stem names -> timm's (conv, BN, ReLU) x 3 sequence; the last BN is timm's bn1
MMCV_STEM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4.",
             "stem.6.": "conv1.6.", "stem.7.": "bn1."}  # fmt: skip
STEMS = {"deep": "resnet101c", "plain": "resnet101"}


class SummedASPP(nn.Module):
    """DLV2Head: per-dilation 3 x 3 convolutions to the classes, summed."""

    def __init__(self, in_ch: int, num_classes: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_ch, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.convs:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = features[-1]
        return torch.stack([conv(x) for conv in self.convs]).sum(0)


class DeepLabV2Net(EncoderHeadSegNet):
    """ResNet-101 body (output stride 8) + summed ASPP; images in [0, 1], normalised inside, like
    :class:`~mic_uda.models.daformer.DAFormerNet` (same interface: ``forward_features`` for FD,
    ``forward_with_features``, ``head`` for the 10x lr group, ``load_encoder_weights``)."""

    def __init__(
        self,
        num_classes: int,
        stem: str = "deep",
        dilations: Sequence[int] = (6, 12),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(mean, std)
        if stem not in STEMS:
            raise ValueError(f"backbone.stem={stem!r} is not one of {list(STEMS)}")
        self.encoder_name = STEMS[stem]
        self.num_classes = int(num_classes)
        self.encoder = timm.create_model(
            self.encoder_name, pretrained=False, features_only=True, output_stride=8, out_indices=(1, 2, 3, 4)
        )
        self.feature_channels: tuple[int, ...] = tuple(self.encoder.feature_info.channels())
        self.dilations = tuple(int(d) for d in dilations)
        self.head = SummedASPP(self.feature_channels[-1], num_classes, self.dilations)

    def make_head(
        self, out_channels: int, attention: bool = False, embed_dim: int | None = None
    ) -> nn.Module:
        """A summed ASPP on layer4 (HRDA's DeepLabV2 scale attention is this head type, hrda_head.py:57)."""
        return SummedASPP(self.feature_channels[-1], out_channels, self.dilations)

    def stage_features(self, x: Tensor) -> list[Tensor]:
        """Stage features layer1..layer4 (strides 4, 8, 8, 8) of a normalised image."""
        return list(self.encoder(x))

    def load_encoder_weights(self, path: str | os.PathLike) -> None:
        """A local ResNet-101 ImageNet state dict (timm/torchvision names, or mmcv's V1c ``stem.*``);
        the classifier (``fc.*``) is dropped."""
        raw = read_weights_file(Path(path), self.encoder_name)
        state = map_resnet_keys(extract_encoder_state_dict(raw, str(path)))
        check_state_dict(self.encoder, state, self.encoder_name, str(path))
        self.encoder.load_state_dict(state)


def map_resnet_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """mmcv ResNetV1c / timm / torchvision ResNet keys -> timm's; ``fc.*`` dropped."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        for old, new in MMCV_STEM.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out
