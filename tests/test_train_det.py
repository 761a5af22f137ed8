"""Detection end to end through the real entry point on the embedded default, and its pieces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mic_uda.evaluate import load_module
from mic_uda.models.daformer import load_encoder_weights_into
from mic_uda.models.detector import SmpEncoderFPN
from mic_uda.tasks.det import MIC_DET_LOSSES, DetUDAModule, pseudo_targets
from mic_uda.train import train
from mic_uda.uda.sada import ScaleAwareAlignment

TERMS = {
    "source_only": set(),
    "sada": {"loss_sada"},
    "mic": {"loss_mic"},
    "sada_mic": {"loss_sada", "loss_mic"},
}


@pytest.mark.parametrize("method", list(TERMS))
def test_det_train_then_evaluate(method: str, make_cfg) -> None:
    cfg = make_cfg(["task=det", f"method={method}"])
    metrics = train(cfg)
    for term in ("loss_sada", "loss_mic"):
        assert (f"train/{term}" in metrics) == (term in TERMS[method]), term
    assert "test/mAP50" in metrics and "test/student/AP50_car" in metrics
    assert ("val/teacher/mAP50" in metrics) == ("loss_mic" in TERMS[method])
    out = Path(cfg.paths.output_dir)
    assert json.loads((out / "metrics.json").read_text())["primary_metric"] == "test/mAP50"
    panels = list((out / "media").rglob("target_val_boxes_*.png"))
    assert panels  # boxes drawn on the fixed validation images at the validation
    model = load_module(out / "checkpoints" / "last.ckpt")
    assert isinstance(model, DetUDAModule)
    assert (model.alignment is not None) == ("loss_sada" in TERMS[method])


def test_pseudo_boxes_are_filtered_by_score() -> None:
    dets = [
        {
            "boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]]),
            "scores": torch.tensor([0.95, 0.8, 0.81]),
            "labels": torch.tensor([1, 2, 2]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    out = pseudo_targets(dets, 0.8)
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[0.0, 0, 4, 4], [2, 2, 6, 6]]))
    torch.testing.assert_close(out[0]["labels"], torch.tensor([1, 2]))
    assert out[1]["boxes"].shape == (0, 4)


def test_masked_target_trains_only_objectness_and_classification(make_cfg, monkeypatch) -> None:
    """The MIC term sums exactly the RPN objectness and ROI classification losses."""
    assert MIC_DET_LOSSES == ("loss_objectness", "loss_classifier")
    cfg = make_cfg(["task=det", "method=mic"])
    module: DetUDAModule = instantiate(cfg.task.module, _recursive_=False)
    module.generator = torch.Generator().manual_seed(0)
    fake = {
        "loss_objectness": torch.tensor(1.0, requires_grad=True),
        "loss_rpn_box_reg": torch.tensor(100.0, requires_grad=True),
        "loss_classifier": torch.tensor(2.0, requires_grad=True),
        "loss_box_reg": torch.tensor(1000.0, requires_grad=True),
    }
    monkeypatch.setattr(module.student, "supervised", lambda x, t: (fake, None, None, None))
    monkeypatch.setattr(module, "manual_backward", lambda loss: None)
    logs = module._mic_term(torch.rand(2, 3, 64, 64), module.generator)
    assert float(logs["train/loss_mic"]) == pytest.approx(3.0)


def test_lite0_fpn_detector_loads_imagenet_encoder_and_trains_end_to_end(make_cfg) -> None:
    """The CamVid detection table's network: Faster R-CNN on the EfficientNet-Lite0 encoder whose
    ImageNet weights ship as a registry package (the only pretrained weights on these machines)."""
    cfg = make_cfg(["task=det", "backbone=fasterrcnn_lite0_fpn", "method=sada_mic"])
    net_cfg = OmegaConf.to_container(cfg.backbone, resolve=True)
    net_cfg.pop("weights")  # a full-detector file, loaded by the task module at fit
    detector = instantiate(net_cfg, num_classes=3)
    backbone = detector.model.backbone
    assert isinstance(backbone, SmpEncoderFPN) and detector.feature_levels == ["0", "1", "2", "pool"]
    assert detector.instance_dim == 256
    reference = SmpEncoderFPN(backbone.encoder_name)
    load_encoder_weights_into(reference.encoder, cfg.backbone.backbone_weights, backbone.encoder_name)
    expected = reference.encoder.state_dict()
    loaded = backbone.encoder.state_dict()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    assert {k for k in expected if not k.endswith("num_batches_tracked")} == set(loaded)
    for name, value in loaded.items():
        assert torch.equal(value, expected[name]), name  # the file's weights and BN statistics
    metrics = train(cfg)
    assert "train/loss_sada" in metrics and "train/loss_mic" in metrics and "test/mAP50" in metrics


def test_sada_grl_scale_multiplies_only_the_reversed_feature_gradient() -> None:
    """The warm start scales what reaches the detector's features, not the discriminators' own gradient."""
    torch.manual_seed(0)
    align = ScaleAwareAlignment(feature_channels=8, instance_dim=16, levels=["0", "1"])
    g = torch.Generator().manual_seed(1)
    inputs = [
        {lv: torch.randn(2, 8, 6, 6, generator=g) for lv in ("0", "1")},
        torch.randn(4, 16, generator=g),
        {lv: torch.randn(2, 8, 6, 6, generator=g) for lv in ("0", "1")},
        torch.randn(4, 16, generator=g),
    ]
    grads = []
    for scale in (1.0, 0.25):
        align.zero_grad()
        torch.manual_seed(2)  # the same dropout masks in the instance discriminator
        fs, is_, ft, it = (
            {k: v.clone().requires_grad_() for k, v in x.items()}
            if isinstance(x, dict)
            else x.clone().requires_grad_()
            for x in inputs
        )
        align(fs, is_, [2, 2], ft, it, [2, 2], grl_scale=scale)["total"].backward()
        grads.append(
            ([fs["0"].grad, is_.grad, ft["1"].grad, it.grad], [p.grad.clone() for p in align.parameters()])
        )
    for full, quarter in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(quarter, 0.25 * full)
        assert full.abs().sum() > 0
    for full, same in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(same, full)


def test_sada_grl_warm_start_through_the_entry_point(make_cfg, tmp_path: Path) -> None:
    metrics = train(make_cfg(["task=det", "method=sada", "method.sada.grl_max_iters=10"]))
    # logged at the last of 2 steps, t = 1: 2 / (1 + exp(-1 / 10)) - 1
    assert metrics["train/grl_coeff"] == pytest.approx(2 / (1 + math.exp(-0.1)) - 1, rel=1e-5)
    constant = train(make_cfg(["task=det", "method=sada"], out=tmp_path / "constant"))
    assert constant["train/grl_coeff"] == 1.0
