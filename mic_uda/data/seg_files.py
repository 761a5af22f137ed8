"""File-based segmentation datasets: image/label pairs on disk, label-id mapping, resize/crop/flip.

The layout classes (GTA5, Cityscapes, ...) only list their files and say which ids map to which
train ids; reading, mapping and the papers' resize/crop recipes are shared here. Every problem with
the data on disk is an error that names the path and the expected layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

IGNORE = 255

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


class PairedSegDataset(Dataset):
    """Image/label file pairs with optional id mapping, resize, random crop and flip.

    ``resize``: (width, height) applied first (e.g. GTA 2560x1440 -> 1280x720); ``crop_size``: random
    square crop of that side (training); ``hflip``: random horizontal flip. Randomness uses torch's
    global RNG, which Lightning seeds per DataLoader worker.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path | None]],
        num_classes: int,
        label_mapping: Mapping[int, int] | None = None,
        resize: Sequence[int] | None = None,
        crop_size: int | None = None,
        hflip: bool = False,
        name: str = "dataset",
    ) -> None:
        if len(pairs) == 0:
            raise ValueError(f"{name}: no images found")
        self.pairs, self.num_classes, self.name = list(pairs), num_classes, name
        self.lut = mapping_lut(label_mapping)
        self.resize = tuple(resize) if resize is not None else None
        self.crop_size, self.hflip = crop_size, hflip

    def __len__(self) -> int:
        return len(self.pairs)

    def _read_label(self, path: Path) -> torch.Tensor:
        arr = np.array(Image.open(path))
        if arr.ndim == 3:
            arr = arr[..., 0]
        label = torch.from_numpy(arr.astype(np.int64))
        if self.lut is not None:
            label = self.lut[label.clamp(0, self.lut.numel() - 1)]
        bad = (label != IGNORE) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            raise ValueError(
                f"{path}: label ids {sorted(label[bad].unique().tolist())[:10]} outside "
                f"0..{self.num_classes - 1} "
                f"(and {IGNORE} = ignore); check the dataset's label mapping"
            )
        return label

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        img_path, lbl_path = self.pairs[i]
        try:
            image = torch.from_numpy(np.array(Image.open(img_path).convert("RGB"))).permute(2, 0, 1)
        except OSError as e:
            raise OSError(f"{img_path}: cannot read image ({e})") from e
        image = image.float().div_(255)
        label = self._read_label(lbl_path) if lbl_path is not None else None
        if label is not None and label.shape != image.shape[-2:]:
            raise ValueError(
                f"{lbl_path}: label size {tuple(label.shape)} != image size {tuple(image.shape[-2:])}"
                f" of {img_path}"
            )
        if self.resize is not None:
            w, h = self.resize
            image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            if label is not None:
                label = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        if self.crop_size is not None:
            image, label = random_crop(image, label, self.crop_size)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            label = label.flip(-1) if label is not None else None
        out: dict[str, torch.Tensor | int] = {"image": image.contiguous(), "index": i}
        if label is not None:
            out["label"] = label.contiguous()
        return out


def random_crop(
    image: torch.Tensor, label: torch.Tensor | None, size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    h, w = image.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"crop_size {size} is larger than the (resized) image {h}x{w}")
    top = int(torch.randint(0, h - size + 1, ()))
    left = int(torch.randint(0, w - size + 1, ()))
    image = image[:, top : top + size, left : left + size]
    if label is not None:
        label = label[top : top + size, left : left + size]
    return image, label


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


GTA5_LAYOUT = "<root>/images/*.png and <root>/labels/*.png (same file names; Cityscapes label ids)"


