"""BDD100K semantic segmentation (Yu et al.), optionally only the frames of one time of day.

Layout: ``images/10k/<split>/*.jpg``, ``labels/sem_seg/masks/<split>/<stem>.png`` (19 train ids). The 10k
segmentation set carries no time-of-day tag itself; it is looked up by file name in the detection
labels' attributes (``labels/bdd100k_labels_images_<split>.json``, a list of ``{"name", "attributes":
{"timeofday"}}`` entries, as in BDD100K's 2018 and ``det_20`` releases). Frames missing from that file
are left out (counted in a warning). A list of stems (``split_file``) replaces the lookup, e.g. to skip
parsing the large json on every start.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from mic_uda.data.seg_files import (
    PairedSegDataset,
    _pairs_by_stem,
    read_split_file,
    require_dir,
    sorted_glob,
)

log = logging.getLogger(__name__)

BDD100K_LAYOUT = (
    "<root>/images/10k/<train|val>/*.jpg, <root>/labels/sem_seg/masks/<train|val>/<stem>.png and, to select "
    "a time of day, <root>/labels/bdd100k_labels_images_<split>.json (attributes.timeofday) or a split_file"
)
BDD100K_TIMES = ("daytime", "night", "dawn/dusk", "undefined")


def read_time_of_day(json_path: Path) -> dict[str, str | None]:
    """File name -> ``attributes.timeofday`` from a BDD100K detection label file."""
    if not json_path.is_file():
        raise FileNotFoundError(
            f"BDD100K: attribute file '{json_path}' not found (needed to select a time_of_day). "
            f"Expected layout: {BDD100K_LAYOUT}; or give split_file, or time_of_day=null for all frames"
        )
    try:
        entries = json.loads(json_path.read_text())
        return {e["name"]: (e.get("attributes") or {}).get("timeofday") for e in entries}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(
            f"{json_path}: expected a json list of {{'name': ..., 'attributes': {{'timeofday': ...}}}} ({e})"
        ) from e


class BDD100K(PairedSegDataset):
    """BDD100K 10k segmentation frames (1280x720), by default only ``night`` ones (cs2bdd_night)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        time_of_day: str | None = "night",
        attributes_json: str = "labels/bdd100k_labels_images_{split}.json",
        split_file: str | None = None,
        with_labels: bool = True,
        resize: Sequence[int] | None = (1280, 720),
        crop_size: int | Sequence[int] | None = 512,
        hflip: bool = False,
        cat_max_ratio: float = 1.0,
        class_subset: Sequence[int] | None = None,
        keep_ratio: bool = False,
        native_label: bool = False,
        pad_crop: bool = False,
        pseudo_margins: Sequence[int] | None = None,
    ) -> None:
        root = Path(root)
        img_dir = require_dir(root / "images" / "10k" / split, "BDD100K", BDD100K_LAYOUT)
        images = sorted_glob(img_dir, "*.jpg", "BDD100K", BDD100K_LAYOUT)
        if split_file is not None:
            keep = set(read_split_file(root / split_file, "BDD100K", BDD100K_LAYOUT))
            missing = sorted(keep - {p.stem for p in images})
            if missing:
                raise FileNotFoundError(
                    f"BDD100K: '{img_dir / missing[0]}.jpg' listed in '{split_file}' does not exist"
                )
            images = [p for p in images if p.stem in keep]
            selection = split_file
        elif time_of_day is not None:
            if time_of_day not in BDD100K_TIMES:
                raise ValueError(
                    f"BDD100K: time_of_day '{time_of_day}': expected one of {BDD100K_TIMES} or null"
                )
            json_path = root / attributes_json.format(split=split)
            tags = read_time_of_day(json_path)
            kept = [p for p in images if tags.get(p.name) == time_of_day]
            if not kept:
                raise ValueError(
                    f"BDD100K: none of the {len(images)} images in '{img_dir}' is tagged timeofday="
                    f"'{time_of_day}' in '{json_path}' (frames are matched by file name)"
                )
            untagged = sum(p.name not in tags for p in images)
            if untagged:
                log.warning(
                    "BDD100K/%s: %d of %d frames have no entry in %s and are left out",
                    split,
                    untagged,
                    len(images),
                    json_path,
                )
            images, selection = kept, time_of_day
        else:
            selection = "all"
        mask_dir = root / "labels" / "sem_seg" / "masks" / split
        if with_labels:
            require_dir(mask_dir, "BDD100K", BDD100K_LAYOUT)
        pairs = _pairs_by_stem(images, lambda p: mask_dir / f"{p.stem}.png", with_labels, "BDD100K")
        name = f"BDD100K/{split}/{selection}"
        super().__init__(
            pairs,
            19,
            None,
            resize,
            crop_size,
            hflip,
            name,
            cat_max_ratio,
            class_subset,
            keep_ratio=keep_ratio,
            native_label=native_label,
            pad_crop=pad_crop,
            pseudo_margins=pseudo_margins,
        )
