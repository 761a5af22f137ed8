"""ACDC (Sakaridis et al.) in its published layout, conditions read directly (no restructuring):
``rgb_anon/<cond>/<split>/<seq>/*_rgb_anon.png``, ``gt/<cond>/<split>/<seq>/*_gt_labelTrainIds.png``.

Also the flat layout MIC's README has users make with ``rsync -a data/acdc/rgb_anon/*/train/*/*
data/acdc/rgb_anon/train/`` (and ``val``; ``gt/*/<split>/*/*_labelTrainIds.png`` -> ``gt/<split>/``):
``rgb_anon/<split>/*_rgb_anon.png``, ``gt/<split>/*_gt_labelTrainIds.png`` (files found recursively, as
mmseg's scan). The per-condition folders are read when all the asked conditions have one (after the rsync
both layouts are there: the same frames); the flat folder otherwise, which holds all four conditions
mixed (its file names do not say the condition), so it serves only ``conditions`` = all four.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from mic_uda.data.seg_files import PairedSegDataset, pair_train_id_labels, require_dir, sorted_glob

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
ACDC_LAYOUT = (
    "<root>/rgb_anon/<fog|night|rain|snow>/<train|val|test>/<sequence>/*_rgb_anon.png and "
    "<root>/gt/<condition>/<train|val>/<sequence>/*_gt_labelTrainIds.png (or *_gt_labelIds.png); or MIC's "
    "flat copy <root>/rgb_anon/<train|val>/*_rgb_anon.png and <root>/gt/<train|val>/*_gt_labelTrainIds.png"
)


class ACDC(PairedSegDataset):
    """ACDC, 1920x1080 frames; all four conditions together by default, as in the MIC/HRDA benchmark.
    Recipe (DAFormer-scale): resized to 960x540, 512 crops."""

    READ_DEFAULTS: ClassVar[dict[str, Any]] = {"resize": (960, 540), "crop_size": 512}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        conditions: Sequence[str] = ACDC_CONDITIONS,
        with_labels: bool = True,
        **options: Any,
    ) -> None:
        root, conditions = Path(root), [conditions] if isinstance(conditions, str) else list(conditions)
        unknown = [c for c in conditions if c not in ACDC_CONDITIONS]
        if unknown or not conditions:
            raise ValueError(
                f"ACDC: conditions {conditions}: expected a non-empty subset of {ACDC_CONDITIONS}"
            )
        flat = root / "rgb_anon" / split
        per_condition = all((root / "rgb_anon" / c / split).is_dir() for c in conditions)
        if not per_condition and flat.is_dir():
            if sorted(conditions) != sorted(ACDC_CONDITIONS):
                raise ValueError(
                    f"ACDC: conditions {conditions} need the per-condition folders "
                    f"'{root / 'rgb_anon' / '<condition>' / split}'; the flat '{flat}' mixes all four"
                )
            pairs, mapping, name = self._flat(root, split, with_labels)
        else:
            pairs, mapping, name = self._per_condition(root, split, conditions, with_labels)
        self.read_files(pairs, 19, mapping, name, options)

    @staticmethod
    def _per_condition(
        root: Path, split: str, conditions: list[str], with_labels: bool
    ) -> tuple[list[tuple[Path, Path | None]], dict[int, int] | None, str]:
        images = []
        for cond in conditions:
            img_dir = require_dir(root / "rgb_anon" / cond / split, "ACDC", ACDC_LAYOUT)
            images += sorted_glob(img_dir, "*/*_rgb_anon.png", "ACDC", ACDC_LAYOUT)
        pairs: list[tuple[Path, Path | None]] = [(p, None) for p in images]
        mapping = None
        if with_labels:
            for cond in conditions:
                require_dir(root / "gt" / cond / split, "ACDC", ACDC_LAYOUT)
            pairs, mapping = pair_train_id_labels(
                images,
                lambda p, kind: (
                    root
                    / "gt"
                    / p.relative_to(root / "rgb_anon").parent
                    / p.name.replace("_rgb_anon.png", f"_gt_{kind}.png")
                ),
                "ACDC",
            )
        return pairs, mapping, f"ACDC/{split}/{'+'.join(conditions)}"

    @staticmethod
    def _flat(
        root: Path, split: str, with_labels: bool
    ) -> tuple[list[tuple[Path, Path | None]], dict[int, int] | None, str]:
        img_dir = root / "rgb_anon" / split
        images = sorted_glob(img_dir, "**/*_rgb_anon.png", "ACDC", ACDC_LAYOUT)
        pairs: list[tuple[Path, Path | None]] = [(p, None) for p in images]
        mapping = None
        if with_labels:
            gt_dir = require_dir(root / "gt" / split, "ACDC", ACDC_LAYOUT)
            pairs, mapping = pair_train_id_labels(
                images,
                lambda p, kind: (
                    gt_dir
                    / p.relative_to(img_dir).parent
                    / p.name.replace("_rgb_anon.png", f"_gt_{kind}.png")
                ),
                "ACDC",
            )
        return pairs, mapping, f"ACDC/{split}/all"
