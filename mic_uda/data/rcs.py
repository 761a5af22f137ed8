"""Rare Class Sampling (DAFormer; SPEC 2), with the class statistics computed and cached automatically.

Each source sample is drawn as (class, image, crop) instead of by index, as the official
``UDADataset.get_rare_class_sample`` (MIC/DAFormer ``mmseg/datasets/uda_dataset.py``):

1. class ``c`` with P(c) = softmax((1 - f_c) / T) over the classes that occur, where f_c is the share of
   c among all labelled source pixels (255 excluded) and T the temperature (0.01);
2. an image uniformly among those with more than ``min_pixels`` pixels of c (strictly more, official
   ``pixels > min_pixels``);
3. the random crop: one crop and up to ``max_crop_redraws`` (10) re-drawn ones until a crop holds more
   than the crop threshold of pixels of c (strictly; the last re-draw is kept unchecked, at most 11
   crops). Every crop, first or re-drawn, is the source pipeline's ``RandomCrop``: with the dataset's
   ``cat_max_ratio`` (0.75 in the papers) it is itself re-drawn up to 10 times while one class
   dominates (:meth:`PairedSegDataset.draw_crop`), as each official ``self.source[i1]`` call runs the
   whole pipeline. A crop threshold of 0 turns step 3's re-draw off (official ``min_crop_ratio=0``).

Units. Statistics are counted on the label files at their own resolution, and ``min_pixels`` (official:
3000) is compared with those counts, as in the official code. The crop threshold is in pixels of the
resized crop. ``min_crop_pixels`` sets it directly: the official code compares the resized crop with the
fixed ``min_crop_ratio * min_pixels = 0.5 * 3000 = 1500`` px (4x, 6000, for HRDA's 1024 crops), which
the benchmark data configs set (``min_crop_pixels: 1500``). With ``min_crop_pixels: null`` (the
``rcs/default.yaml`` default, for other datasets) it is scaled by the resize area instead:
``min_crop_ratio * min_pixels * (resized area / label area)``, i.e. "the crop holds at least half the
amount that made the image eligible", whatever the recipe's resize (GTA 1914x1052 -> 1280x704: ~671 px).
For small images lower ``min_pixels`` (3000 px is 0.15 % of a 1914x1052 GTA frame, DAFormer issue #60).

Cache. The per-image class counts are read once (every source label, with a progress bar) and stored
as JSON in ``cache_dir``, named by a hash of the label files (paths relative to their common folder,
file sizes) and of what decides the ids (reader, id mapping, class subset). The resize is not part of
the key: counts are at label resolution, so one cache serves every recipe. Writes are atomic.

Randomness. Draws come from a ``torch.Generator`` the wrapper owns, seeded from ``torch.initial_seed()``
of the process that samples plus the DDP rank in the main process, and re-created whenever that seed
changes. In training, UDADataModule's loaders seed torch for every sample from (run seed, stream
position) (mic_uda.data.resumable.seeded_sample), so each draw is a function of the sample's position in
the rank's data stream: the same in any worker, different across ranks, and identical after resuming
from a checkpoint (the loader's position is the whole state; :meth:`state_dict` is only needed when
sampling outside such a loader).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mic_uda.data.seg_files import IGNORE, PairedSegDataset

log = logging.getLogger(__name__)
STATS_VERSION = 1


@dataclass
class RCSConfig:
    enabled: bool = False
    temperature: float = 0.01
    min_pixels: int = 3000  # an image is eligible with > min_pixels of the class, at label-file resolution
    min_crop_ratio: float = 0.5  # with min_crop_pixels null: threshold = ratio * min_pixels * area scale
    min_crop_pixels: int | None = None  # the crop threshold in resized pixels (official: 0.5 * 3000 = 1500)
    max_crop_redraws: int = 10  # crops re-drawn after the first (official: 10, i.e. at most 11 crops)
    cache_dir: str | None = None  # None: ~/.cache/mic_uda/rcs
    stats_workers: int = 0  # DataLoader workers for the one-off label pass


def parse_rcs(cfg: Any) -> RCSConfig | None:
    """Validate an ``rcs`` config block (dict/DictConfig/RCSConfig); errors name the key."""
    if cfg is None or isinstance(cfg, RCSConfig):
        return cfg
    try:
        plain = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(RCSConfig), plain)
    except OmegaConfBaseException as e:
        allowed = list(RCSConfig.__dataclass_fields__)
        raise ValueError(
            f"invalid data.rcs config: {e} (allowed keys: {allowed})".replace("\n", " | ")
        ) from e
    out: RCSConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    bad_pixels = out.min_crop_pixels is not None and out.min_crop_pixels < 0
    if (
        out.temperature <= 0
        or out.min_pixels < 0
        or out.min_crop_ratio < 0
        or bad_pixels
        or out.max_crop_redraws < 0
    ):
        raise ValueError(
            f"data.rcs: expected temperature > 0, min_pixels >= 0, min_crop_ratio >= 0, "
            f"min_crop_pixels >= 0 (or null) and max_crop_redraws >= 0, got {out}"
        )
    return out


@dataclass
class ClassStats:
    """Pixels per class of every source label (N x C) and each label's (height, width) (N x 2)."""

    counts: np.ndarray
    sizes: np.ndarray


