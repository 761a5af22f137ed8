"""BDD100K semantic segmentation (Yu et al.), optionally only the frames of one time of day.

Layout: ``images/10k/<split>/*.jpg``, ``labels/sem_seg/masks/<split>/<stem>.png`` (19 train ids). The 10k
segmentation set carries no time-of-day tag itself; it is looked up by file name in the detection
labels' attributes (``labels/bdd100k_labels_images_<split>.json``, a list of ``{"name", "attributes":
{"timeofday"}}`` entries, as in BDD100K's 2018 and ``det_20`` releases).

Quirks of the published files: the 10k frames are not split as the 100k detection set is. A 10k ``train``
frame can be listed only in the ``val`` json (bdd100k issue #132) and some 10k frames are in neither json
(issues #22, #120). Each frame is therefore looked up in both splits' jsons (its own split's first; the
other's when present); frames in neither are left out, with one warning naming their count.

``split_file``: a list of frames replaces the lookup, e.g. the hand-checked night list most night-time
papers use instead of the noisy ``timeofday`` tag. One list may span train and val: a line is a stem, a
file name (``<stem>.jpg``) or a path ending in ``<split>/<stem>.jpg`` (e.g. ``images/10k/val/x.jpg``); a
dataset keeps the listed frames found in its own ``images/10k/<split>`` (a line naming a split only in
that split), and a listed frame found in neither split folder is an error naming it and the list.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

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


BDD100K_SPLITS = ("train", "val")


def read_frame_list(path: Path, shown: str, split: str, images_dir: Path) -> list[str]:
    """Stems of ``split`` in a frame list (``split_file``, ``shown`` in errors) that may span train and
    val (module docstring): those found in ``images_dir / split``; a frame in no split folder is an error."""
    lines = read_split_file(path, "BDD100K", BDD100K_LAYOUT)
    splits = [*BDD100K_SPLITS, *([split] if split not in BDD100K_SPLITS else [])]
    present = {s: {p.stem for p in (images_dir / s).glob("*.jpg")} for s in splits}
    stems: list[str] = []
    for line in lines:
        entry = PurePosixPath(line.replace("\\", "/"))
        stem = entry.stem if entry.suffix.lower() in (".jpg", ".png") else entry.name
        named = entry.parent.name if entry.parent.name in present else None
        found = [s for s in ([named] if named else splits) if stem in present[s]]
        if not found:
            where = images_dir / (named or split) / f"{stem}.jpg"
            others = [str(images_dir / s) for s in splits if s != split and not named]
            nor = f" (nor in {', '.join(others)})" if others else ""
            raise FileNotFoundError(f"BDD100K: '{where}' listed in '{shown}' does not exist{nor}")
        if split in found:
            stems.append(stem)
    return stems


class BDD100K(PairedSegDataset):
    """BDD100K 10k segmentation frames (1280x720), by default only ``night`` ones (cs2bdd_night)."""

    READ_DEFAULTS: ClassVar[dict[str, Any]] = {"resize": (1280, 720), "crop_size": 512}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        time_of_day: str | None = "night",
        attributes_json: str = "labels/bdd100k_labels_images_{split}.json",
        split_file: str | None = None,
        with_labels: bool = True,
        **options: Any,
    ) -> None:
        root = Path(root)
        img_dir = require_dir(root / "images" / "10k" / split, "BDD100K", BDD100K_LAYOUT)
        images = sorted_glob(img_dir, "*.jpg", "BDD100K", BDD100K_LAYOUT)
        if split_file is not None:
            listed = read_frame_list(root / split_file, split_file, split, root / "images" / "10k")
            if not listed:
                raise ValueError(
                    f"BDD100K: '{split_file}' lists no frame of '{img_dir}' (its frames are all in the other "
                    "split's folder)"
                )
            keep = set(listed)
            images = [p for p in images if p.stem in keep]
            selection = split_file
        elif time_of_day is not None:
            if time_of_day not in BDD100K_TIMES:
                raise ValueError(
                    f"BDD100K: time_of_day '{time_of_day}': expected one of {BDD100K_TIMES} or null"
                )
            json_path = root / attributes_json.format(split=split)
            tags = read_time_of_day(json_path)  # its own split's json must be there
            looked_in = [json_path]
            for other in BDD100K_SPLITS:  # 10k frames are listed in the other split's json too (#132)
                other_path = root / attributes_json.format(split=other)
                if other_path != json_path and other_path.is_file():
                    tags = {**read_time_of_day(other_path), **tags}  # its own split's entry wins
                    looked_in.append(other_path)
            in_jsons = " or ".join(f"'{j}'" for j in looked_in)
            kept = [p for p in images if tags.get(p.name) == time_of_day]
            if not kept:
                raise ValueError(
                    f"BDD100K: none of the {len(images)} images in '{img_dir}' is tagged timeofday="
                    f"'{time_of_day}' in {in_jsons} (frames are matched by file name)"
                )
            untagged = sum(p.name not in tags for p in images)
            if untagged:
                log.warning(
                    "BDD100K/%s: %d of %d frames have no entry in %s and are left out",
                    split,
                    untagged,
                    len(images),
                    in_jsons,
                )
            images, selection = kept, time_of_day
        else:
            selection = "all"
        mask_dir = root / "labels" / "sem_seg" / "masks" / split
        if with_labels:
            require_dir(mask_dir, "BDD100K", BDD100K_LAYOUT)
        pairs = _pairs_by_stem(images, lambda p: mask_dir / f"{p.stem}.png", with_labels, "BDD100K")
        name = f"BDD100K/{split}/{selection}"
        self.read_files(pairs, 19, None, name, options)
