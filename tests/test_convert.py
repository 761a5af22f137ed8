"""``python -m mic_uda.convert``: official DAFormer / MIC(DAFormer) / MIC(HRDA) mmseg checkpoints -> ours.

No released checkpoint is available here, so the official files are built from the official module
structure (lhoyer/MIC 2f932a9 ``seg/mmseg/models``: ``backbones/mix_transformer.py``,
``decode_heads/daformer_head.py`` + ``sep_aspp_head.py`` + mmcv ``ConvModule`` /
``DepthwiseSeparableConvModule``, ``decode_heads/hrda_head.py``, ``uda/dacs.py``), written out by hand below
with their names and shapes and random values, independently of our networks and of the key map under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mic_uda.convert import convert, main
from mic_uda.evaluate import evaluate, load_module
from mic_uda.uda.feature_distance import ImageNetFeatureDistance

MIT_B0 = {"dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2), "sr": (8, 4, 2, 1)}  # mix_transformer.py mit_b0
SYNTHETIC = ["sky", "building", "vegetation", "road", "sidewalk", "car", "person", "pole"]
CITYSCAPES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    """mmcv BN inside a ConvModule: ``<prefix>.bn.*`` (num_batches_tracked: a scalar)."""
    return {f"{prefix}.bn.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.bn.num_batches_tracked": ()
    }


def official_mit(dims=MIT_B0["dims"], depths=MIT_B0["depths"], sr=MIT_B0["sr"], mlp=4) -> dict:
    """MixVisionTransformer's state dict shapes (OverlapPatchEmbed, Block(Attention, Mlp(DWConv)), norms)."""
    keys: dict[str, tuple[int, ...]] = {}
    cin = 3
    for i, (d, n, r) in enumerate(zip(dims, depths, sr), start=1):
        k = 7 if i == 1 else 3
        keys |= {f"patch_embed{i}.proj.weight": (d, cin, k, k), f"patch_embed{i}.proj.bias": (d,)}
        keys |= {f"patch_embed{i}.norm.weight": (d,), f"patch_embed{i}.norm.bias": (d,)}
        for j in range(n):
            b = f"block{i}.{j}."
            keys |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,)}
            keys |= {b + "attn.q.weight": (d, d), b + "attn.q.bias": (d,)}
            keys |= {b + "attn.kv.weight": (2 * d, d), b + "attn.kv.bias": (2 * d,)}
            keys |= {b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)}
            if r > 1:
                keys |= {b + "attn.sr.weight": (d, d, r, r), b + "attn.sr.bias": (d,)}
                keys |= {b + "attn.norm.weight": (d,), b + "attn.norm.bias": (d,)}
            keys |= {b + "norm2.weight": (d,), b + "norm2.bias": (d,)}
            keys |= {b + "mlp.fc1.weight": (mlp * d, d), b + "mlp.fc1.bias": (mlp * d,)}
            keys |= {
                b + "mlp.dwconv.dwconv.weight": (mlp * d, 1, 3, 3),
                b + "mlp.dwconv.dwconv.bias": (mlp * d,),
            }
            keys |= {b + "mlp.fc2.weight": (d, mlp * d), b + "mlp.fc2.bias": (d,)}
        keys |= {f"norm{i}.weight": (d,), f"norm{i}.bias": (d,)}
        cin = d
    return keys


def official_daformer_head(
    embed: int, num_classes: int, dims=MIT_B0["dims"], dilations=(1, 6, 12, 18), fusion: str = "aspp"
) -> dict:
    """DAFormerHead: MLP embeddings (``embed_layers.<i>.proj``, a Linear), the fusion (separable ASPP
    without pooling + 3x3 bottleneck, or HRDA attention's 1x1 ConvModule) and ``conv_seg``."""
    keys: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate(dims):
        keys |= {f"embed_layers.{i}.proj.weight": (embed, c), f"embed_layers.{i}.proj.bias": (embed,)}
    fused = len(dims) * embed
    if fusion == "aspp":
        for i, d in enumerate(dilations):
            p = f"fuse_layer.aspp_modules.{i}"
            if d == 1:
                keys |= {f"{p}.conv.weight": (embed, fused, 1, 1), **_bn(p, embed)}
            else:
                keys |= {
                    f"{p}.depthwise_conv.conv.weight": (fused, 1, 3, 3),
                    **_bn(f"{p}.depthwise_conv", fused),
                }
                keys |= {
                    f"{p}.pointwise_conv.conv.weight": (embed, fused, 1, 1),
                    **_bn(f"{p}.pointwise_conv", embed),
                }
        keys |= {"fuse_layer.bottleneck.conv.weight": (embed, len(dilations) * embed, 3, 3)}
        keys |= _bn("fuse_layer.bottleneck", embed)
    else:
        keys |= {"fuse_layer.conv.weight": (embed, fused, 1, 1), **_bn("fuse_layer", embed)}
    keys |= {"conv_seg.weight": (num_classes, embed, 1, 1), "conv_seg.bias": (num_classes,)}
    return keys


def tensors(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g)
        for k, s in shapes.items()
    }