def _label_files(dataset: PairedSegDataset) -> list[Path]:
    labels = [lbl for _, lbl in dataset.pairs]
    if any(lbl is None for lbl in labels):
        raise ValueError(f"RCS needs source labels, but {dataset.name} was built with with_labels=false")
    return labels  # type: ignore[return-value]


def stats_key(dataset: PairedSegDataset) -> str:
    """Hash of the label files (relative paths, sizes) and of what maps their ids."""
    labels = _label_files(dataset)
    common = Path(os.path.commonpath([str(p.parent) for p in labels]))
    h = hashlib.sha256(json.dumps([STATS_VERSION, dataset.label_signature()], sort_keys=True).encode())
    for p in labels:
        h.update(f"{p.relative_to(common)}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()[:20]


class _LabelCounts(Dataset):
    def __init__(self, dataset: PairedSegDataset, labels: list[Path]) -> None:
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        label = self.dataset.read_label(self.labels[i])
        counts = torch.bincount(label[label != IGNORE].flatten(), minlength=self.dataset.num_classes)
        return counts, torch.tensor(label.shape)


def compute_stats(dataset: PairedSegDataset, workers: int = 0) -> ClassStats:
    """Reads every label once (``workers`` DataLoader processes) and counts its pixels per class."""
    labels = _label_files(dataset)
    loader = DataLoader(_LabelCounts(dataset, labels), batch_size=None, num_workers=workers)
    counts, sizes = [], []
    for c, s in tqdm(loader, total=len(labels), desc=f"RCS: class pixels of {dataset.name}", mininterval=2):
        counts.append(c.numpy())
        sizes.append(s.numpy())
    return ClassStats(np.stack(counts).astype(np.int64), np.stack(sizes).astype(np.int64))


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_path(dataset: PairedSegDataset, cache_dir: str | Path | None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "mic_uda" / "rcs"
    slug = "".join(ch if ch.isalnum() else "_" for ch in dataset.name)
    return root / f"{slug}-{stats_key(dataset)}.json"


def load_or_compute_stats(
    dataset: PairedSegDataset, cache_dir: str | Path | None = None, workers: int = 0
) -> ClassStats:
    """The cached statistics of ``dataset``'s labels, computed (and cached) on first use."""
    path = cache_path(dataset, cache_dir)
    n = len(dataset.pairs)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            stats = ClassStats(np.asarray(data["counts"], np.int64), np.asarray(data["sizes"], np.int64))
            if stats.counts.shape == (n, dataset.num_classes) and stats.sizes.shape == (n, 2):
                return stats
        except (ValueError, KeyError, TypeError):
            pass
        log.warning("RCS: ignoring the unreadable or mismatched cache %s; recomputing", path)
    stats = compute_stats(dataset, workers)
    _write_atomic(
        path,
        {
            "version": STATS_VERSION,
            "dataset": dataset.name,
            "signature": dataset.label_signature(),
            "counts": stats.counts.tolist(),
            "sizes": stats.sizes.tolist(),
        },
    )
    log.info("RCS: class statistics of %s cached in %s", dataset.name, path)
    return stats


def class_probabilities(class_pixels: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Classes that occur and P(c) = softmax((1 - f_c) / T), f_c their pixel shares."""
    classes = np.flatnonzero(class_pixels > 0)
    freq = torch.as_tensor(class_pixels[classes], dtype=torch.float64)
    probs = torch.softmax((1 - freq / freq.sum()) / temperature, dim=0)
    return classes, probs.numpy()


class RareClassSampling(Dataset):
    """A source dataset whose items are drawn by rare class sampling (the index only sets the length).

    Items look like the wrapped dataset's: ``image``, ``label`` and ``index`` (of the drawn image).
    """

    def __init__(
        self, dataset: PairedSegDataset, cfg: RCSConfig | Any, stats: ClassStats | None = None
    ) -> None:
        if not isinstance(dataset, PairedSegDataset):
            raise TypeError(
                f"data.rcs.enabled=true needs a file-based source dataset (mic_uda.data.seg_files."
                f"PairedSegDataset: GTA5, SYNTHIA, Cityscapes, FolderSegDataset, ...), got "
                f"{type(dataset).__name__}; set data.rcs.enabled=false"
            )
        self.dataset, self.cfg = dataset, parse_rcs(cfg) or RCSConfig(enabled=True)
        self.stats = stats or load_or_compute_stats(dataset, self.cfg.cache_dir, self.cfg.stats_workers)
        classes, probs = class_probabilities(self.stats.counts.sum(0), self.cfg.temperature)
        eligible = {int(c): np.flatnonzero(self.stats.counts[:, c] > self.cfg.min_pixels) for c in classes}
        keep = np.array([len(eligible[int(c)]) > 0 for c in classes], dtype=bool)
        if not keep.any():
            raise ValueError(
                f"RCS: no image of {dataset.name} has > {self.cfg.min_pixels} pixels of any class; "
                "lower data.rcs.min_pixels"
            )
        if not keep.all():
            log.warning(
                "RCS: classes %s occur in %s but no image has > %d pixels of them: never sampled",
                classes[~keep].tolist(),
                dataset.name,
                self.cfg.min_pixels,
            )
        self.classes = classes[keep]
        self.probs = torch.as_tensor(probs[keep] / probs[keep].sum())
        self.images_with_class = {int(c): torch.as_tensor(eligible[int(c)]) for c in self.classes}
        self._gen: torch.Generator | None = None
        self._owner: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def _generator(self) -> torch.Generator:
        owner = (os.getpid(), torch.initial_seed())
        if self._gen is None or self._owner != owner:
            in_worker = torch.utils.data.get_worker_info() is not None
            rank = dist.get_rank() if not in_worker and dist.is_available() and dist.is_initialized() else 0
            seed = (owner[1] * 1_000_003 + rank) % (2**63)
            self._gen, self._owner = torch.Generator().manual_seed(seed), owner
        return self._gen

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-seed their own generator
        return {**self.__dict__, "_gen": None, "_owner": None}

    def state_dict(self) -> dict[str, Any]:
        """The generator state, to resume the exact stream when sampling in the main process (workers
        derive theirs from the worker seed, which Lightning makes reproducible)."""
        return {"generator": self._generator().get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator().set_state(state["generator"])

    def crop_threshold(self, i: int) -> float:
        """Pixels of the drawn class a crop of image ``i`` must exceed (resized-image pixels)."""
        if self.cfg.min_crop_pixels is not None:
            return float(self.cfg.min_crop_pixels)
        h, w = (int(v) for v in self.stats.sizes[i])
        rh, rw = self.dataset.resized_size(h, w)
        return self.cfg.min_crop_ratio * self.cfg.min_pixels * (rh * rw) / float(h * w)

    def draw(self) -> tuple[int, int]:
        """(class, image index) of the next sample."""
        g = self._generator()
        c = int(self.classes[int(torch.multinomial(self.probs, 1, generator=g))])
        images = self.images_with_class[c]
        return c, int(images[int(torch.randint(len(images), (), generator=g))])

    def crop_for_class(
        self, c: int, image: torch.Tensor, label: torch.Tensor, threshold: float
    ) -> tuple[int, int]:
        """(top, left) of the crop: the pipeline's crop (with its ``cat_max_ratio`` re-draws), re-drawn up
        to ``max_crop_redraws`` times until it holds more than ``threshold`` pixels of ``c``."""
        g, size = self._generator(), self.dataset.crop_hw
        assert size is not None
        top, left = self.dataset.draw_crop(image, label, g)
        if threshold > 0:
            for _ in range(self.cfg.max_crop_redraws):
                if (label[top : top + size[0], left : left + size[1]] == c).sum().item() > threshold:
                    break
                top, left = self.dataset.draw_crop(image, label, g)
        return top, left

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        c, i = self.draw()
        g = self._generator()
        image, label = self.dataset.load(i)
        assert label is not None
        top, left = 0, 0
        if self.dataset.crop_hw is not None:
            top, left = self.crop_for_class(c, image, label, self.crop_threshold(i))
        return {**self.dataset.finish(image, label, top, left, g), "index": i}
