"""Image classification data in the class-folder layout: ``<root>/<split>/<class>/*.{jpg,jpeg,png}``.

One reader serves VisDA-2017 (``train/<class>``, ``validation/<class>``), Office-Home
(``<Art|Clipart|Product|Real_World>/<class>``), the digits data (``usps/train/<digit>``,
``mnist_m/test/<digit>``) and a user's own folders, so a new dataset needs a config file, not code.

The resize/crop recipes are those of SDAT's code (Transfer-Learning-Library), which MIC's
classification experiments inherit: every image is first resized to a ``pre_crop_size`` square, then
training takes a random-resized crop ("default"), a centre crop ("cen.crop", VisDA) or a random crop
("ran.crop") of ``image_size``, and evaluation a centre crop. Every problem with the data on disk is an
error that names the path and the expected layout (the style of :mod:`mic_uda.data.seg_files`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from mic_uda.data.seg_files import require_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
TRAIN_CROPS = ("random_resized", "random", "center", "none")


def list_classes(split_dir: Path, class_names: Sequence[str] | None, what: str) -> list[str]:
    """The class folders of ``split_dir``: sorted folder names, or exactly ``class_names`` (in that order).

    Given names must match the folders one to one: a missing or an unexpected folder means the data
    does not match the config, and training on a silently different label set would be worse.
    """
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is None:
        if not found:
            raise FileNotFoundError(
                f"{what}: no class folders in '{split_dir}'. Expected layout: <split>/<class>/*.jpg"
            )
        return found
    expected = [str(c) for c in class_names]
    if len(set(expected)) != len(expected):
        dup = sorted({c for c in expected if expected.count(c) > 1})
        raise ValueError(f"{what}: class_names lists {dup} more than once")
    missing = [c for c in expected if c not in found]
    unexpected = [c for c in found if c not in expected]
    if missing or unexpected:
        raise FileNotFoundError(
            f"{what}: class folders in '{split_dir}' do not match class_names. "
            f"Missing folders: {missing or 'none'}; unexpected folders: {unexpected or 'none'}. "
            f"Expected {len(expected)} folders {expected}, found {len(found)}: {found}"
        )
    return expected


def list_images(class_dir: Path, extensions: Sequence[str], what: str) -> list[Path]:
    files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise FileNotFoundError(
            f"{what}: class folder '{class_dir}' holds no images ({', '.join(extensions)})"
        )
    return files


def list_images_below(split_dir: Path, extensions: Sequence[str], what: str) -> list[Path]:
    """Every image below ``split_dir`` (flat or in class folders; hidden folders skipped)."""
    files = sorted(
        p
        for p in split_dir.rglob("*")
        if p.is_file()
        and p.suffix.lower() in extensions
        and not any(part.startswith(".") for part in p.relative_to(split_dir).parts)
    )
    if not files:
        raise FileNotFoundError(f"{what}: no images ({', '.join(extensions)}) below '{split_dir}'")
    return files


def subsample(files: list[Path], k: int | None, seed: int) -> list[Path]:
    """``k`` files drawn without replacement by a fixed seed (the first ``k`` of a sorted listing would be
    biased, e.g. VisDA's file names group views of the same 3D model)."""
    if k is None or k >= len(files):
        return files
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:k]
    return [files[i] for i in sorted(perm.tolist())]


