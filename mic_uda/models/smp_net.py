"""Any segmentation-models-pytorch architecture as a mic_uda network (e.g. smp's own SegFormer).

Used by the speed benchmark (the anchor times smp's SegFormer) and by users who want an smp
decoder; like DAFormerNet it takes [0, 1] images, normalises inside and never downloads weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import Tensor

from mic_uda.models.daformer import IMAGENET_MEAN, IMAGENET_STD, load_encoder_weights_into
from mic_uda.models.seg_base import SegNetwork


class SmpSegNet(SegNetwork):
    """``smp.create_model(arch, encoder_name, encoder_weights=None, classes=num_classes, **kwargs)``.

    Parameter names are ``model.encoder.*``, ``model.decoder.*``, ``model.segmentation_head.*``: use
    ``decoder``/``segmentation_head`` as the 10x learning-rate keys (``task.module.param_group_keys``).
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "Segformer",
        encoder_name: str = "mit_b0",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.encoder_name = encoder_name
        self.model = smp.create_model(
            arch, encoder_name=encoder_name, encoder_weights=None, classes=num_classes, **kwargs
        )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def load_encoder_weights(self, path: str | os.PathLike) -> None:
        load_encoder_weights_into(self.model.encoder, path, self.encoder_name)
