"""SYNTHIA-RAND-CITYSCAPES (Ros et al.) as users unpack it: ``RGB/*.png``, ``GT/LABELS/*.png``.

The labels are 16-bit RGB PNGs with the class id in the first channel. PIL opens such files as 8-bit
RGB and keeps only the high byte of each sample, which is 0 for every class id (checked on a generated
16-bit PNG), so they are decoded with torchvision's libpng decoder instead: no conversion script, no
extra dependency. Labels converted by DAFormer's script (``GT/LABELS/<stem>_labelTrainIds.png``, 8-bit
train ids) are used when present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torchvision.io import ImageReadMode, decode_png, read_file

from mic_uda.data.seg_files import PairedSegDataset, _pairs_by_stem, require_dir, sorted_glob

SYNTHIA_LAYOUT = (
    "<root>/RGB/*.png and <root>/GT/LABELS/*.png (same file names; 16-bit PNG, SYNTHIA class id in channel 0)"
)

# SYNTHIA class id -> Cityscapes train id (DAFormer's table, from SYNTHIA-RAND-CITYSCAPES' README).
# 16 terrain, 18 truck and 20 train do not occur in SYNTHIA; 0 void, 13 parking-slot, 14 road-work and
# 22 lanemarking -> ignore.
SYNTHIA_ID_TO_TRAIN_ID: dict[int, int] = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    16: 9,
    1: 10,
    10: 11,
    17: 12,
    8: 13,
    18: 14,
    19: 15,
    20: 16,
    12: 17,
    11: 18,
}
# The Cityscapes train ids SYNTHIA has (16 classes) and the 13 without wall, fence and pole: the two
# evaluation protocols of the SYNTHIA -> Cityscapes benchmark (conf/data/synthia2cs_16.yaml, _13.yaml).
SYNTHIA_16_CLASSES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA_13_CLASSES = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)


def read_png_first_channel(path: Path) -> torch.Tensor:
    """Channel 0 of a PNG of any bit depth (8 or 16) as int64, decoded by libpng."""
    try:
        raw = decode_png(read_file(str(path)), mode=ImageReadMode.UNCHANGED)
    except RuntimeError as e:
        raise OSError(f"{path}: cannot read label PNG ({e})") from e
    return raw[0].to(torch.int64)


class SYNTHIA(PairedSegDataset):
    """SYNTHIA-RAND-CITYSCAPES, 9400 frames of 1280x760 (DAFormer recipe: kept at 1280x760, 512 crops)."""

    READ_DEFAULTS: ClassVar[dict[str, Any]] = {"resize": (1280, 760), "crop_size": 512}

    def __init__(
        self,
        root: str | Path,
        with_labels: bool = True,
        **options: Any,
    ) -> None:
        root = Path(root)
        images = sorted_glob(
            require_dir(root / "RGB", "SYNTHIA", SYNTHIA_LAYOUT), "*.png", "SYNTHIA", SYNTHIA_LAYOUT
        )
        mapping: dict[int, int] | None = SYNTHIA_ID_TO_TRAIN_ID
        pairs: list[tuple[Path, Path | None]] = [(p, None) for p in images]
        if with_labels:
            gt = require_dir(root / "GT" / "LABELS", "SYNTHIA", SYNTHIA_LAYOUT)
            converted = (gt / f"{images[0].stem}_labelTrainIds.png").is_file()
            suffix, mapping = ("_labelTrainIds.png", None) if converted else (".png", mapping)
            pairs = _pairs_by_stem(images, lambda p: gt / f"{p.stem}{suffix}", True, "SYNTHIA")
        self.read_files(pairs, 19, mapping, "SYNTHIA", options)

    def read_ids(self, path: Path) -> torch.Tensor:
        return read_png_first_channel(path)