def read_rgb(path: Path) -> torch.Tensor:
    """uint8 (3,H,W). Grey (USPS), palette and RGBA images become 3-channel RGB: every network here
    takes 3 channels, and the target domain may be colour where the source is grey (USPS -> MNIST-M)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
        raise OSError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class ClassFolderDataset(Dataset):
    """Images in ``<root>/<split>/<class>/*`` with labels = index of the class in ``class_names``.

    Items: ``{"image": float32 (3, image_size, image_size) in [0,1], "label": int64 scalar tensor}``
    (default collate stacks the labels into an int64 ``[B]``); no "label" when ``with_labels=False``.

    Args:
        root: dataset folder. ``split``: sub-path of ``root`` holding the class folders ("train",
            "validation", "Art", "usps/train"); ``None`` = ``root`` itself.
        class_names: the classes in label order; ``None`` = the sorted folder names. When given, the
            folders must match exactly (a missing or extra folder is an error listing both sets).
        image_size: side of the square network input.
        pre_crop_size: side of the square every image is resized to before cropping (256 for 224 inputs
            in SDAT); ``None`` = resize straight to ``image_size`` (digits).
        train: random crop (``train_crop``) and flip; otherwise a deterministic centre crop.
        train_crop: "random_resized" (SDAT "default", Office-Home), "center" ("cen.crop", VisDA),
            "random" ("ran.crop") or "none" (resize only).
        scale, ratio: area and aspect ranges of the random-resized crop (torchvision's defaults).
        hflip: random horizontal flip when training (off for digits: a flipped 7 is not a 7).
        transform: applied to the float [0, 1] image after crop and flip, when training only (e.g. a
            torchvision ``v2.Compose`` of ``RandomAffine`` and
            :class:`mic_uda.data.transforms.IntensityAugment` for digits); evaluation never sees it.
        with_labels: ``False`` for an unlabelled target set: every image below the split folder, with or
            without class folders, items without "label" (``class_names`` is then only recorded).
        max_per_class: keep at most this many images per class (a fixed-seed draw, ``subset_seed``) for
            quick subsets; of the whole set when ``with_labels`` is false.
        cache_in_memory: decode and resize every image once at construction (uint8, shared with
            DataLoader workers); worth it for the tiny digits, not for VisDA's 207k. Also
            surfaces every unreadable file at start-up instead of mid-epoch.
        extensions: accepted file suffixes (case-insensitive); other files are ignored.
        name: used in error messages; defaults to ``<root name>/<split>``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        class_names: Sequence[str] | None = None,
        image_size: int = 224,
        pre_crop_size: int | None = None,
        train: bool = False,
        train_crop: str = "random_resized",
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        with_labels: bool = True,
        max_per_class: int | None = None,
        subset_seed: int = 0,
        cache_in_memory: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        name: str | None = None,
    ) -> None:
        root = Path(root)
        self.name = name or (f"{root.name}/{split}" if split else root.name)
        if train_crop not in TRAIN_CROPS:
            raise ValueError(f"{self.name}: train_crop={train_crop!r}; allowed: {', '.join(TRAIN_CROPS)}")
        if image_size <= 0 or (pre_crop_size is not None and pre_crop_size < image_size):
            raise ValueError(
                f"{self.name}: need image_size > 0 and pre_crop_size >= image_size "
                f"(got image_size={image_size}, pre_crop_size={pre_crop_size})"
            )
        if max_per_class is not None and max_per_class <= 0:
            raise ValueError(
                f"{self.name}: max_per_class must be a positive int or null, got {max_per_class}"
            )
        extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        layout = f"<root>/{split or '.'}/<class>/*{{{','.join(extensions)}}}"
        require_dir(root, self.name, layout)
        split_dir = root / split if split else root
        if not split_dir.is_dir():
            near = split_dir.parent
            while not near.is_dir():  # list the deepest existing folder: usually a typo in the split
                near = near.parent
            there = sorted(p.name for p in near.iterdir() if p.is_dir())
            try:
                require_dir(split_dir, self.name, layout)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{e} Folders in '{near}': {there}") from None

        self.with_labels = with_labels
        self.samples: list[tuple[Path, int]] = []
        if with_labels:
            self.class_names: list[str] = list_classes(split_dir, class_names, self.name)
            for label, cls in enumerate(self.class_names):
                files = list_images(split_dir / cls, extensions, self.name)
                self.samples += [(f, label) for f in subsample(files, max_per_class, subset_seed + label)]
        else:
            self.class_names = [str(c) for c in class_names or []]
            files = list_images_below(split_dir, extensions, self.name)
            self.samples = [(f, -1) for f in subsample(files, max_per_class, subset_seed)]
        self.num_classes = len(self.class_names)
        self.targets = torch.tensor([t for _, t in self.samples], dtype=torch.int64)

        self.image_size, self.base_size = image_size, pre_crop_size or image_size
        self.train, self.train_crop, self.hflip = train, train_crop, hflip
        if transform is not None and not callable(transform):
            raise TypeError(f"{self.name}: transform must be callable, got {type(transform).__name__}")
        self.transform = transform
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.cache: torch.Tensor | None = None
        if cache_in_memory:
            self.cache = torch.stack([self._load(i) for i in range(len(self.samples))])

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> torch.Tensor:
        """The deterministic part: decode, 3 channels, resize to the ``base_size`` square (uint8)."""
        img = read_rgb(self.samples[i][0])
        if tuple(img.shape[-2:]) != (self.base_size, self.base_size):
            img = TF.resize(img, [self.base_size, self.base_size], InterpolationMode.BILINEAR, antialias=True)
        return img

    def _crop(self, img: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        mode = self.train_crop if self.train else "center"
        if mode == "random_resized":
            top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
            return TF.resized_crop(img, top, left, h, w, [s, s], InterpolationMode.BILINEAR, antialias=True)
        if mode == "none" and self.base_size != s:
            return TF.resize(img, [s, s], InterpolationMode.BILINEAR, antialias=True)
        if mode == "random" and self.base_size > s:
            top, left = (int(torch.randint(0, self.base_size - s + 1, ())) for _ in range(2))
            return img[:, top : top + s, left : left + s]
        return TF.center_crop(img, [s, s]) if self.base_size != s else img

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img = self.cache[i] if self.cache is not None else self._load(i)
        img = self._crop(img)
        if self.train and self.hflip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        image = img.float().div_(255.0)
        if self.train and self.transform is not None:
            image = self.transform(image)
        out = {"image": image}
        if self.with_labels:
            out["label"] = self.targets[i].clone()
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, images={len(self)}, classes={self.num_classes}, "
            f"image_size={self.image_size}, train={self.train}, cached={self.cache is not None})"
        )
