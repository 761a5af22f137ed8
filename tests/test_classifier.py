"""The classification network: timm backbone + bottleneck + head, weights only from local files."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from mic_uda.models.classifier import ImageClassifier


def test_forward_shapes_and_features() -> None:
    net = ImageClassifier(num_classes=5, backbone="resnet10t", bottleneck_dim=32).eval()
    logits, feats = net.forward_with_features(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 5) and feats.shape == (2, 32) and net.feature_dim == 32
    torch.testing.assert_close(net(torch.rand(2, 3, 32, 32)).shape, torch.Size([2, 5]))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_a_timm_imagenet_checkpoint_dropping_its_classifier(tmp_path: Path, suffix: str) -> None:
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=1000)
    path = tmp_path / f"resnet10t{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    net = ImageClassifier(num_classes=3, backbone="resnet10t")
    net.load_encoder_weights(path)
    for k, v in net.backbone.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_vit_position_embeddings_resampled_to_the_input_size(tmp_path: Path) -> None:
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    path = tmp_path / "vit_ti.pth"
    torch.save(ref.state_dict(), path)
    net = ImageClassifier(num_classes=3, backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 64})
    net.load_encoder_weights(path)  # 14x14 -> 4x4 patch grid through timm's checkpoint filter
    torch.testing.assert_close(net.backbone.patch_embed.proj.weight, ref.patch_embed.proj.weight)
    assert net.backbone.pos_embed.shape[1] == 1 + 16


def test_wrong_architecture_lists_the_mismatched_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    net = ImageClassifier(num_classes=3, backbone="resnet10t")
    with pytest.raises(ValueError, match=r"resnet18\.pth.*different architecture") as err:
        net.load_encoder_weights(path)
    assert "shape mismatches" in str(err.value) or "unexpected keys" in str(err.value)


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    net = ImageClassifier(num_classes=3, backbone="resnet10t")
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        net.load_encoder_weights(tmp_path / "nope.pth")


def test_unknown_timm_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"backbone\.backbone='resnet_nope'"):
        ImageClassifier(num_classes=3, backbone="resnet_nope")
