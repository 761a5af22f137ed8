"""The Faster R-CNN network's contracts: forward keeps the owner's BN policy (D1), the training losses
equal torchvision's and their confidence weighting is exact (D3), stage freezing (D8) and the random
target ROIs (D7)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor

from mic_uda.models.detector import (
    FasterRCNNDetector,
    freeze_backbone_stages,
    objectness_loss,
    roi_classification_loss,
)
from mic_uda.uda.bn import batchnorm_layers, reestimate_bn_statistics, set_teacher_mode


def small_detector(**kwargs) -> FasterRCNNDetector:
    torch.manual_seed(0)
    args = dict(
        num_classes=2,
        arch="fasterrcnn_mobilenet_v3_large_fpn",
        min_size=128,
        max_size=128,
        box_batch_size_per_image=16,
        target_proposals=16,
    )
    return FasterRCNNDetector(**{**args, **kwargs})


def images(n: int = 2, size: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def stale_statistics(net: nn.Module) -> None:
    """Running statistics far from any batch's (as a teacher's copied-at-setup ones are)."""
    g = torch.Generator().manual_seed(3)
    for bn in batchnorm_layers(net):
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) * 3 + 0.5)


class BatchStatNorm(nn.Module):
    """BatchNorm that always normalises with the batch's own statistics and owns no buffers."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


def batch_stat_reference(net: nn.Module) -> nn.Module:
    ref = copy.deepcopy(net)
    for module in list(ref.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, BatchStatNorm(child))
    return ref.eval()


def modes(net: nn.Module) -> list[tuple[str, bool, bool]]:
    return [(n, m.training, getattr(m, "track_running_stats", True)) for n, m in net.named_modules()]


def assert_same_detections(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(x[key], y[key])


def test_batch_teacher_forward_uses_batch_statistics_and_keeps_its_modes() -> None:
    """D1: forward() used to call model.eval(), so a teacher.bn=batch teacher normalised with stale
    running statistics and its BN layers were left in eval mode."""
    det = small_detector()
    stale_statistics(det)
    teacher = copy.deepcopy(det)
    set_teacher_mode(teacher, "batch")
    before, buffers = modes(teacher), {k: v.clone() for k, v in teacher.named_buffers()}
    x = images()
    with torch.no_grad():
        out = teacher(x)
        expected = batch_stat_reference(det)(x)
        stale = copy.deepcopy(det).eval()(x)
    assert modes(teacher) == before
    assert any(m.training and not m.track_running_stats for m in batchnorm_layers(teacher))
    for name, value in teacher.named_buffers():
        assert torch.equal(value, buffers[name]), name
    assert sum(len(d["boxes"]) for d in out) > 0
    assert_same_detections(out, expected)
    assert not all(
        len(a["scores"]) == len(b["scores"]) and torch.allclose(a["scores"], b["scores"])
        for a, b in zip(out, stale)
    ), "stale running statistics would have given the same detections: the test would not see D1"


def test_eval_forward_uses_running_statistics_and_changes_no_mode() -> None:
    det = small_detector()
    stale_statistics(det)
    det.eval()
    before = modes(det)
    with torch.no_grad():
        out = det(images())
    assert modes(det) == before
    reference = copy.deepcopy(det)
    with torch.no_grad():
        for bn in batchnorm_layers(reference):  # running statistics as a plain affine map
            bn.weight.mul_(torch.rsqrt(bn.running_var + bn.eps))
            bn.bias.sub_(bn.running_mean * bn.weight)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        assert_same_detections(out, reference(images()))


def test_adabn_reestimation_reaches_a_detector() -> None:
    """With the old forward, AdaBN re-estimated nothing on a detector (eval forced inside forward)
    and left reset statistics (mean 0, var 1)."""
    det = small_detector()
    x = images()
    reestimate_bn_statistics(det, [x])
    first = batchnorm_layers(det)[0]
    ref = copy.deepcopy(det)
    with torch.no_grad():
        stem = ref.model.backbone.body[
            "0"
        ]  # conv + BN + activation: the first BN's input is the conv's output
        tensors = ref.model.transform(list(x))[0].tensors
        conv_out = stem[0](tensors)
    torch.testing.assert_close(first.running_mean, conv_out.mean(dim=(0, 2, 3)))
    n = conv_out.numel() / conv_out.shape[1]
    torch.testing.assert_close(first.running_var, conv_out.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1))


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[10.0, 12, 50, 60], [40, 30, 90, 80]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[5.0, 5, 30, 40]]), "labels": torch.tensor([2])},
    ]


def test_supervised_losses_equal_torchvision() -> None:
    """The step-by-step RPN and the own ROI classification loss are torchvision's (same random draws)."""
    det = small_detector()
    x = images()
    torch.manual_seed(7)
    ours = det.supervised(x, _targets()).losses
    torch.manual_seed(7)
    theirs = det.model(list(x), _targets())
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, msg=key)


