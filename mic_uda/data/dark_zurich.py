"""Dark Zurich (Sakaridis et al.) in its published layout: ``rgb_anon/<split>/<night|day|twilight>/<seq>/
*_rgb_anon.png``; labels only for ``val/night``: ``gt/val/night/<seq>/*_gt_labelTrainIds.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from mic_uda.data.seg_files import PairedSegDataset, pair_train_id_labels, require_dir, sorted_glob

DARK_ZURICH_TIMES = ("night", "day", "twilight")
DARK_ZURICH_LAYOUT = (
    "<root>/rgb_anon/<train|val|test>/<night|day|twilight>/<sequence>/*_rgb_anon.png; labels only for "
    "val/night: <root>/gt/val/night/<sequence>/*_gt_labelTrainIds.png (training images are unlabelled: "
    "use with_labels=false there)"
)


class DarkZurich(PairedSegDataset):
    """Dark Zurich, 1920x1080 frames. The UDA target is ``train/night`` (2416 unlabelled frames), the
    evaluation ``val/night`` (50 labelled). Recipe (DAFormer-scale): resized to 960x540, 512 crops."""

    READ_DEFAULTS: ClassVar[dict[str, Any]] = {"resize": (960, 540), "crop_size": 512}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        time_of_day: str = "night",
        with_labels: bool = True,
        **options: Any,
    ) -> None:
        root = Path(root)
        if time_of_day not in DARK_ZURICH_TIMES:
            raise ValueError(f"Dark Zurich: time_of_day '{time_of_day}': expected one of {DARK_ZURICH_TIMES}")
        img_dir = require_dir(root / "rgb_anon" / split / time_of_day, "Dark Zurich", DARK_ZURICH_LAYOUT)
        images = sorted_glob(img_dir, "*/*_rgb_anon.png", "Dark Zurich", DARK_ZURICH_LAYOUT)
        pairs: list[tuple[Path, Path | None]] = [(p, None) for p in images]
        mapping = None
        if with_labels:
            gt_dir = require_dir(root / "gt" / split / time_of_day, "Dark Zurich", DARK_ZURICH_LAYOUT)
            pairs, mapping = pair_train_id_labels(
                images,
                lambda p, kind: gt_dir / p.parent.name / p.name.replace("_rgb_anon.png", f"_gt_{kind}.png"),
                "Dark Zurich",
            )
        name = f"DarkZurich/{split}/{time_of_day}"
        self.read_files(pairs, 19, mapping, name, options)
