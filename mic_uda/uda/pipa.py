"""PiPa (SPEC 5): pixel contrast on the source and patch contrast on the target, as two loss terms.

Facts from the official code (chen742/PiPa at 71f60af; the HRDA version at the root, the DAFormer one
under ``PiPa_DAFormer/``); "official" below is what that code does, the defaults are SPEC 5's fixed
variant, and every official defect that is meaningful to reproduce is a named flag.

What the segmentation module passes each step
---------------------------------------------
:class:`PixelContrast` (``term(stages, labels, generator) -> (loss, logs)``), on the **source**
supervised pass only (the official ``stage == 1``, ``hrda_head.py:363``):

* ``stages``: the 4 encoder stage features (finest first, e.g. strides 4, 8, 16, 32 for MiT) of the
  image the segmentation head saw, with gradient: ``SegTrainOutput.views["detail"].stages`` (HRDA: the
  detail crop; a single-scale network: its one pass);
* ``labels``: ``(B, H, W)`` labels of that same field of view (``views["detail"].labels``; HRDA's label
  cropped to the detail box). Passing the uncropped label instead reproduces the official HRDA defect
  (``hrda_head.py:365`` pairs the whole 1024 label with the 512 crop's features);
* ``generator``: the module's generator (anchor draws).

:class:`PatchContrast` (``term(images, student_fn, teacher_fn, step, generator, augment) -> (loss,
logs)``), on the **target** batch of the UDA loader (not the official separate, unshuffled loader):

* ``images``: ``(B, 3, H, W)`` target images in [0, 1] (``batch["target"]["image"]``);
* ``student_fn`` / ``teacher_fn``: ``images -> (logits, stages)`` of the student (with gradient) and
  of the EMA teacher (called under ``no_grad`` here): ``network.forward_with_features``. Stages as
  above (any strides that are integer multiples/fractions of ``feature_stride``); logits at any
  resolution that is a multiple of the ``feature_stride`` grid (e.g. the image's);
* ``step``: the global step (the term is off before ``start``; :meth:`PatchContrast.active`);
* ``generator``: crops, flips, bank draws; ``augment``: optional ``(images, generator) -> images``
  photometric augmentation of each crop (the seg module's strong augmentation).

Parameter names contain ``head`` (``proj_head``, ``cls_head``) so the seg recipe's ``head: lr_mult 10``
key gives them the 10x learning rate, as the official ``paramwise_cfg`` does for its ``proj_head`` /
``cls_head`` (``configs/pipa/gtaHR2csHR_hrda.py:65-69``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mic_uda.uda.contrastive import (
    PIXEL_DENOMINATORS,
    FeatureQueue,
    info_nce,
    masked_mean,
    nearest_labels,
    pixel_contrast_loss,
    probabilities_on_grid,
    random_subset,
)

#: ``images -> (logits, stage features)``: what a network's ``forward_with_features`` answers
ForwardFn = Callable[[Tensor], tuple[Tensor, Sequence[Tensor]]]
#: ``(images, generator) -> images``: a photometric augmentation
AugmentFn = Callable[[Tensor, torch.Generator], Tensor]

PATCH_FEATURES = ("stages", "logits")


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """An integer uniform in ``[low, high]`` (inclusive) from ``generator``."""
    return low + int(torch.randint(high - low + 1, (), generator=generator, device=generator.device))


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, device=generator.device))


# --------------------------------------------------------------------------------------------- pixel


@dataclass
class AnchorSample:
    """Anchors of one batch: ``A`` groups (one image x one class) of ``n_view`` pixels each.

    ``index``: ``(A, n_view)`` flat pixel indices into the image's ``h * w`` grid, the hard ones
    first; ``num_hard``: ``(A,)`` how many of each group are hard (label ``c``, predicted not ``c``).
    """

    image: Tensor
    label: Tensor
    index: Tensor
    num_hard: Tensor
    n_view: int


def sample_anchors(
    labels: Tensor,
    predict: Tensor,
    generator: torch.Generator,
    max_samples: int = 1024,
    max_views: int = 100,
    min_pixels: int = 100,
    ignore_label: int = 255,
) -> AnchorSample | None:
    """PiPa's hard/easy anchor sampling (``hrda_head.py:42-101``) on flat ``(B, N)`` labels/predictions.

    Per image, the classes other than ``ignore_label`` with more than ``min_pixels`` pixels (official:
    ``> max_views``); ``n_view = min(max_samples // total, max_views)`` with ``total`` the number of
    (image, class) groups **in the batch**. Per group ``n_view // 2`` hard and the rest easy when both
    suffice, else all of the scarce kind and the rest from the other. ``None`` when no group qualifies.
    """
    if min_pixels < max_views:
        raise ValueError(
            f"sample_anchors: min_pixels ({min_pixels}) < max_views ({max_views}) could leave groups that "
            "cannot fill n_view views"
        )
    groups: list[tuple[int, int]] = []
    for b in range(labels.shape[0]):
        classes, counts = torch.unique(labels[b], return_counts=True)
        groups += [
            (b, int(c))
            for c, n in zip(classes.tolist(), counts.tolist())
            if c != ignore_label and n > min_pixels
        ]
    if not groups:
        return None
    n_view = max(1, min(max_samples // len(groups), max_views))
    index, num_hard = [], []
    for b, c in groups:
        is_c = labels[b] == c
        hard = torch.nonzero(is_c & (predict[b] != c)).flatten()
        easy = torch.nonzero(is_c & (predict[b] == c)).flatten()
        n_h, n_e = hard.numel(), easy.numel()
        if n_h >= n_view / 2 and n_e >= n_view / 2:
            keep_h = n_view // 2
            keep_e = n_view - keep_h
        elif n_h >= n_view / 2:
            keep_e = n_e
            keep_h = n_view - keep_e
        else:  # n_e >= n_view / 2: guaranteed, as n_h + n_e > min_pixels >= n_view
            keep_h = n_h
            keep_e = n_view - keep_h
        hard = hard[random_subset(n_h, keep_h, generator, hard.device)]
        easy = easy[random_subset(n_e, keep_e, generator, easy.device)]
        index.append(torch.cat([hard, easy]))
        num_hard.append(keep_h)
    dev = labels.device
    return AnchorSample(
        image=torch.tensor([b for b, _ in groups], device=dev),
        label=torch.tensor([c for _, c in groups], device=dev),
        index=torch.stack(index),
        num_hard=torch.tensor(num_hard, device=dev),
        n_view=n_view,
    )


def fuse_stages(stages: Sequence[Tensor], align_corners: bool = True) -> Tensor:
    """The stages bilinearly resized to the first (finest) one and concatenated (``B x sum(C) x h x
    w``), as ``hrda_encoder_decoder.py:265-275`` (``align_corners=True`` there)."""
    size = stages[0].shape[-2:]
    return torch.cat(
        [stages[0]]
        + [F.interpolate(s, size=size, mode="bilinear", align_corners=align_corners) for s in stages[1:]],
        dim=1,
    )


class PixelContrast(nn.Module):
    """PiPa's pixel contrast on source images (SPEC 5), with its projection head and aux classifier.

    ``proj_head``: 1x1 conv C->C, BN, ReLU, 1x1 conv -> ``proj_dim`` (256), L2-normalised
    (``segmentors/projection.py:14-21``); ``cls_head``: 3x3 conv C->C + BN + ReLU, Dropout2d(0.1), 1x1
    conv -> ``num_classes`` without bias (``hrda_encoder_decoder.py:93-98``); ``C`` the sum of the
    stage channels (1024 for MiT-B5; the official code hard-codes 1024 and 19 classes). The loss is
    ``weight * pixel_contrast_loss`` (``weight = 0.1``, ``hrda_head.py:223,373``) plus, in the fixed
    variant, ``aux_weight * CE(cls_head)`` that trains the classifier whose predictions split the anchors
    into hard and easy.

    Official defects as flags:

    * ``official_ignore_minus_one``: the official ignore label is -1 (``hrda_head.py:37``) while labels
      use 255, so the void class becomes an anchor class whenever it has > 100 pixels. Default: 255 is
      never an anchor.
    * ``official_untrained_classifier``: the official ``cls_head`` only feeds an argmax
      (``hrda_head.py:371``) and never gets a loss, so "hard" means "a random head disagrees". Default:
      trained with CE on the (nearest-resized) labels.

    ``aux_detach`` (ours): the CE reaches only the classifier, so the encoder's objective is the
    segmentation loss plus the contrast, as in the paper; ``False`` lets it act as deep supervision.
    """

    def __init__(
        self,
        stage_channels: Sequence[int],
        num_classes: int,
        proj_dim: int = 256,
        weight: float = 0.1,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        max_samples: int = 1024,
        max_views: int = 100,
        min_pixels: int = 100,
        ignore_index: int = 255,
        aux_weight: float = 1.0,
        aux_detach: bool = True,
        dropout: float = 0.1,
        align_corners: bool = True,
        denominator: str = "official",
        official_ignore_minus_one: bool = False,
        official_untrained_classifier: bool = False,
    ) -> None:
        super().__init__()
        if denominator not in PIXEL_DENOMINATORS:
            raise ValueError(
                f"method.pipa.pixel.denominator={denominator!r} is not one of {PIXEL_DENOMINATORS}"
            )
        if min_pixels < max_views:
            raise ValueError(
                f"method.pipa.pixel: min_pixels ({min_pixels}) must be >= max_views ({max_views})"
            )
        c = int(sum(stage_channels))
        self.num_classes, self.weight = int(num_classes), float(weight)
        self.temperature, self.base_temperature = float(temperature), float(base_temperature)
        self.max_samples, self.max_views, self.min_pixels = int(max_samples), int(max_views), int(min_pixels)
        self.ignore_index = int(ignore_index)
        self.aux_weight, self.aux_detach = float(aux_weight), bool(aux_detach)
        self.align_corners, self.denominator = bool(align_corners), denominator
        self.official_ignore_minus_one = bool(official_ignore_minus_one)
        self.official_untrained_classifier = bool(official_untrained_classifier)
        self.proj_head = nn.Sequential(
            nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, proj_dim, 1)
        )
        self.cls_head = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(c, self.num_classes, 1, bias=False),
        )
        if self.official_untrained_classifier:
            self.cls_head.requires_grad_(False)  # official: in the optimiser, but never given a gradient

    @property
    def anchor_ignore_label(self) -> int:
        """The label never used as an anchor class: 255 (fixed) or the official -1."""
        return -1 if self.official_ignore_minus_one else self.ignore_index

    def forward(
        self, stages: Sequence[Tensor], labels: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``weight * contrast + aux_weight * aux CE`` and logs (see the module docstring)."""
        feats = fuse_stages(stages, self.align_corners)
        emb = F.normalize(self.proj_head(feats), p=2, dim=1)
        aux_logits = self.cls_head(feats.detach() if self.aux_detach else feats)
        b, _, h, w = emb.shape
        lbl = nearest_labels(labels, (h, w))
        predict = aux_logits.argmax(1)
        sample = sample_anchors(
            lbl.view(b, -1),
            predict.view(b, -1),
            generator,
            self.max_samples,
            self.max_views,
            self.min_pixels,
            self.anchor_ignore_label,
        )
        logs: dict[str, Tensor] = {}
        if sample is None:
            contrast = emb.sum() * 0.0
            logs["anchor_groups"] = emb.new_zeros(())
        else:
            flat = emb.permute(0, 2, 3, 1).reshape(b, h * w, -1)
            anchors = flat[sample.image[:, None], sample.index]  # (A, V, D)
            contrast = pixel_contrast_loss(
                anchors, sample.label, self.temperature, self.base_temperature, self.denominator
            )
            logs["anchor_groups"] = emb.new_tensor(float(sample.label.numel()))
            logs["n_view"] = emb.new_tensor(float(sample.n_view))
            logs["hard_share"] = sample.num_hard.float().mean() / sample.n_view
        loss = self.weight * contrast
        logs["contrast"] = contrast.detach()
        if not self.official_untrained_classifier and self.aux_weight > 0:
            aux = F.cross_entropy(aux_logits.float(), lbl, ignore_index=self.ignore_index)
            if not bool((lbl != self.ignore_index).any()):
                aux = aux_logits.sum() * 0.0  # an all-void label: 0, not NaN
            loss = loss + self.aux_weight * aux
            logs["aux_ce"] = aux.detach()
        return loss, logs


# --------------------------------------------------------------------------------------------- patch


@dataclass(frozen=True)
class CropPair:
    """Two crops of one image: top-left corners (pixels) and whether each is flipped horizontally."""

    top1: int
    left1: int
    top2: int
    left2: int
    flip1: bool = False
    flip2: bool = False


def crop_iou(dy: int, dx: int, crop_h: int, crop_w: int) -> float:
    """IoU of two ``crop_h x crop_w`` boxes offset by ``(dy, dx)`` (0 when they do not overlap)."""
    ih, iw = crop_h - abs(dy), crop_w - abs(dx)
    if ih <= 0 or iw <= 0:
        return 0.0
    inter = ih * iw
    return inter / (2 * crop_h * crop_w - inter)


def sample_crop_pair(
    height: int,
    width: int,
    crop_h: int,
    crop_w: int,
    offset_step: int,
    iou_range: tuple[float, float],
    generator: torch.Generator,
    max_tries: int = 50,
    flip_p: float = 0.5,
) -> CropPair:
    """Two overlapping crops as the official pair loader (CAC's, ``dataloaders/city.py:102-131,170-181``):
    the first anywhere, the second offset from it by a multiple of ``offset_step`` (the feature stride,
    so the shared region falls on whole feature cells of both), redrawn until the IoU is in
    ``iou_range`` (official ``[0.1, 1.0]``), identical after ``max_tries`` failures (official 50); each
    crop flipped with probability ``flip_p``."""
    if crop_h > height or crop_w > width:
        raise ValueError(f"sample_crop_pair: crop {crop_h}x{crop_w} larger than the image {height}x{width}")
    top1, left1 = _randint(0, height - crop_h, generator), _randint(0, width - crop_w, generator)
    top2, left2 = top1, left1
    for _ in range(max_tries):
        ky = _randint(-(top1 // offset_step), (height - crop_h - top1) // offset_step, generator)
        kx = _randint(-(left1 // offset_step), (width - crop_w - left1) // offset_step, generator)
        iou = crop_iou(ky * offset_step, kx * offset_step, crop_h, crop_w)
        if iou_range[0] <= iou <= iou_range[1]:
            top2, left2 = top1 + ky * offset_step, left1 + kx * offset_step
            break
    flip1, flip2 = _uniform(generator) < flip_p, _uniform(generator) < flip_p
    return CropPair(top1, left1, top2, left2, flip1, flip2)


def overlap_slices(
    pair: CropPair, crop_h: int, crop_w: int, divisor: int
) -> tuple[slice, slice, slice, slice]:
    """The shared region in each crop's **unflipped** cell coordinates: ``(rows1, cols1, rows2, cols2)``.

    In crop-1 pixels it is ``[max(0, dy), crop + min(0, dy))`` with ``dy = top2 - top1`` (crop 2: the
    same with ``-dy``); cells are pixels ``// divisor``, which is exact when ``divisor`` is the stride
    of the feature grid and divides ``dy`` and the crop side. The official HRDA version divides by 8
    while its features are on a stride-2 grid (``mmseg/models/uda/dacs.py:479,520-534``): the
    ``official_box_divisor`` flag of :class:`PatchContrast`.
    """
    dy, dx = pair.top2 - pair.top1, pair.left2 - pair.left1

    def span(d: int, side: int) -> tuple[slice, slice]:
        lo1, hi1 = max(0, d), side + min(0, d)
        lo2, hi2 = max(0, -d), side + min(0, -d)
        return slice(lo1 // divisor, hi1 // divisor), slice(lo2 // divisor, hi2 // divisor)

    r1, r2 = span(dy, crop_h)
    c1, c2 = span(dx, crop_w)
    return r1, c1, r2, c2


def crop_images(images: Tensor, pairs: Sequence[CropPair], crop_h: int, crop_w: int) -> tuple[Tensor, Tensor]:
    """The two crops of every image (``(B, C, crop_h, crop_w)`` each), flipped where the pair says."""
    first, second = [], []
    for img, p in zip(images, pairs):
        a = img[:, p.top1 : p.top1 + crop_h, p.left1 : p.left1 + crop_w]
        b = img[:, p.top2 : p.top2 + crop_h, p.left2 : p.left2 + crop_w]
        first.append(a.flip(-1) if p.flip1 else a)
        second.append(b.flip(-1) if p.flip2 else b)
    return torch.stack(first), torch.stack(second)


def overlap_pairs(
    maps1: Tensor, maps2: Tensor, pairs: Sequence[CropPair], crop_h: int, crop_w: int, divisor: int
) -> tuple[Tensor, Tensor]:
    """Row-paired ``(n, C)`` vectors of the shared region from the maps ``(B, C, h, w)`` of crop 1 and
    crop 2: each map is flipped back when its crop was flipped (official ``dacs.py:511-518``), then
    the shared cells are read in the same raster order from both."""
    out1, out2 = [], []
    for m1, m2, p in zip(maps1, maps2, pairs):
        m1 = m1.flip(-1) if p.flip1 else m1
        m2 = m2.flip(-1) if p.flip2 else m2
        r1, c1, r2, c2 = overlap_slices(p, crop_h, crop_w, divisor)
        out1.append(m1[:, r1, c1].reshape(m1.shape[0], -1).t())
        out2.append(m2[:, r2, c2].reshape(m2.shape[0], -1).t())
    return torch.cat(out1), torch.cat(out2)


def partner_masks(conf1: Tensor, conf2: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Which pairs count (official ``dacs.py:613-614,650-651``): crop 1's anchor where its partner is
    above ``threshold`` and more confident, and the same for crop 2."""
    return (conf2 > threshold) & (conf1 < conf2), (conf1 > threshold) & (conf2 < conf1)


def resample_to_grid(x: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """A feature map on an ``h x w`` grid: average-pooled by an integer factor when finer (the official
    ``F.avg_pool2d(..., 2)`` of ``dacs.py:479``), bilinearly resized otherwise."""
    big_h, big_w = x.shape[-2:]
    if (big_h, big_w) == tuple(size):
        return x
    if big_h % size[0] == 0 and big_w % size[1] == 0 and big_h >= size[0] and big_w >= size[1]:
        return F.avg_pool2d(x, kernel_size=(big_h // size[0], big_w // size[1]))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class PatchContrast(nn.Module):
    """PiPa's patch contrast on target images (SPEC 5).

    Two overlapping crops per target image (side ``crop_fraction`` of the image, rounded down to the
    grid; the official crops 720 px of a Cityscapes image rescaled to a long side in [0.8, 2] x 2048),
    each flipped at random and photometrically augmented. Their features on the ``feature_stride``
    grid (the ``stages`` concatenated, or the network's ``logits``), projected by ``proj_head`` (1x1
    C->C, ReLU, 1x1 -> 128, no BN; official ``self.project``, ``dacs.py:96-102``) and L2-normalised.
    For every cell of the shared region, the crop-1 anchor's positive is the crop-2 key at the same
    image position (temperature 0.1) and vice versa; negatives are a FIFO bank of ``bank_per_crop``
    (1600) random cells of each crop from the current and the ``bank_iterations - 1`` previous
    iterations whose pseudo-class differs from the anchor's; an anchor counts only where its partner is
    above ``confidence`` (0.9) and more confident. ``weight * (loss_1 + loss_2)``: 0.01 in the official
    HRDA version (``dacs.py:106``), 0.1 in the DAFormer one (``PiPa_DAFormer/.../dacs.py:98``). On from
    ``start`` (official: ``local_iter >= 10000`` of 60k, ``dacs.py:428``): ``start_step``, or
    ``round(start_fraction * max_steps)`` when ``start_fraction`` is set (to scale it to a schedule).

    Fixed variant (defaults): anchors from the **student** (gradient into the segmentation network),
    keys from the **teacher** through the same head without gradient, pseudo-classes and confidences
    from the teacher's predictions on each crop, shared region mapped with the grid's true stride.
    Official defects as flags:

    * ``official_patch_on_teacher``: anchors *and* keys from the teacher (``dacs.py:475-488``), so only
      ``proj_head`` learns and nothing reaches the segmentation network;
    * ``official_patch_classifier``: pseudo-classes and confidences from a separate, never trained 1x1
      classifier on the (teacher) grid features (``dacs.py:104,491-496``), not from the teacher's
      predictions;
    * ``official_box_divisor``: index the shared region with pixel ``// official_box_divisor`` (the HRDA
      version's ``// 8``) whatever the grid stride; with ``features="logits"`` and ``feature_stride=2``
      (the teacher's logits at image resolution average-pooled by 2, ``dacs.py:475-479``) this is the
      official misalignment of the positive pairs.

    The bank holds keys (teacher embeddings, detached) with their pseudo-classes; it is pushed before
    the loss, so the current iteration's cells are negatives too, as officially. ``proj_head`` is
    named so for the 10x lr (the official ``project`` matches no ``head`` key and trains at 1x).
    """

    def __init__(
        self,
        stage_channels: Sequence[int],
        num_classes: int,
        stages: Sequence[int] = (0, 1, 2, 3),
        features: str = "stages",
        feature_stride: int = 8,
        proj_dim: int = 128,
        crop_fraction: float = 0.75,
        iou_range: tuple[float, float] = (0.1, 1.0),
        max_tries: int = 50,
        flip_p: float = 0.5,
        temperature: float = 0.1,
        confidence: float = 0.9,
        bank_per_crop: int = 1600,
        bank_iterations: int = 3,
        weight: float = 0.1,
        start_step: int = 10000,
        start_fraction: float | None = None,
        max_steps: int | None = None,
        align_corners: bool = False,
        official_patch_on_teacher: bool = False,
        official_patch_classifier: bool = False,
        official_box_divisor: int | None = None,
    ) -> None:
        super().__init__()
        if features not in PATCH_FEATURES:
            raise ValueError(f"method.pipa.patch.features={features!r} is not one of {PATCH_FEATURES}")
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"method.pipa.patch.crop_fraction must be in (0, 1], got {crop_fraction}")
        if start_fraction is not None and not max_steps:
            raise ValueError("method.pipa.patch.start_fraction needs max_steps (e.g. ${trainer.max_steps})")
        self.num_classes = int(num_classes)
        self.stages, self.features = tuple(int(s) for s in stages), features
        self.feature_stride = int(feature_stride)
        self.divisor = int(official_box_divisor or feature_stride)
        self.crop_fraction, self.iou_range = float(crop_fraction), (float(iou_range[0]), float(iou_range[1]))
        self.max_tries, self.flip_p = int(max_tries), float(flip_p)
        self.temperature, self.confidence = float(temperature), float(confidence)
        self.bank_per_crop, self.weight = int(bank_per_crop), float(weight)
        self.start = round(start_fraction * max_steps) if start_fraction is not None else int(start_step)
        self.align_corners = bool(align_corners)
        self.official_patch_on_teacher = bool(official_patch_on_teacher)
        self.official_patch_classifier = bool(official_patch_classifier)
        c = self.num_classes if features == "logits" else int(sum(stage_channels[i] for i in self.stages))
        self.proj_head = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(inplace=True), nn.Conv2d(c, proj_dim, 1))
        self.patch_classifier: nn.Module | None = None
        if self.official_patch_classifier:
            self.patch_classifier = nn.Conv2d(c, self.num_classes, 1).requires_grad_(False)
        self.queue = FeatureQueue(proj_dim, bank_iterations, 2 * self.bank_per_crop)

    def active(self, step: int) -> bool:
        """Whether the term runs at ``step`` (the seg module may skip the call, and its passes, before)."""
        return step >= self.start and self.weight > 0

    def crop_size(self, height: int, width: int) -> tuple[int, int]:
        """Crop side: ``crop_fraction`` of the image rounded down to a multiple of the grid (and of the
        official divisor), so crops, offsets and flips map onto whole cells."""
        m = math.lcm(self.feature_stride, self.divisor)
        ch, cw = int(self.crop_fraction * height) // m * m, int(self.crop_fraction * width) // m * m
        if ch < m or cw < m:
            raise ValueError(f"method.pipa.patch: {height}x{width} images give no crop of at least {m} px")
        return ch, cw

    def _grid(self, logits: Tensor, stages: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        if self.features == "logits":
            return resample_to_grid(logits, size, self.align_corners)
        return torch.cat([resample_to_grid(stages[i], size, self.align_corners) for i in self.stages], dim=1)

    def _embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj_head(x), p=2, dim=1)

    def forward(
        self,
        images: Tensor,
        student_fn: ForwardFn,
        teacher_fn: ForwardFn,
        step: int,
        generator: torch.Generator,
        augment: AugmentFn | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, logs)``; before ``start`` a zero without graph (``loss.requires_grad`` is False)."""
        if not self.active(step):
            return images.new_zeros(()), {"active": images.new_zeros(())}
        _, _, height, width = images.shape
        ch, cw = self.crop_size(height, width)
        step_px = math.lcm(self.feature_stride, self.divisor)  # with the divisor: the official loader's 8
        pairs = [
            sample_crop_pair(
                height,
                width,
                ch,
                cw,
                step_px,
                self.iou_range,
                generator,
                self.max_tries,
                self.flip_p,
            )
            for _ in range(images.shape[0])
        ]
        crops1, crops2 = crop_images(images, pairs, ch, cw)
        if augment is not None:
            crops1, crops2 = augment(crops1, generator), augment(crops2, generator)
        grid = (ch // self.feature_stride, cw // self.feature_stride)
        with torch.no_grad():
            t_logits1, t_stages1 = teacher_fn(crops1)
            t_logits2, t_stages2 = teacher_fn(crops2)
            t_x1, t_x2 = self._grid(t_logits1, t_stages1, grid), self._grid(t_logits2, t_stages2, grid)
            if self.patch_classifier is not None:
                probs1 = torch.softmax(self.patch_classifier(t_x1).float(), 1)
                probs2 = torch.softmax(self.patch_classifier(t_x2).float(), 1)
            else:
                probs1, probs2 = (
                    probabilities_on_grid(t_logits1, grid),
                    probabilities_on_grid(t_logits2, grid),
                )
            conf1, pl1 = probs1.max(1)
            conf2, pl2 = probs2.max(1)
        if self.official_patch_on_teacher:
            anchors1, anchors2 = self._embed(t_x1), self._embed(t_x2)
            keys1, keys2 = anchors1.detach(), anchors2.detach()
        else:
            s_logits1, s_stages1 = student_fn(crops1)
            s_logits2, s_stages2 = student_fn(crops2)
            anchors1 = self._embed(self._grid(s_logits1, s_stages1, grid))
            anchors2 = self._embed(self._grid(s_logits2, s_stages2, grid))
            with torch.no_grad():
                keys1, keys2 = self._embed(t_x1), self._embed(t_x2)

        # the bank: random cells of each crop (keys and their pseudo-classes), pushed before the loss
        d = keys1.shape[1]
        flat_k = [k.permute(0, 2, 3, 1).reshape(-1, d) for k in (keys1, keys2)]
        flat_l = [p.reshape(-1) for p in (pl1, pl2)]
        picks = [random_subset(fk.shape[0], self.bank_per_crop, generator, fk.device) for fk in flat_k]
        self.queue.push(
            torch.cat([fk[i] for fk, i in zip(flat_k, picks)]),
            torch.cat([fl[i] for fl, i in zip(flat_l, picks)]),
        )
        bank, bank_labels = self.queue.contents()

        a1, k2 = overlap_pairs(anchors1, keys2, pairs, ch, cw, self.divisor)
        k1, a2 = overlap_pairs(keys1, anchors2, pairs, ch, cw, self.divisor)
        l1, l2 = overlap_pairs(pl1[:, None], pl2[:, None], pairs, ch, cw, self.divisor)
        c1, c2 = overlap_pairs(conf1[:, None], conf2[:, None], pairs, ch, cw, self.divisor)
        m1, m2 = partner_masks(c1[:, 0], c2[:, 0], self.confidence)
        loss1 = masked_mean(info_nce(a1, k2, bank.to(a1), self.temperature, l1[:, 0], bank_labels), m1)
        loss2 = masked_mean(info_nce(a2, k1, bank.to(a2), self.temperature, l2[:, 0], bank_labels), m2)
        loss = self.weight * (loss1 + loss2)
        ious = [crop_iou(p.top2 - p.top1, p.left2 - p.left1, ch, cw) for p in pairs]
        logs = {
            "active": images.new_ones(()),
            "loss1": loss1.detach(),
            "loss2": loss2.detach(),
            "pairs": images.new_tensor(float(a1.shape[0])),
            "counted": (m1.float().mean() + m2.float().mean()).detach() / 2
            if a1.shape[0]
            else images.new_zeros(()),
            "iou": images.new_tensor(sum(ious) / len(ious)),
            "bank": images.new_tensor(float(len(self.queue))),
        }
        return loss, logs