class GTA5(PairedSegDataset):
    """GTA5 (Richter et al.): ``images/*.png``, ``labels/*.png`` with Cityscapes ids -> 19 train ids."""

    def __init__(
        self,
        root: str | Path,
        with_labels: bool = True,
        resize: Sequence[int] | None = (1280, 720),
        crop_size: int | None = 512,
        hflip: bool = False,
    ) -> None:
        root = Path(root)
        img_dir = require_dir(root / "images", "GTA5", GTA5_LAYOUT)
        require_dir(root / "labels", "GTA5", GTA5_LAYOUT)
        images = sorted(img_dir.glob("*.png"))
        if not images:
            raise FileNotFoundError(f"GTA5: no *.png in '{img_dir}'. Expected layout: {GTA5_LAYOUT}")
        pairs = _pairs_by_stem(images, lambda p: root / "labels" / p.name, with_labels, "GTA5")
        super().__init__(pairs, 19, CITYSCAPES_ID_TO_TRAIN_ID, resize, crop_size, hflip, name="GTA5")


CITYSCAPES_LAYOUT = (
    "<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
    "<root>/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png)"
)


class Cityscapes(PairedSegDataset):
    """Cityscapes: ``leftImg8bit/<split>/<city>/*``; labels ``*_labelTrainIds.png`` or ``*_labelIds.png``
    (mapped on the fly). Default recipe: 2048x1024 -> 1024x512, 512 crops for training."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        with_labels: bool = True,
        resize: Sequence[int] | None = (1024, 512),
        crop_size: int | None = 512,
        hflip: bool = False,
    ) -> None:
        root = Path(root)
        img_dir = require_dir(root / "leftImg8bit" / split, "Cityscapes", CITYSCAPES_LAYOUT)
        images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise FileNotFoundError(
                f"Cityscapes: no */*_leftImg8bit.png in '{img_dir}'. Expected: {CITYSCAPES_LAYOUT}"
            )
        mapping = None
        if with_labels:
            require_dir(root / "gtFine" / split, "Cityscapes", CITYSCAPES_LAYOUT)
            probe = (
                root
                / "gtFine"
                / split
                / images[0].parent.name
                / images[0].name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
            )
            suffix = "_gtFine_labelTrainIds.png" if probe.is_file() else "_gtFine_labelIds.png"
            mapping = None if probe.is_file() else CITYSCAPES_ID_TO_TRAIN_ID
        else:
            suffix = ""
        pairs = _pairs_by_stem(
            images,
            lambda p: root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit.png", suffix),
            with_labels,
            "Cityscapes",
        )
        super().__init__(pairs, 19, mapping, resize, crop_size, hflip, name=f"Cityscapes/{split}")


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
        resize: Sequence[int] | None = None,
        crop_size: int | None = None,
        hflip: bool = False,
        name: str = "folder",
    ) -> None:
        root = Path(root)
        layout = f"<root>/{image_dir}/<stem>.<jpg|png>, <root>/{label_dir}/<stem>{label_suffix}" + (
            f", stems listed in <root>/{split_file}" if split_file else ""
        )
        img_dir = require_dir(root / image_dir, name, layout)
        if with_labels:
            require_dir(root / label_dir, name, layout)
        if split_file is not None:
            split_path = root / split_file
            if not split_path.is_file():
                raise FileNotFoundError(
                    f"{name}: split file '{split_path}' not found. Expected layout: {layout}"
                )
            stems = [s.strip() for s in split_path.read_text().splitlines() if s.strip()]
            if not stems:
                raise ValueError(f"{name}: split file '{split_path}' lists no images")
            images = [self._find_image(img_dir, stem, name) for stem in stems]
        else:
            images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FileNotFoundError(f"{name}: no images ({', '.join(IMAGE_SUFFIXES)}) in '{img_dir}'")
        labels_at = root / label_dir
        pairs = _pairs_by_stem(images, lambda p: labels_at / f"{p.stem}{label_suffix}", with_labels, name)
        super().__init__(pairs, num_classes, label_mapping, resize, crop_size, hflip, name=name)

    @staticmethod
    def _find_image(img_dir: Path, stem: str, name: str) -> Path:
        for suffix in IMAGE_SUFFIXES:
            if (img_dir / f"{stem}{suffix}").is_file():
                return img_dir / f"{stem}{suffix}"
        raise FileNotFoundError(f"{name}: image '{img_dir / stem}.*' listed in the split file does not exist")
