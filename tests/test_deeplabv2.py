"""DeepLabV2 (ResNet-101 V1c, output stride 8, summed ASPP): the official layout, weight files in the
three key conventions, clear errors, and a DACS run through the real entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from mic_uda.models.deeplabv2 import DeepLabV2Net
from mic_uda.train import train


@pytest.fixture(scope="module")
def net() -> DeepLabV2Net:
    torch.manual_seed(0)
    return DeepLabV2Net(19)


def test_layout_is_output_stride_8_with_contract_dilation_and_a_summed_head(net: DeepLabV2Net) -> None:
    logits, feats = net.forward_with_features(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, 19, 64, 64)
    assert [f.shape[-1] for f in feats] == [16, 8, 8, 8] and feats[-1].shape[1] == 2048
    enc = net.encoder
    assert [enc.layer3[0].conv2.dilation[0], enc.layer3[1].conv2.dilation[0]] == [1, 2]
    assert [enc.layer4[0].conv2.dilation[0], enc.layer4[1].conv2.dilation[0]] == [2, 4]
    assert [m.out_channels for m in enc.conv1 if isinstance(m, torch.nn.Conv2d)] == [32, 32, 64]  # V1c stem
    assert [c.dilation[0] for c in net.head.convs] == [6, 12]
    x = torch.rand(1, 2048, 8, 8)
    torch.testing.assert_close(net.head([x]), net.head.convs[0](x) + net.head.convs[1](x))
    assert len(DeepLabV2Net(19, dilations=(6, 12, 18, 24)).head.convs) == 4


def _mmcv_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inverse = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.", "conv1.4.": "stem.4.",
               "conv1.6.": "stem.6.", "bn1.": "stem.7."}  # fmt: skip
    out = {}
    for k, v in state.items():
        for a, b in inverse.items():
            if k.startswith(a):
                k = b + k[len(a) :]
                break
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["timm", "mmcv"])
def test_v1c_weights_load_from_timm_and_mmcv_files(layout: str, net: DeepLabV2Net, tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = timm.create_model("resnet101c", pretrained=False, num_classes=1000).state_dict()  # with fc
    state = source if layout == "timm" else {"state_dict": _mmcv_keys(source)}
    path = tmp_path / "r101.pth"
    torch.save(state, path)
    net.load_encoder_weights(path)
    loaded = net.encoder.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in loaded)


def test_torchvision_resnet101_weights_load_into_the_plain_stem(tmp_path: Path) -> None:
    from torchvision.models import resnet101

    source = resnet101(weights=None).state_dict()
    path = tmp_path / "tv.pth"
    torch.save(source, path)
    plain = DeepLabV2Net(19, stem="plain")
    plain.load_encoder_weights(path)
    assert torch.equal(plain.encoder.state_dict()["layer4.2.conv3.weight"], source["layer4.2.conv3.weight"])
    with pytest.raises(
        ValueError, match=r"missing keys: conv1\.0\.weight.*\n.*unexpected keys: conv1\.weight"
    ):
        DeepLabV2Net(19).load_encoder_weights(path)  # a 7x7-stem file into the V1c stem: listed
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        plain.load_encoder_weights(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"backbone.stem='v1d' is not one of"):
        DeepLabV2Net(19, stem="v1d")


def test_dacs_with_deeplabv2_trains_through_the_entry_point(make_cfg) -> None:
    cfg = make_cfg(
        [
            "backbone=deeplabv2_r101",
            "~backbone.embed_dim",
            "method=dacs",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        ]
    )
    metrics = train(cfg)
    assert (
        metrics["train/loss_sup"] > 0 and "train/loss_mix" in metrics and "test/recalibrated/mIoU" in metrics
    )
