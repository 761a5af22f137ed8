"""HRDA (Hoyer et al., ECCV 2022): a low-resolution context pass and a high-resolution detail crop
through one shared network, fused by a learned class-wise scale attention.

It wraps any :class:`~mic_uda.models.seg_base.EncoderHeadSegNet` (DAFormer, DeepLabV2) and answers
the network seam (``mic_uda.models.seg_base``) with HRDA's own answers, so DACS, MIC, FD and every
later term train HRDA without knowing it exists:

* ``train_loss``: LR = the whole training crop resized by ``scales[0]``; HR = a random
  ``hr_crop_size`` crop of it (offsets multiples of ``crop_divisible``, re-drawn at every call, one box
  per batch); attention from the LR features, zero outside the crop box; fused = att * HR (pasted at
  the box) + up((1 - att) * LR); loss = (1 - w_hr - w_lr) CE(fused) + w_hr CE(HR, label and weight
  cropped to the box) (+ w_lr CE(LR)). Views: ``context`` = the LR pass (FD), ``detail`` = the HR crop
  with its cropped label (pixel-level terms).
* ``forward`` (pseudo-labels, a training-sized image): LR pass + HR by sliding ``hr_crop_size``
  windows with half-window stride (overlaps averaged), fused without the crop mask.
* ``predict`` (evaluation): ``forward`` over outer sliding windows (``test_crop_size`` /
  ``test_stride``), batched or one by one, averaged; ``forward`` on the whole image without them.

Facts from lhoyer/HRDA ``mmseg/models/segmentors/hrda_encoder_decoder.py`` (get_crop_bbox :14-26,
extract_slide_feat :94-121, _forward_train_features :165-190), ``decode_heads/hrda_head.py``
(decode_hr :107-135, forward :144-207, losses :233-273) and ``encoder_decoder.py`` slide_inference.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from mic_uda.models.seg_base import EncoderHeadSegNet, FeatureView, SegNetwork, SegTrainOutput
from mic_uda.uda.losses import weighted_cross_entropy

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2), end-exclusive


INFERENCE_SCALES = ("fused", "lr", "hr")


def draw_crop_box(
    height: int, width: int, crop: Sequence[int], divisible: int, generator: torch.Generator | None = None
) -> Box:
    """A random ``crop`` box whose offsets are multiples of ``divisible`` (HRDA's get_crop_bbox: the
    offset is ``randint(0, (margin + 1) // divisible) * divisible``, so the box always fits)."""
    ch, cw = int(crop[0]), int(crop[1])
    if ch > height or cw > width:
        raise ValueError(f"model.hr_crop_size {ch}x{cw} is larger than the training image {height}x{width}")
    if (ch, cw) == (height, width):
        return 0, height, 0, width
    dy = max((height - ch + 1) // divisible, 1)
    dx = max((width - cw + 1) // divisible, 1)
    y1 = int(torch.randint(0, dy, (), generator=generator)) * divisible
    x1 = int(torch.randint(0, dx, (), generator=generator)) * divisible
    return y1, y1 + ch, x1, x1 + cw


def scale_box(box: Box, stride: float) -> Box:
    """A box in image pixels -> in the cells of a map with that ``stride`` (truncated, as official)."""
    return tuple(int(v / stride) for v in box)  # type: ignore[return-value]


def crop_box(x: Tensor, box: Box) -> Tensor:
    """``x[..., y1:y2, x1:x2]`` for images (B, C, H, W) and labels/weights (B, H, W)."""
    y1, y2, x1, x2 = box
    return x[..., y1:y2, x1:x2]


def slide_boxes(height: int, width: int, crop: Sequence[int], stride: Sequence[int]) -> list[Box]:
    """mmseg's sliding-window grid: rows/columns ``max(H - crop + stride - 1, 0) // stride + 1``, the
    last window shifted back to end at the border, a window larger than the image clipped to it."""
    ch, cw = int(crop[0]), int(crop[1])
    sh, sw = int(stride[0]), int(stride[1])
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def paste_average(pieces: Sequence[Tensor], boxes: Sequence[Box], size: Sequence[int]) -> Tensor:
    """Each (B, C, h, w) piece added into a zero (B, C, *size) canvas at its box, divided by the number
    of pieces covering each cell (every cell must be covered)."""
    b, c = pieces[0].shape[:2]
    canvas = pieces[0].new_zeros(b, c, int(size[0]), int(size[1]))
    count = pieces[0].new_zeros(1, 1, int(size[0]), int(size[1]))
    for piece, (y1, y2, x1, x2) in zip(pieces, boxes):
        canvas[:, :, y1:y2, x1:x2] += piece
        count[:, :, y1:y2, x1:x2] += 1
    if bool((count == 0).any()):
        raise RuntimeError("sliding windows leave cells uncovered")
    return canvas / count


def fuse_scales(lr_logits: Tensor, hr_logits: Tensor, attention: Tensor | float, ratio: float) -> Tensor:
    """``att * HR + up((1 - att) * LR)`` with ``att`` and ``(1 - att) * LR`` upsampled by ``ratio``
    (HR / LR scale) bilinearly; ``hr_logits`` is already on the fused canvas (pasted where it is
    known, zero elsewhere, where ``att`` must be zero). Where ``ratio`` does not land on the canvas
    (image sides that are no multiple of the stride) the upsampling goes to the canvas size."""

    def up(x: Tensor) -> Tensor:
        out = F.interpolate(x, scale_factor=ratio, mode="bilinear", align_corners=False)
        if out.shape[-2:] != hr_logits.shape[-2:]:
            out = F.interpolate(x, size=hr_logits.shape[-2:], mode="bilinear", align_corners=False)
        return out

    lr = up((1 - attention) * lr_logits)
    return (up(attention) if torch.is_tensor(attention) else attention) * hr_logits + lr


def _resize(x: Tensor, scale: float) -> Tensor:
    """mmseg's ``resize(scale_factor=s)`` (bilinear, align_corners=False); identity at 1."""
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


class HRDANet(SegNetwork):
    """HRDA around ``base`` (a network config: ``_target_`` + its arguments, built with ``num_classes``).

    ``scales``: (LR, HR) input scales, HR must be 1 (the detail crop is cut from the training image);
    ``hr_crop_size``: (h, w) of the detail crop and of the HR sliding windows; ``crop_divisible``: the
    crop offsets' multiple (8 = LR stride of DAFormer at scale 0.5: fusion cells align);
    ``hr_loss_weight`` / ``lr_loss_weight``: the detail / context-only loss weights;
    ``attention_classwise``: one attention channel per class (else one); ``fixed_attention``: a
    constant instead of the learned attention; ``attention_embed_dim``: embedding width of the DAFormer
    attention head (256 official); ``hr_slide_inference``: HR by sliding windows in ``forward`` (else one
    full-image HR pass); ``hr_slide_overlapping``: half-window stride (else non-overlapping);
    ``test_crop_size`` / ``test_stride``: the outer windows of ``predict`` (None: the whole image);
    ``batched_slide``: outer windows in one batch (fast) or one by one (less memory; HRDA #27).
    """

    def __init__(
        self,
        num_classes: int,
        base: Mapping[str, Any],
        scales: Sequence[float] = (0.5, 1.0),
        hr_crop_size: Sequence[int] = (512, 512),
        crop_divisible: int = 8,
        hr_loss_weight: float = 0.1,
        lr_loss_weight: float = 0.0,
        attention_classwise: bool = True,
        attention_embed_dim: int = 256,
        fixed_attention: float | None = None,
        hr_slide_inference: bool = True,
        hr_slide_overlapping: bool = True,
        test_crop_size: Sequence[int] | None = None,
        test_stride: Sequence[int] | None = None,
        batched_slide: bool = True,
        **base_overrides: Any,
    ) -> None:
        """``base_overrides``: keys HRDA does not know go to the wrapped network (so a recipe's
        ``backbone.embed_dim=64`` means the same with and without HRDA)."""
        super().__init__()
        base_cfg = {**dict(base), **base_overrides}
        base_cfg.pop("weights", None)  # the wrapper's backbone.weights (default: this one) is loaded
        self.base: EncoderHeadSegNet = instantiate(base_cfg, num_classes=num_classes)
        if not isinstance(self.base, EncoderHeadSegNet):
            raise TypeError(
                f"backbone.base builds a {type(self.base).__name__}: HRDA wraps an encoder + head network "
                "(DAFormerNet, DeepLabV2Net)"
            )
        lr_scale, hr_scale = sorted(float(s) for s in scales)
        if len(scales) != 2 or hr_scale != 1.0 or not 0 < lr_scale < 1:
            raise ValueError(f"backbone.scales {list(scales)}: expected [LR, 1.0] with 0 < LR < 1")
        if not 0 <= hr_loss_weight + lr_loss_weight < 1:
            raise ValueError("backbone.hr_loss_weight + backbone.lr_loss_weight must lie in [0, 1)")
        if (test_crop_size is None) != (test_stride is None):
            raise ValueError("backbone.test_crop_size and backbone.test_stride are set together (or neither)")
        self.num_classes = int(num_classes)
        self.lr_scale = lr_scale
        self.hr_crop_size = (int(hr_crop_size[0]), int(hr_crop_size[1]))
        self.crop_divisible = int(crop_divisible)
        self.hr_loss_weight, self.lr_loss_weight = float(hr_loss_weight), float(lr_loss_weight)
        self.fixed_attention = None if fixed_attention is None else float(fixed_attention)
        self.attention_head: nn.Module | None = None
        if self.fixed_attention is None:
            channels = num_classes if attention_classwise else 1
            self.attention_head = self.base.make_head(channels, attention=True, embed_dim=attention_embed_dim)
        self.hr_slide_inference, self.hr_slide_overlapping = (
            bool(hr_slide_inference),
            bool(hr_slide_overlapping),
        )
        self.test_crop_size = None if test_crop_size is None else tuple(int(v) for v in test_crop_size)
        self.test_stride = None if test_stride is None else tuple(int(v) for v in test_stride)
        self.batched_slide = bool(batched_slide)
        self.inference_scale = "fused"

    def set_inference_scale(self, scale: str) -> None:
        """Evaluate with the fused prediction (``fused``) or one branch alone: ``lr`` (attention 0: the
        context only) or ``hr`` (attention 1: the sliding HR windows only): which scale does the work
        (the HRDA paper's LR-only / HR-only comparison); set by ``mic_uda.evaluate hrda_scale=...``."""
        if scale not in INFERENCE_SCALES:
            raise ValueError(f"hrda_scale={scale!r} is not one of {list(INFERENCE_SCALES)}")
        self.inference_scale = scale

    # ----------------------------------------------------------------- the seam's other members
    @property
    def feature_network(self) -> nn.Module:
        return self.base

    @property
    def mean(self) -> Tensor:
        """The base network's normalisation mean (MIC fills masked pixels with it)."""
        return self.base.mean

    def load_encoder_weights(self, path: str | os.PathLike) -> None:
        self.base.load_encoder_weights(path)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        return self.base.forward_features(x)

    # ----------------------------------------------------------------- building blocks
    def _attention(self, lr_features: Sequence[Tensor]) -> Tensor | float:
        if self.attention_head is None:
            return self.fixed_attention  # type: ignore[return-value]
        return torch.sigmoid(self.attention_head(lr_features))

    def _hr_stride(self, image_size: int, logits_size: int) -> float:
        return image_size / logits_size

    def hr_slide_logits(self, x: Tensor) -> Tensor:
        """HR logits of a whole image from ``hr_crop_size`` windows (one batched encoder pass),
        averaged where they overlap, on the canvas of the head's stride."""
        crop = self.hr_crop_size
        stride = (crop[0] // 2, crop[1] // 2) if self.hr_slide_overlapping else crop
        boxes = slide_boxes(*x.shape[-2:], crop, stride)
        b = x.shape[0]
        windows = torch.cat([crop_box(x, box) for box in boxes])
        logits = self.base.decode(self.base.forward_features(windows))
        os_ = self._hr_stride(windows.shape[-2], logits.shape[-2])
        cells = [scale_box(box, os_) for box in boxes]
        size = (max(c[1] for c in cells), max(c[3] for c in cells))
        pieces = [logits[i * b : (i + 1) * b] for i in range(len(boxes))]
        return paste_average(pieces, cells, size)

    def forward(self, x: Tensor) -> Tensor:
        """Fused logits at ``x``'s size: LR context + HR detail over the whole image (no crop mask)."""
        return self.forward_with_features(x)[0]

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """:meth:`forward`'s fused logits at ``x``'s size and the stage features of its **LR context**
        pass (the image resized by ``lr_scale``, so each stage's stride relative to ``x`` is the base
        network's divided by ``lr_scale``: 8, 16, 32, 64 for MiT at 0.5). Terms that ask for the
        features of a whole image (PiPa's patch contrast, RCCR, IR2F) get the context; the detail
        crop's features of a training pass are ``train_loss(..., with_views=True).views["detail"]``."""
        lr_img = _resize(x, self.lr_scale)
        lr_features = self.base.forward_features(lr_img)
        lr_logits = self.base.decode(lr_features)
        if self.hr_slide_inference:
            hr_logits = self.hr_slide_logits(x)
        else:
            hr_logits = self.base.decode(self.base.forward_features(x))
        attention = {"lr": 0.0, "hr": 1.0}.get(self.inference_scale)  # None: fused (the default)
        if attention is None:
            attention = self._attention(lr_features)
        fused = fuse_scales(lr_logits, hr_logits, attention, 1 / self.lr_scale)
        fused = F.interpolate(fused, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return fused, list(lr_features)

    def predict(self, x: Tensor) -> Tensor:
        """``forward`` over the outer sliding windows (``test_crop_size``), averaged at full resolution."""
        if self.test_crop_size is None:
            return self(x)
        assert self.test_stride is not None
        boxes = slide_boxes(*x.shape[-2:], self.test_crop_size, self.test_stride)
        b = x.shape[0]
        if self.batched_slide and len({(y2 - y1, x2 - x1) for y1, y2, x1, x2 in boxes}) == 1:
            logits = self(torch.cat([crop_box(x, box) for box in boxes]))
            pieces = [logits[i * b : (i + 1) * b] for i in range(len(boxes))]
        else:
            pieces = [self(crop_box(x, box)) for box in boxes]
        return paste_average(pieces, boxes, x.shape[-2:])

    # ----------------------------------------------------------------- training
    def train_loss(
        self,
        images: Tensor,
        labels: Tensor,
        weight: Tensor | None = None,
        *,
        ignore_index: int = 255,
        generator: torch.Generator | None = None,
        with_views: bool = False,
    ) -> SegTrainOutput:
        """HRDA's multi-resolution loss of one (image, label, weight) batch; a fresh detail box."""
        box = draw_crop_box(*images.shape[-2:], self.hr_crop_size, self.crop_divisible, generator)
        p = self.train_forward(images, box)
        fused, hr_logits, lr_logits, attention = p["fused"], p["hr_logits"], p["lr_logits"], p["attention"]
        fused_w = 1 - self.hr_loss_weight - self.lr_loss_weight
        loss = fused_w * self._ce(fused, labels, weight, ignore_index)
        hr_labels, hr_weight = crop_box(labels, box), None if weight is None else crop_box(weight, box)
        if self.hr_loss_weight > 0:
            loss = loss + self.hr_loss_weight * self._ce(hr_logits, hr_labels, hr_weight, ignore_index)
        if self.lr_loss_weight > 0:
            # on the LR logits themselves (the official code passes them after the (1 - att) scaling;
            # its default weight is 0, where the two agree)
            loss = loss + self.lr_loss_weight * self._ce(lr_logits, labels, weight, ignore_index)
        logs = {}
        if torch.is_tensor(attention):
            # the mean attention inside the detail crop: how much the fused prediction trusts HR
            inside = attention.sum() / (p["mask"].sum().clamp_min(1) * attention.shape[1])
            logs["train/hrda_attention"] = inside.detach()
        views = {}
        if with_views:
            views = {
                "context": FeatureView(p["lr_image"], p["lr_features"], labels, weight),
                "detail": FeatureView(p["hr_image"], p["hr_features"], hr_labels, hr_weight),
            }
        return SegTrainOutput(loss, logs, views)

    def train_forward(self, images: Tensor, box: Box) -> dict[str, Any]:
        """The training pass for a given detail ``box`` (image pixels): LR and HR images, features and
        logits (at the head's stride), the attention masked to the box, and the fused logits on the
        canvas of the HR stride over the whole image."""
        lr_img = _resize(images, self.lr_scale)
        hr_img = crop_box(images, box)
        lr_features = self.base.forward_features(lr_img)
        hr_features = self.base.forward_features(hr_img)
        lr_logits = self.base.decode(lr_features)
        hr_logits = self.base.decode(hr_features)
        os_ = self._hr_stride(hr_img.shape[-2], hr_logits.shape[-2])
        ratio = 1 / self.lr_scale
        # training: the attention is zero outside the detail crop, where the fusion is pure LR
        mask = lr_logits.new_zeros(lr_logits.shape[0], 1, *lr_logits.shape[-2:])
        y1, y2, x1, x2 = scale_box(box, os_ * ratio)
        mask[:, :, y1:y2, x1:x2] = 1
        attention = self._attention(lr_features) * mask
        canvas = (round(lr_logits.shape[-2] * ratio), round(lr_logits.shape[-1] * ratio))
        hr_pasted = hr_logits.new_zeros(*hr_logits.shape[:2], *canvas)
        cy1, cy2, cx1, cx2 = scale_box(box, os_)
        hr_pasted[:, :, cy1:cy2, cx1:cx2] = hr_logits
        return {
            "lr_image": lr_img,
            "hr_image": hr_img,
            "lr_features": lr_features,
            "hr_features": hr_features,
            "lr_logits": lr_logits,
            "hr_logits": hr_logits,
            "mask": mask,
            "attention": attention,
            "fused": fuse_scales(lr_logits, hr_pasted, attention, ratio),
        }

    @staticmethod
    def _ce(logits: Tensor, labels: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
        """CE after resizing the logits to the label (mmseg's BaseDecodeHead.losses)."""
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return weighted_cross_entropy(logits, labels, weight, ignore_index)
