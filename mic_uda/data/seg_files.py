"""File-based segmentation datasets: image/label pairs on disk, label-id mapping, resize/crop/flip.

The layout classes (GTA5, Cityscapes, ...) only list their files and say which ids map to which
train ids; reading, mapping and the papers' resize/crop recipes are shared here. Every problem with
the data on disk is an error that names the path and the expected layout.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

IGNORE = 255
log = logging.getLogger(__name__)

#: how far (relative) a label's aspect ratio may be from its image's for a pair of different sizes to be
#: resized each on its own (with ``resize`` set) rather than rejected: GTA5's odd frames are a few pixels
#: off; a larger gap means the label belongs to another image
SIZE_MISMATCH_TOLERANCE = 0.02

# Cityscapes label ids -> the 19 train ids (everything else -> 255); GTA5 uses the same ids.
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)


def require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what}: folder '{path}' not found. Expected layout: {layout}. "
            "Set paths.data_dir or the dataset's root (e.g. data.datamodule.source.root=/path)."
        )
    return path


def mapping_lut(mapping: Mapping[int, int] | None, max_id: int = 65536) -> torch.Tensor | None:
    """A lookup table id -> train id (unmapped ids -> 255); ``None`` keeps ids as they are."""
    if mapping is None:
        return None
    lut = torch.full((max_id,), IGNORE, dtype=torch.long)
    for k, v in mapping.items():
        lut[int(k)] = int(v)
    return lut


def subset_lut(class_subset: Sequence[int] | None, num_classes: int) -> torch.Tensor | None:
    """Train id -> its position in ``class_subset`` (others -> 255): e.g. 19 Cityscapes -> 16 SYNTHIA ids."""
    if class_subset is None:
        return None
    kept = [int(c) for c in class_subset]
    if len(set(kept)) != len(kept) or any(not 0 <= c < num_classes for c in kept):
        raise ValueError(f"class_subset {kept}: expected distinct train ids in 0..{num_classes - 1}")
    lut = torch.full((IGNORE + 1,), IGNORE, dtype=torch.long)
    lut[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
    return lut


class PairedSegDataset(Dataset):
    """Image/label file pairs with optional id mapping, resize, random crop and flip.

    ``resize``: (width, height), applied first. ``keep_ratio=false`` resizes to exactly that size;
    ``keep_ratio=true`` rescales by one factor as mmseg's ``Resize(img_scale, keep_ratio=True)`` (the
    papers' pipelines; see :meth:`resized_size`): GTA 1914x1052 with (1280, 720) -> 1280x704.
    ``crop_size``: random crop, a side (square) or ``[height, width]`` (training); ``hflip``: random
    horizontal flip. ``pad_crop``: an image smaller than the crop is cropped to what it has and padded
    to the crop size (image ``pad_value``, label 255), as mmseg's ``RandomCrop`` + ``Pad(size=crop_size,
    pad_val=0, seg_pad_val=255)`` (its pad is 0 after Normalize, i.e. the ImageNet mean colour here,
    where images stay in [0, 1]); without it such an image is an error. ``pseudo_margins`` (target
    splits): ``[top, bottom, left, right]`` pixels of the resized image where pseudo-labels are not
    trusted; items carry ``valid_mask`` (1 inside, 0 in the margins and the padding), cropped and
    flipped with the image, so the margins hit only crops at the periphery of the frame (HRDA's
    ``crop_pseudo_margins``, applied before cropping).
    ``cat_max_ratio`` < 1 re-draws a crop (up to 10 times) while one class covers that share or more
    of its labelled pixels (mmseg's ``RandomCrop``, 0.75 in the papers' source pipelines; see
    :meth:`draw_crop`). ``class_subset`` keeps only these train ids, renumbered 0..k-1 in that order
    (others -> 255), e.g. the 16 SYNTHIA classes.

    ``native_label`` (evaluation splits: no crop, no flip): items also carry ``label_native``, the label
    at its file's own resolution, while ``image`` (and ``label``) are resized for the network. The
    segmentation evaluation upsamples the logits bilinearly to ``label_native``'s size and scores them
    there, as the official mmseg test (logits rescaled to ``ori_shape``, full-resolution ground truth).
    Batches stack ``label_native``: every label of a batch must have one size (true of Cityscapes, ACDC,
    Dark Zurich, BDD100K); otherwise evaluation fails naming the sizes, and ``val_batch_size=1`` is
    the fix (mic_uda.data.datamodule.eval_collate).

    Randomness uses torch's global RNG unless a ``generator`` is passed to :meth:`augment` /
    :meth:`draw_crop` (rare class sampling owns one); UDADataModule's training loaders seed it per
    sample from the stream position (mic_uda.data.resumable), so crops and flips repeat after a resume.
    """

    #: a file dataset's own defaults of the reading options (its recipe's resize and crop); a user's
    #: keyword options replace them (:meth:`read_files`)
    READ_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path | None]],
        num_classes: int,
        label_mapping: Mapping[int, int] | None = None,
        resize: Sequence[int] | None = None,
        crop_size: int | Sequence[int] | None = None,
        hflip: bool = False,
        name: str = "dataset",
        cat_max_ratio: float = 1.0,
        class_subset: Sequence[int] | None = None,
        keep_ratio: bool = False,
        native_label: bool = False,
        pad_crop: bool = False,
        pad_value: Sequence[float] = (0.485, 0.456, 0.406),
        pseudo_margins: Sequence[int] | None = None,
    ) -> None:
        if len(pairs) == 0:
            raise ValueError(f"{name}: no images found")
        self.pairs, self.name = list(pairs), name
        self.label_classes = num_classes  # ids in the (mapped) label files
        self.lut = mapping_lut(label_mapping)
        self.class_subset = [int(c) for c in class_subset] if class_subset is not None else None
        self.subset_lut = subset_lut(class_subset, num_classes)
        self.num_classes = len(self.class_subset) if self.class_subset is not None else num_classes
        self.resize = tuple(int(v) for v in resize) if resize is not None else None
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) <= 0):
            raise ValueError(f"{name}: resize {list(self.resize)}: expected [width, height] > 0")
        self.crop_size, self.hflip, self.cat_max_ratio = crop_size, hflip, cat_max_ratio
        self.keep_ratio, self.native_label = bool(keep_ratio), bool(native_label)
        self.crop_hw = crop_hw(crop_size, name)
        self.pad_crop = bool(pad_crop)
        self.pad_value = torch.tensor([float(v) for v in pad_value]).view(-1, 1, 1)
        margins = None if pseudo_margins is None else tuple(int(m) for m in pseudo_margins)
        if margins is not None and (len(margins) != 4 or min(margins) < 0):
            raise ValueError(f"{name}: pseudo_margins {list(margins)}: expected [top, bottom, left, right]")
        self.pseudo_margins = margins
        if self.native_label and (crop_size is not None or hflip):
            raise ValueError(
                f"{name}: native_label=true is for evaluation splits: it needs crop_size=null and "
                f"hflip=false, got crop_size={crop_size}, hflip={hflip}"
            )
        # pairs whose size mismatch was logged (read), shared with DataLoader workers: once per run
        self._size_mismatch_logged = shared_flags(len(self.pairs)) if self.resize is not None else None

    def __len__(self) -> int:
        return len(self.pairs)

    def read_files(
        self,
        pairs: Sequence[tuple[Path, Path | None]],
        num_classes: int,
        label_mapping: Mapping[int, int] | None,
        name: str,
        options: Mapping[str, Any],
    ) -> None:
        """Set up a file dataset (GTA5, Cityscapes, ...) from the pairs it found and the reading options
        its caller gave (``resize``, ``crop_size``, ``hflip``, ...: :data:`READ_OPTIONS`), over its
        :attr:`READ_DEFAULTS`; one place, so an option added here reaches every dataset."""
        unknown = sorted(set(options) - set(READ_OPTIONS))
        if unknown:
            raise TypeError(f"{name}: unknown option(s) {unknown}: expected some of {list(READ_OPTIONS)}")
        PairedSegDataset.__init__(
            self, pairs, num_classes, label_mapping, name=name, **{**self.READ_DEFAULTS, **options}
        )

    def label_signature(self) -> dict[str, object]:
        """What decides the label ids read from the files (for caches of label statistics)."""
        lut = None if self.lut is None else hashlib.sha256(self.lut.numpy().tobytes()).hexdigest()
        return {
            "reader": f"{type(self).__module__}.{type(self).__qualname__}",
            "label_classes": self.label_classes,
            "lut": lut,
            "class_subset": self.class_subset,
        }

    def read_ids(self, path: Path) -> torch.Tensor:
        """The raw ids of a label file (first channel of a colour PNG), as int64."""
        try:
            arr = np.array(Image.open(path))
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
            raise OSError(f"{path}: cannot read label ({type(e).__name__}: {e})") from e
        if arr.ndim == 3:
            arr = arr[..., 0]
        return torch.from_numpy(arr.astype(np.int64))

    def read_label(self, path: Path) -> torch.Tensor:
        """Train ids of a label file at its own resolution (mapped, checked, subset)."""
        label = self.read_ids(path)
        if self.lut is not None:
            label = self.lut[label.clamp(0, self.lut.numel() - 1)]
        bad = (label != IGNORE) & ((label < 0) | (label >= self.label_classes))
        if bad.any():
            raise ValueError(
                f"{path}: label ids {sorted(label[bad].unique().tolist())[:10]} outside "
                f"0..{self.label_classes - 1} "
                f"(and {IGNORE} = ignore); check the dataset's label mapping"
            )
        if self.subset_lut is not None:
            label = self.subset_lut[label]
        return label

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of a ``height`` x ``width`` image after ``resize``.

        ``keep_ratio=false``: ``resize`` itself. ``keep_ratio=true``: mmcv's ``rescale_size`` (used by
        mmseg's ``Resize`` with ``keep_ratio=True``, its default): one factor
        ``s = min(max(resize) / max(h, w), min(resize) / min(h, w))``, sides ``int(side * s + 0.5)``.
        GTA 1914x1052 with (1280, 720): s = 1280 / 1914 -> 1280x704; Cityscapes 2048x1024 with
        (1024, 512) and ACDC / Dark Zurich 1920x1080 with (960, 540): s = 0.5 either way.
        """
        if self.resize is None:
            return height, width
        if not self.keep_ratio:
            return self.resize[1], self.resize[0]
        s = min(max(self.resize) / max(height, width), min(self.resize) / min(height, width))
        return int(height * s + 0.5), int(width * s + 0.5)

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image (float 0..1, CxHxW) and label of pair ``i`` at the files' own resolution.

        A label whose size differs from its image's (a few GTA5 frames) is an error naming both files
        when ``resize`` is null. With ``resize`` set it is what mmseg does with such a pair: image and
        label are each resized on their own to their target size (:meth:`resize_pair`), after checking
        that their aspect ratios agree within :data:`SIZE_MISMATCH_TOLERANCE` (otherwise the label is
        not this image's: an error naming both files); each such pair is logged once per run.
        """
        img_path, lbl_path = self.pairs[i]
        try:
            image = torch.from_numpy(np.array(Image.open(img_path).convert("RGB"))).permute(2, 0, 1)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
            raise OSError(f"{img_path}: cannot read image ({type(e).__name__}: {e})") from e
        image = image.float().div_(255)
        label = self.read_label(lbl_path) if lbl_path is not None else None
        if label is not None and label.shape != image.shape[-2:]:
            self._check_size_mismatch(i, tuple(image.shape[-2:]), tuple(label.shape))
        return image, label

    def _check_size_mismatch(self, i: int, image_hw: tuple[int, int], label_hw: tuple[int, int]) -> None:
        img_path, lbl_path = self.pairs[i]
        if self.resize is None:
            raise ValueError(
                f"{lbl_path}: label size {label_hw} != image size {image_hw} of {img_path}: expected the"
                " same size (with resize set, such a pair is resized each on its own, as mmseg)"
            )
        apart = abs((label_hw[1] / label_hw[0]) / (image_hw[1] / image_hw[0]) - 1.0)
        if apart > SIZE_MISMATCH_TOLERANCE:
            raise ValueError(
                f"{lbl_path}: label size {label_hw} != image size {image_hw} of {img_path}, aspect ratios "
                f"{apart:.1%} apart: expected the same size, or one within {SIZE_MISMATCH_TOLERANCE:.0%} "
                "of the image's aspect ratio (resized each on its own)"
            )
        logged = getattr(self, "_size_mismatch_logged", None)
        if logged is not None and i < logged.numel():
            if bool(logged[i]):
                return
            logged[i] = True
        out_img, out_lbl = self.resized_size(*image_hw), self.resized_size(*label_hw)
        log.warning(
            "%s: label %s is %dx%d, its image %s is %dx%d: each resized on its own (as mmseg's Resize), "
            "to %dx%d and %dx%d%s",
            self.name,
            lbl_path,
            label_hw[1],
            label_hw[0],
            img_path,
            image_hw[1],
            image_hw[0],
            out_img[1],
            out_img[0],
            out_lbl[1],
            out_lbl[0],
            ""
            if out_img == out_lbl
            else "; the label is then cut or padded with 255 at the bottom/right to the image's size, "
            "as mmseg's crop and pad treat it",
        )

    def resize_pair(
        self, image: torch.Tensor, label: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image (bilinear, align_corners=False) and label (nearest), each at its own
        :meth:`resized_size` (mmseg's ``Resize`` rescales ``img`` and ``gt_semantic_seg`` separately).
        A label whose size differs from its image's (checked in :meth:`read`) can land a few pixels off
        the image's size; it is then cut or padded with 255 at the bottom/right to the image's size: what
        mmseg's ``RandomCrop`` (one box for both) and ``Pad`` do to it."""
        h, w = self.resized_size(*image.shape[-2:])
        if (h, w) != tuple(image.shape[-2:]):  # interpolating to the same size is the identity
            image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        if label is not None:
            lh, lw = self.resized_size(*label.shape)
            if (lh, lw) != tuple(label.shape):
                label = F.interpolate(label[None, None].float(), size=(lh, lw), mode="nearest")[0, 0].long()
            if (lh, lw) != (h, w):
                label = label[:h, :w]
                label = F.pad(label, (0, w - label.shape[1], 0, h - label.shape[0]), value=IGNORE)
        return image, label

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image (float 0..1, CxHxW) and label of pair ``i``, resized but not cropped or flipped."""
        return self.resize_pair(*self.read(i))

    def draw_crop(
        self, image: torch.Tensor, label: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[int, int]:
        """(top, left) of a random ``crop_size`` crop, as mmseg's ``RandomCrop``: one uniform draw and,
        with ``cat_max_ratio`` < 1 and a label, up to 10 re-draws while the crop holds fewer than two
        labelled classes or its largest class covers ``cat_max_ratio`` or more of its labelled pixels
        (255 excluded); the 10th re-draw is kept unchecked (at most 11 draws)."""
        assert self.crop_hw is not None
        top, left = crop_offsets(image, self.crop_hw, generator, self.pad_crop)
        if label is not None and self.cat_max_ratio < 1.0:
            for _ in range(10):
                if not _one_class_dominates(label, top, left, self.crop_hw, self.cat_max_ratio):
                    break
                top, left = crop_offsets(image, self.crop_hw, generator, self.pad_crop)
        return top, left

    def valid_mask(self, image: torch.Tensor) -> torch.Tensor | None:
        """1 where pseudo-labels count, 0 in ``pseudo_margins`` (of the resized, uncropped image)."""
        if self.pseudo_margins is None:
            return None
        top, bottom, left, right = self.pseudo_margins
        h, w = image.shape[-2:]
        mask = torch.zeros(h, w)
        mask[top : h - bottom, left : w - right] = 1.0
        return mask

    def finish(
        self,
        image: torch.Tensor,
        label: torch.Tensor | None,
        top: int,
        left: int,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Crop at (top, left), the random flip and the padding of a resized training pair, with its
        ``valid_mask`` (the one place every training crop goes through, rare class sampling too)."""
        valid = self.valid_mask(image)
        if self.crop_hw is not None:
            image, label = apply_crop(image, label, top, left, self.crop_hw)
            if valid is not None:
                valid = apply_crop(valid[None], None, top, left, self.crop_hw)[0][0]
        if self.hflip and torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
            label = label.flip(-1) if label is not None else None
            valid = valid.flip(-1) if valid is not None else None
        if self.crop_hw is not None and tuple(image.shape[-2:]) != self.crop_hw:  # pad_crop (checked)
            image, label, valid = pad_to(image, label, valid, self.crop_hw, self.pad_value)
        out = {"image": image.contiguous()}
        if label is not None:
            out["label"] = label.contiguous()
        if valid is not None:
            out["valid_mask"] = valid.contiguous()
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        if self.native_label:
            image, native = self.read(i)
            image, label = self.resize_pair(image, native)  # no crop, no flip (checked in __init__)
            out: dict[str, torch.Tensor | int] = {"image": image.contiguous(), "index": i}
            if label is not None:
                out["label"], out["label_native"] = label.contiguous(), native.contiguous()
            return out
        image, label = self.load(i)
        top, left = self.draw_crop(image, label) if self.crop_hw is not None else (0, 0)
        return {**self.finish(image, label, top, left), "index": i}


#: the options every file dataset passes through to :class:`PairedSegDataset`: its arguments other than
#: what the dataset itself finds (read from its signature, so the two cannot drift apart)
READ_OPTIONS = tuple(
    k
    for k in inspect.signature(PairedSegDataset.__init__).parameters
    if k not in ("self", "pairs", "num_classes", "label_mapping", "name")
)


def shared_flags(n: int) -> torch.Tensor:
    """``n`` False flags in shared memory (seen and set by every DataLoader worker); a plain tensor where
    shared memory is unavailable (then once per worker process)."""
    flags = torch.zeros(n, dtype=torch.bool)
    try:
        return flags.share_memory_()
    except RuntimeError:
        return flags


def crop_hw(crop_size: int | Sequence[int] | None, name: str = "dataset") -> tuple[int, int] | None:
    """``crop_size`` (a side or ``[height, width]``) as (height, width)."""
    if crop_size is None:
        return None
    hw = (int(crop_size), int(crop_size)) if isinstance(crop_size, (int, float)) else tuple(crop_size)
    if len(hw) != 2 or min(hw) <= 0:
        raise ValueError(f"{name}: crop_size {crop_size}: expected a side or [height, width] > 0")
    return int(hw[0]), int(hw[1])


def crop_offsets(
    image: torch.Tensor,
    size: int | Sequence[int],
    generator: torch.Generator | None = None,
    allow_smaller: bool = False,
) -> tuple[int, int]:
    """A uniformly random (top, left) of a ``size`` crop inside ``image`` (..., H, W); a side the
    image lacks is an error, or (``allow_smaller``, mmseg's RandomCrop) offset 0 on it."""
    ch, cw = crop_hw(size)
    h, w = image.shape[-2:]
    if (h < ch or w < cw) and not allow_smaller:
        raise ValueError(
            f"crop_size {ch}x{cw} is larger than the (resized) image {h}x{w} (pad_crop=true pads it)"
        )
    top = int(torch.randint(0, max(h - ch, 0) + 1, (), generator=generator))
    left = int(torch.randint(0, max(w - cw, 0) + 1, (), generator=generator))
    return top, left


def apply_crop(
    image: torch.Tensor, label: torch.Tensor | None, top: int, left: int, size: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    ch, cw = crop_hw(size)
    image = image[..., top : top + ch, left : left + cw]
    if label is not None:
        label = label[top : top + ch, left : left + cw]
    return image, label


def pad_to(
    image: torch.Tensor,
    label: torch.Tensor | None,
    valid: torch.Tensor | None,
    size: tuple[int, int],
    pad_value: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Pad bottom/right to ``size`` (mmseg's ``Pad``): image ``pad_value``, label 255, valid mask 0."""
    h, w = image.shape[-2:]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    canvas = pad_value.to(image.dtype).expand(image.shape[0], h + ph, w + pw).clone()
    canvas[:, :h, :w] = image
    if label is not None:
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE)
    if valid is not None:
        valid = F.pad(valid, (0, pw, 0, ph), value=0.0)
    return canvas, label, valid


def random_crop(
    image: torch.Tensor, label: torch.Tensor | None, size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return apply_crop(image, label, *crop_offsets(image, size, generator), size)


def _one_class_dominates(
    label: torch.Tensor, top: int, left: int, size: int | Sequence[int], ratio: float
) -> bool:
    ch, cw = crop_hw(size)
    crop = label[top : top + ch, left : left + cw]
    counts = torch.bincount(crop[crop != IGNORE].flatten())
    counts = counts[counts > 0]
    return not (counts.numel() > 1 and counts.max().item() / counts.sum().item() < ratio)


def _pairs_by_stem(
    images: list[Path], label_for: Callable[[Path], Path], with_labels: bool, what: str
) -> list[tuple[Path, Path | None]]:
    pairs = []
    for img in images:
        lbl = label_for(img) if with_labels else None
        if lbl is not None and not lbl.is_file():
            raise FileNotFoundError(f"{what}: label file '{lbl}' for image '{img}' is missing")
        pairs.append((img, lbl))
    return pairs


def pair_train_id_labels(
    images: list[Path],
    label_for: Callable[[Path, str], Path],
    what: str,
    kinds: tuple[str, str] = ("labelTrainIds", "labelIds"),
) -> tuple[list[tuple[Path, Path | None]], dict[int, int] | None]:
    """Pairs images with ``label_for(image, kind)``. Cityscapes, ACDC and Dark Zurich ship train-id files
    and label-id files side by side: train ids are used as they are, else label ids are mapped with the
    Cityscapes table (the first image decides, so a dataset never mixes the two)."""
    train_ids, label_ids = (label_for(images[0], k) for k in kinds)
    if train_ids.is_file():
        kind, mapping = kinds[0], None
    elif label_ids.is_file():
        kind, mapping = kinds[1], CITYSCAPES_ID_TO_TRAIN_ID
    else:
        raise FileNotFoundError(
            f"{what}: label file '{train_ids}' (or '{label_ids.name}') for image '{images[0]}' is missing"
        )
    return _pairs_by_stem(images, lambda p: label_for(p, kind), True, what), mapping


def read_split_file(path: Path, what: str, layout: str) -> list[str]:
    """The non-empty lines of a split list (one image stem per line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: split file '{path}' not found. Expected layout: {layout}")
    stems = [s.strip() for s in path.read_text().splitlines() if s.strip()]
    if not stems:
        raise ValueError(f"{what}: split file '{path}' lists no images")
    return stems


def sorted_glob(folder: Path, pattern: str, what: str, layout: str) -> list[Path]:
    """Files matching ``pattern`` under ``folder``, or an error naming both and the expected layout."""
    files = sorted(folder.glob(pattern))
    if not files:
        raise FileNotFoundError(f"{what}: no {pattern} in '{folder}'. Expected layout: {layout}")
    return files


GTA5_LAYOUT = "<root>/images/*.png and <root>/labels/*.png (same file names; Cityscapes label ids)"


class GTA5(PairedSegDataset):
    """GTA5 (Richter et al.): ``images/*.png``, ``labels/*.png`` with Cityscapes ids -> 19 train ids.
    Default recipe (DAFormer/MIC): ``Resize(img_scale=(1280, 720))`` keeping the aspect ratio, i.e.
    1914x1052 -> 1280x704 (``keep_ratio=false``: exactly 1280x720), 512 crops.

    Quirk of the published files: a few frames' image and label differ in size by a few pixels. With
    ``resize`` set (the default) they are read as mmseg reads them: image and label each resized on
    its own to its target size, any pixels left over cut or padded with 255, a warning per such pair
    once (:meth:`PairedSegDataset.read`); with ``resize=None`` they are an error naming both files."""

    READ_DEFAULTS: ClassVar[dict[str, Any]] = {"resize": (1280, 720), "crop_size": 512, "keep_ratio": True}

    def __init__(
        self,
        root: str | Path,
        with_labels: bool = True,
        **options: Any,
    ) -> None:
        root = Path(root)
        img_dir = require_dir(root / "images", "GTA5", GTA5_LAYOUT)
        require_dir(root / "labels", "GTA5", GTA5_LAYOUT)
        images = sorted_glob(img_dir, "*.png", "GTA5", GTA5_LAYOUT)
        pairs = _pairs_by_stem(images, lambda p: root / "labels" / p.name, with_labels, "GTA5")
        self.read_files(pairs, 19, CITYSCAPES_ID_TO_TRAIN_ID, "GTA5", options)


CITYSCAPES_LAYOUT = (
    "<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
    "<root>/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png)"
)


class Cityscapes(PairedSegDataset):
    """Cityscapes: ``leftImg8bit/<split>/<city>/*``; labels ``*_labelTrainIds.png`` or ``*_labelIds.png``
    (mapped on the fly). Default recipe: 2048x1024 -> 1024x512, 512 crops for training. The published
    ``gtFine/test`` files are placeholders: ``split=test`` with labels is an error (images only)."""

    READ_DEFAULTS: ClassVar[dict[str, Any]] = {"resize": (1024, 512), "crop_size": 512}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        with_labels: bool = True,
        **options: Any,
    ) -> None:
        root = Path(root)
        if with_labels and split == "test":
            raise ValueError(
                f"Cityscapes/test: '{root / 'gtFine' / 'test'}' holds placeholder labels, not the test "
                "annotations (those stay on the benchmark server): expected split=val for scores, or "
                "with_labels=false to read the test images"
            )
        img_dir = require_dir(root / "leftImg8bit" / split, "Cityscapes", CITYSCAPES_LAYOUT)
        images = sorted_glob(img_dir, "*/*_leftImg8bit.png", "Cityscapes", CITYSCAPES_LAYOUT)
        pairs: list[tuple[Path, Path | None]] = [(p, None) for p in images]
        mapping = None
        if with_labels:
            gt_dir = require_dir(root / "gtFine" / split, "Cityscapes", CITYSCAPES_LAYOUT)
            pairs, mapping = pair_train_id_labels(
                images,
                lambda p, kind: (
                    gt_dir / p.parent.name / p.name.replace("leftImg8bit.png", f"gtFine_{kind}.png")
                ),
                "Cityscapes",
            )
        self.read_files(pairs, 19, mapping, f"Cityscapes/{split}", options)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class FolderSegDataset(PairedSegDataset):
    """A user's own data: ``<root>/<image_dir>/<stem><any image suffix>`` with labels
    ``<root>/<label_dir>/<stem><label_suffix>``; optionally only the stems listed in ``split_file``
    (one stem per line, relative to ``root``). Labels hold train ids (or ids mapped by
    ``label_mapping``), 255 = ignore. CamVid (SPEC 10) is this layout with split lists.
    """

    def __init__(
        self,
        root: str | Path,
        num_classes: int,
        image_dir: str = "images",
        label_dir: str = "labels",
        label_suffix: str = ".png",
        split_file: str | None = None,
        with_labels: bool = True,
        label_mapping: Mapping[int, int] | None = None,
        name: str = "folder",
        **options: Any,
    ) -> None:
        root = Path(root)
        layout = f"<root>/{image_dir}/<stem>.<jpg|png>, <root>/{label_dir}/<stem>{label_suffix}" + (
            f", stems listed in <root>/{split_file}" if split_file else ""
        )
        img_dir = require_dir(root / image_dir, name, layout)
        if with_labels:
            require_dir(root / label_dir, name, layout)
        if split_file is not None:
            stems = read_split_file(root / split_file, name, layout)
            images = [self._find_image(img_dir, stem, name) for stem in stems]
        else:
            images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FileNotFoundError(f"{name}: no images ({', '.join(IMAGE_SUFFIXES)}) in '{img_dir}'")
        labels_at = root / label_dir
        pairs = _pairs_by_stem(images, lambda p: labels_at / f"{p.stem}{label_suffix}", with_labels, name)
        self.read_files(pairs, num_classes, label_mapping, name, options)

    @staticmethod
    def _find_image(img_dir: Path, stem: str, name: str) -> Path:
        for suffix in IMAGE_SUFFIXES:
            if (img_dir / f"{stem}{suffix}").is_file():
                return img_dir / f"{stem}{suffix}"
        raise FileNotFoundError(f"{name}: image '{img_dir / stem}.*' listed in the split file does not exist")