def daformer_segmentor(embed: int, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    shapes = {f"backbone.{k}": s for k, s in official_mit().items()}
    shapes |= {f"decode_head.{k}": s for k, s in official_daformer_head(embed, num_classes).items()}
    return tensors(shapes, seed)


def hrda_segmentor(embed: int, att_embed: int, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    shapes = {f"backbone.{k}": s for k, s in official_mit().items()}
    shapes |= {f"decode_head.head.{k}": s for k, s in official_daformer_head(embed, num_classes).items()}
    att = official_daformer_head(att_embed, num_classes, fusion="conv")
    shapes |= {f"decode_head.scale_attention.{k}": s for k, s in att.items()}
    return tensors(shapes, seed)


def official_file(
    path: Path, student: dict, teacher: dict | None, imnet: dict | None = None, classes=None, extra=None
) -> Path:
    """An mmcv runner checkpoint of the official DACS wrapper: ``model.*``, ``ema_model.*``,
    ``imnet_model.*``."""
    state = {f"model.{k}": v for k, v in student.items()}
    state |= {f"ema_model.{k}": v for k, v in (teacher or {}).items()}
    state |= {f"imnet_model.{k}": v for k, v in (imnet or {}).items()}
    state |= extra or {}
    meta = {"iter": 40000, "mmcv_version": "1.3.7", "config": "uda = dict(type='DACS', ...)"}
    if classes is not None:
        meta["CLASSES"] = tuple(classes)
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def test_daformer_checkpoint_converts_and_evaluates(tmp_path: Path, make_cfg) -> None:
    """MIC(DAFormer) on the embedded default (mit_b0, 8 classes, the recipe's 64-channel head): every
    official tensor lands where it should, and ``evaluate`` runs on the converted file."""
    student, teacher = daformer_segmentor(64, 8, seed=0), daformer_segmentor(64, 8, seed=1)
    src = official_file(tmp_path / "official.pth", student, teacher, classes=SYNTHETIC)
    summary = convert(src, tmp_path / "ours.ckpt", "synthetic_seg_table")
    model = load_module(tmp_path / "ours.ckpt")
    sd = model.state_dict()
    assert summary["tensors"]["student"] == len([k for k in sd if k.startswith("student.")]) == len(student)
    assert summary["step"] == 40000 and summary["data"] == "synthetic_seg"
    # the Linear embeddings become 1x1 convs; ASPP branches / ConvModules / classifier by name
    w = student["decode_head.embed_layers.2.proj.weight"]
    assert torch.equal(sd["student.head.embed.2.weight"], w[:, :, None, None])
    pairs = {
        "backbone.block3.1.attn.kv.weight": "encoder.block3.1.attn.kv.weight",
        "decode_head.fuse_layer.aspp_modules.0.conv.weight": "head.fusion.branches.0.0.weight",
        "decode_head.fuse_layer.aspp_modules.2.depthwise_conv.bn.running_var": (
            "head.fusion.branches.2.depthwise.1.running_var"
        ),
        "decode_head.fuse_layer.aspp_modules.3.pointwise_conv.conv.weight": (
            "head.fusion.branches.3.pointwise.0.weight"
        ),
        "decode_head.fuse_layer.bottleneck.bn.weight": "head.fusion.bottleneck.1.weight",
        "decode_head.conv_seg.bias": "head.classifier.bias",
    }
    for official, ours in pairs.items():
        assert torch.equal(sd[f"student.{ours}"], student[official]), official
        assert torch.equal(sd[f"teacher.{ours}"], teacher[official]), official
    assert int(sd["student.head.fusion.bottleneck.1.num_batches_tracked"]) == 7

    ecfg = make_cfg(
        [
            f"ckpt_path={tmp_path / 'ours.ckpt'}",
            "data.size=32",
            "data.datamodule.val.num_images=2",
            "data.datamodule.val_batch_size=2",
            "trainer=cpu",
            "+trainer.enable_progress_bar=false",
        ],
        config_name="eval",
        out=tmp_path / "eval",
    )
    metrics = evaluate(ecfg)
    assert 0.0 <= metrics["test/mIoU"] <= 100.0 and "test/teacher/mIoU" in metrics


def test_mic_daformer_gta2cs_fills_the_feature_distance_reference(tmp_path: Path) -> None:
    """The official MIC(DAFormer) GTA->CS run has FD: ``imnet_model.backbone.*`` is FD's frozen encoder,
    its decode head is dropped (FD compares encoder features only)."""
    student, teacher, imnet = (daformer_segmentor(256, 19, seed=s) for s in (0, 1, 2))
    src = official_file(tmp_path / "mic.pth", student, teacher, imnet, classes=CITYSCAPES)
    summary = convert(src, tmp_path / "ours.ckpt", "mic_daformer_gta2cs", ["backbone=mit_b0"])
    assert summary["data"] == "gta2cs"
    assert sorted(summary["dropped"]) == sorted(
        f"imnet_model.{k}" for k in imnet if k.startswith("decode_head.")
    )
    model = load_module(tmp_path / "ours.ckpt")
    fd = next(m for m in model.modules() if isinstance(m, ImageNetFeatureDistance)).imagenet.state_dict()
    assert torch.equal(fd["encoder.patch_embed1.proj.weight"], imnet["backbone.patch_embed1.proj.weight"])
    assert torch.equal(fd["encoder.block4.1.mlp.fc2.bias"], imnet["backbone.block4.1.mlp.fc2.bias"])
    assert summary["tensors"]["fd"] == len(official_mit()) == len(fd)


def test_mic_hrda_checkpoint_converts(tmp_path: Path) -> None:
    """MIC(HRDA) (the released official checkpoints): ``decode_head.head.*`` = the shared DAFormer head,
    ``decode_head.scale_attention.*`` = the attention head with its 1x1 ConvModule fusion."""
    student, teacher, imnet = (hrda_segmentor(256, 256, 19, seed=s) for s in (0, 1, 2))
    src = official_file(tmp_path / "hrda.pth", student, teacher, imnet, classes=CITYSCAPES)
    summary = convert(src, tmp_path / "ours.ckpt", "mic_hrda_gta2cs", ["backbone=hrda_mit_b0"])
    sd = load_module(tmp_path / "ours.ckpt").state_dict()
    pairs = {
        "backbone.norm4.weight": "base.encoder.norm4.weight",
        "decode_head.head.fuse_layer.bottleneck.conv.weight": "base.head.fusion.bottleneck.0.weight",
        "decode_head.scale_attention.fuse_layer.conv.weight": "attention_head.fusion.0.weight",
        "decode_head.scale_attention.fuse_layer.bn.running_mean": "attention_head.fusion.1.running_mean",
        "decode_head.scale_attention.conv_seg.weight": "attention_head.classifier.weight",
    }
    for official, ours in pairs.items():
        assert torch.equal(sd[f"student.{ours}"], student[official]), official
        assert torch.equal(sd[f"teacher.{ours}"], teacher[official]), official
    w = student["decode_head.scale_attention.embed_layers.0.proj.weight"]
    assert torch.equal(sd["student.attention_head.embed.0.weight"], w[:, :, None, None])
    assert summary["tensors"]["student"] == len(student)


def test_unmapped_missing_and_mismatched_keys_are_listed(tmp_path: Path) -> None:
    student, teacher = daformer_segmentor(64, 8, seed=0), daformer_segmentor(64, 8, seed=1)
    del teacher["decode_head.conv_seg.bias"]
    extra = {
        "model.decode_head.extra.weight": torch.zeros(3),
        "mic.teacher.ema_model.backbone.x": torch.zeros(1),
    }
    src = official_file(tmp_path / "bad.pth", student, teacher, extra=extra)
    with pytest.raises(ValueError) as err:
        convert(src, tmp_path / "x.ckpt", "synthetic_seg_table")
    msg = str(err.value)
    assert "model.decode_head.extra.weight (no rule in NETWORK_MAPS['daformer'])" in msg
    assert "mic.teacher.ema_model.backbone.x (not model./ema_model./imnet_model.)" in msg
    assert "1 keys of ours not filled: teacher.head.classifier.bias" in msg
    assert not (tmp_path / "x.ckpt").exists()

    wrong = daformer_segmentor(64, 19, seed=0)  # a Cityscapes head into an 8-class preset
    src = official_file(tmp_path / "cs.pth", wrong, daformer_segmentor(64, 19, seed=1))
    with pytest.raises(
        ValueError, match=r"student.head.classifier.weight: official \(19, 64, 1, 1\) vs ours \(8, 64, 1, 1\)"
    ):
        convert(src, tmp_path / "x.ckpt", "synthetic_seg_table")

    src = official_file(tmp_path / "so.pth", student, None)  # a source-only run: no teacher
    with pytest.raises(ValueError, match="no ema_model"):
        convert(src, tmp_path / "x.ckpt", "synthetic_seg_table")

    src = official_file(
        tmp_path / "cls.pth",
        student,
        teacher | {"decode_head.conv_seg.bias": torch.zeros(8)},
        classes=CITYSCAPES[:8],
    )
    with pytest.raises(ValueError, match="was trained on the classes"):
        convert(src, tmp_path / "x.ckpt", "synthetic_seg_table")


def test_cli_reports_errors_in_one_line_and_success_with_the_evaluate_command(tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    assert main([str(text), "--to", str(tmp_path / "o.ckpt"), "--preset", "synthetic_seg_table"]) == 1
    assert "is not a PyTorch checkpoint file" in capsys.readouterr().err
    src = official_file(tmp_path / "ok.pth", daformer_segmentor(64, 8, 0), daformer_segmentor(64, 8, 1))
    # overrides after the options, as in the README
    argv = [str(src), "--to", str(tmp_path / "o.ckpt"), "--preset", "synthetic_seg_table", "seed=3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"python -m mic_uda.evaluate ckpt_path={tmp_path / 'o.ckpt'} data=synthetic_seg" in out
    assert load_module(tmp_path / "o.ckpt").hparams.seed == 3
