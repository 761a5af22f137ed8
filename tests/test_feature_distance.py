"""ImageNet Feature Distance: the label downscaling, the masked distance (exact, and an exact zero that
keeps the graph for an empty mask), the frozen reference from the weights file, and the term switched
on in DACS/MIC through the real entry point with a LayerNorm (MiT) and a BN (EfficientNet) encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mic_uda.models.daformer import DAFormerNet
from mic_uda.train import train
from mic_uda.uda.feature_distance import (
    ImageNetFeatureDistance,
    downscale_label_ratio,
    masked_feature_distance,
)

THINGS = [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]


def test_downscale_label_ratio_keeps_majority_cells_above_the_ratio() -> None:
    lbl = torch.full((1, 4, 4), 0)
    lbl[0, :2, :2] = torch.tensor([[13, 13], [13, 0]])  # 3/4 car: kept (>= 0.75)
    lbl[0, :2, 2:] = torch.tensor([[13, 13], [0, 0]])  # 1/2: ignored
    lbl[0, 2:, :2] = 255  # void: ignored
    lbl[0, 2:, 2:] = torch.tensor([[7, 7], [7, 255]])  # 3/4 class 7 (void counts in the cell)
    out = downscale_label_ratio(lbl, 2, 0.75, num_classes=19)
    assert torch.equal(out, torch.tensor([[[13, 255], [255, 7]]]))


def test_masked_feature_distance_exact_and_empty_mask_is_a_connected_zero() -> None:
    f = torch.zeros(1, 2, 1, 2, requires_grad=True)
    ref = torch.tensor([[[[3.0, 0.0]], [[4.0, 1.0]]]])  # distances 5 and 1
    assert float(masked_feature_distance(f, ref)) == pytest.approx(3.0)
    assert float(masked_feature_distance(f, ref, torch.tensor([[[True, False]]]))) == pytest.approx(5.0)
    empty = masked_feature_distance(f, ref, torch.zeros(1, 1, 2, dtype=torch.bool))
    assert float(empty) == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


@pytest.mark.parametrize("encoder", ["mit_b0", "timm-tf_efficientnet_lite0"])
def test_reference_is_frozen_in_eval_and_only_the_student_gets_gradients(
    encoder: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    student = DAFormerNet(19, encoder_name=encoder, embed_dim=16)
    weights = tmp_path / "enc.pth"
    torch.save(DAFormerNet(19, encoder_name=encoder, embed_dim=16).encoder.state_dict(), weights)
    fd = ImageNetFeatureDistance(0.005, THINGS, 0.75, num_classes=19)
    fd.build_reference(student, str(weights))
    fd.train()  # Lightning toggles train(); the reference stays in eval
    assert not fd.imagenet.training and not any(p.requires_grad for p in fd.imagenet.parameters())
    saved = torch.load(weights)
    assert all(torch.equal(fd.imagenet.encoder.state_dict()[k], v) for k, v in saved.items())
    assert fd.memory_bytes() > 0
    x = torch.rand(2, 3, 64, 64)
    labels = torch.full((2, 64, 64), 13)
    _logits, feats = student.forward_with_features(x)
    loss, mask = fd(x, labels, feats[-1])
    assert mask.all() and mask.shape == (2, 2, 2)  # stride 32
    with torch.no_grad():
        ref = fd.imagenet.forward_features(x)[-1]
    expected = 0.005 * torch.linalg.vector_norm(feats[-1] - ref, dim=1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.encoder.parameters())
    assert all(p.grad is None for p in fd.imagenet.parameters())
    stuff = torch.zeros(2, 64, 64, dtype=torch.long)  # road only: no thing cell
    zero, _ = fd(x, stuff, student.forward_with_features(x)[1][-1])
    assert float(zero) == 0.0 and zero.requires_grad


def _encoder_file(make_cfg, tmp_path: Path, backbone: str) -> Path:
    from hydra.utils import instantiate

    cfg = make_cfg([f"backbone={backbone}", "backbone.weights=null"])
    net = instantiate(
        {k: v for k, v in cfg.backbone.items() if k != "weights"}, num_classes=cfg.data.num_classes
    )
    path = tmp_path / f"{backbone}_imagenet.pth"
    torch.save(net.encoder.state_dict(), path)
    return path


@pytest.mark.parametrize("backbone", ["mit_b0", "efficientnet_lite0"])
def test_fd_term_trains_through_the_entry_point(backbone: str, make_cfg, tmp_path: Path) -> None:
    weights = _encoder_file(make_cfg, tmp_path, backbone)
    cfg = make_cfg(
        [
            f"backbone={backbone}",
            f"backbone.weights={weights}",
            "method=mic",
            "method.fd={weight: 0.005, scale_min_ratio: 0.75, classes: [1, 2]}",
        ]
    )
    metrics = train(cfg)
    assert metrics["train/loss_fd"] >= 0.0 and metrics["train/fd_memory_mb"] > 0.0
    assert 0.0 <= metrics["train/fd_cells"] <= 1.0
    from mic_uda.evaluate import load_module

    model = load_module(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    saved = torch.load(weights)  # the reference is still the ImageNet file after training
    assert all(
        torch.equal(model.terms["fd"].fd.imagenet.encoder.state_dict()[k], v) for k, v in saved.items()
    )


def test_fd_without_a_weights_file_is_a_clear_error(make_cfg) -> None:
    with pytest.raises(ValueError, match=r"method.fd .* needs backbone.weights"):
        train(make_cfg(["method=dacs", "method.fd={weight: 0.005}"]))


def test_init_from_student_is_not_overwritten_by_the_imagenet_file_but_fd_compares_with_it(
    make_cfg, tmp_path: Path
) -> None:
    from hydra.utils import instantiate

    from mic_uda.utils.checkpointing import init_student_from

    weights = _encoder_file(make_cfg, tmp_path, "mit_b0")
    first = make_cfg(["method=source_only", f"backbone.weights={weights}"], out=tmp_path / "a")
    train(first)
    ckpt = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    cfg = make_cfg(
        ["method=mic", f"backbone.weights={weights}", "method.fd={weight: 0.005}"], out=tmp_path / "b"
    )
    model = instantiate(cfg.task.module, _recursive_=False)
    init_student_from(model, ckpt)
    trained = {k: v.clone() for k, v in model.student.encoder.state_dict().items()}
    model.setup("fit")
    assert all(torch.equal(model.student.encoder.state_dict()[k], v) for k, v in trained.items())
    saved = torch.load(weights)
    assert all(
        torch.equal(model.terms["fd"].fd.imagenet.encoder.state_dict()[k], v) for k, v in saved.items()
    )
    assert not all(torch.equal(trained[k], v) for k, v in saved.items())  # the burn-in moved the encoder