def test_confidence_weight_prob_changes_only_the_masked_terms() -> None:
    det = small_detector()
    x = images()
    torch.manual_seed(7)
    plain = det.supervised(x, _targets()).losses
    torch.manual_seed(7)
    weighted = det.supervised(x, _targets(), confidence_weight="prob").losses
    for key in ("loss_rpn_box_reg", "loss_box_reg"):
        torch.testing.assert_close(weighted[key], plain[key])
    for key in ("loss_objectness", "loss_classifier"):  # weights in (0, 1): strictly smaller
        assert 0 < float(weighted[key].detach()) < float(plain[key].detach()), key
    with pytest.raises(ValueError, match="confidence weighting 'max'"):
        det.supervised(x, _targets(), confidence_weight="max")


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_objectness_prob_weight_is_sigmoid_and_not_detached() -> None:
    """Official rpn/loss.py:140-145: mean(BCE * sigmoid(objectness)), the weight in the graph."""
    z = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0])
    loss = objectness_loss(z, y, "prob")
    bce = [softplus(-2.0), softplus(-1.0), softplus(-0.5)]  # label 1: log(1 + e^-z); label 0: log(1 + e^z)
    sig = [sigmoid(2.0), sigmoid(-1.0), sigmoid(0.5)]
    assert float(loss) == pytest.approx(sum(b * s for b, s in zip(bce, sig)) / 3, rel=1e-6)
    loss.backward()
    # d/dz [bce(z) sigmoid(z)] = bce'(z) s + bce(z) s (1 - s), bce' = s - y
    expected = [((s - t) * s + b * s * (1 - s)) / 3 for b, s, t in zip(bce, sig, [1.0, 0.0, 1.0])]
    torch.testing.assert_close(z.grad, torch.tensor(expected))
    assert float(objectness_loss(z, y, "none")) == pytest.approx(sum(bce) / 3, rel=1e-6)


def test_roi_classification_prob_weight_is_detached_max_softmax() -> None:
    """Official box_head/loss.py:205-209: mean(CE * max softmax), the weight detached."""
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    loss = roi_classification_loss(logits, labels, "prob")
    p = torch.softmax(logits.detach(), dim=1)
    ce = [-math.log(float(p[0, 0])), -math.log(float(p[1, 1]))]
    w = [float(p[0].max()), float(p[1].max())]
    assert float(loss) == pytest.approx((w[0] * ce[0] + w[1] * ce[1]) / 2, rel=1e-6)
    loss.backward()
    onehot = F.one_hot(labels, 3).float()
    torch.testing.assert_close(logits.grad, torch.tensor(w)[:, None] * (p - onehot) / 2)
    assert float(roi_classification_loss(logits, labels)) == pytest.approx(sum(ce) / 2, rel=1e-6)


def _frozen(named) -> set[str]:
    return {n for n, p in named if not p.requires_grad}


def test_trainable_backbone_layers_freezes_as_torchvision() -> None:
    """torchvision ignores trainable_backbone_layers without its own weights; the detector applies it
    as torchvision's extractors do (ResNet 3 = stem + layer1 frozen: official FREEZE_CONV_BODY_AT 2)."""
    det = FasterRCNNDetector(2, "fasterrcnn_resnet50_fpn", trainable_backbone_layers=3)
    frozen = _frozen(det.model.backbone.body.named_parameters())
    torch.manual_seed(0)
    reference = _resnet_fpn_extractor(resnet50(), 3)
    assert frozen == _frozen(reference.body.named_parameters())
    assert (
        "conv1.weight" in frozen
        and "layer1.0.conv1.weight" in frozen
        and "layer2.0.conv1.weight" not in frozen
    )
    assert all(p.requires_grad for p in det.model.backbone.fpn.parameters())

    mobile = small_detector()
    for layers in (0, 3, 6):
        for p in mobile.parameters():
            p.requires_grad_(True)
        freeze_backbone_stages(mobile.model, mobile.arch, layers)
        reference = _mobilenet_extractor(mobilenet_v3_large(), True, layers)
        assert _frozen(mobile.model.backbone.body.named_parameters()) == _frozen(
            reference.body.named_parameters()
        ), layers
    with pytest.raises(ValueError, match=r"trainable_backbone_layers must be in \[0, 6\]"):
        freeze_backbone_stages(mobile.model, mobile.arch, 7)


def test_target_rois_are_random_training_proposals_from_the_generator() -> None:
    """D7: official subsample_for_da draws its target ROIs at random from the training proposals."""
    det = small_detector(target_proposals=8)
    x = images()
    runs = [det.unsupervised_features(x, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    for a, b in zip(runs[0].rois, runs[1].rois):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(runs[0].rois, runs[2].rois))
    image_list = det.model.transform(list(x))[0]
    feats = det.model.backbone(image_list.tensors)
    dummy = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}] * 2
    proposals, _ = det.model.rpn(image_list, feats, dummy)  # torchvision's training-mode proposals
    assert det.model.rpn.post_nms_top_n() == 2000  # training mode: torchvision's training top-n
    for rois, props in zip(runs[0].rois, proposals):
        assert len(rois) == min(8, len(props))
        assert all(bool((props == r).all(1).any()) for r in rois)  # a subset of the training proposals
        assert not torch.equal(rois, props[: len(rois)])  # not the top-scoring ones
    assert runs[0].roi_features.shape == (sum(len(r) for r in runs[0].rois), det.instance_dim)
    assert runs[0].losses == {}
