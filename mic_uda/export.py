"""Benchmark-server export of segmentation predictions: ``python -m mic_uda.evaluate ckpt_path=...
data=... export=cityscapes|trainid [export_dir=...]``.

For every image of the evaluation split (``data.datamodule.val``, or ``.test`` where the data config
has one) the network's logits are upsampled bilinearly (``align_corners=False``) to the image file's
own resolution, which is its label's (what evaluation scores against with ``native_label``, and what the
servers compare with), and their argmax is written as an 8-bit single-channel PNG:

- ``export=cityscapes``: Cityscapes **label ids** (train id 0..18 -> 7, 8, 11, 12, 13, 17, 19, 20, 21,
  22, 23, 24, 25, 26, 27, 28, 31, 32, 33), written as ``<export_dir>/<city>/<city>_<seq>_<frame>_
  leftImg8bit.png``, mirroring ``leftImg8bit/<split>/<city>/``. This is what the Cityscapes server and
  cityscapesscripts' ``evalPixelLevelSemanticLabeling.py`` read: for each ground-truth file the script
  searches the results folder (recursively) for exactly one ``<city>_<seq>_<frame>*.png``, which must
  be one channel of label ids at the ground truth's size (2048x1024); 255 / unknown ids are an error
  there, and an argmax never writes one. The input file names must follow the Cityscapes pattern.
- ``export=trainid``: **train ids** (0..C-1 of the network; a ``class_subset`` split such as
  SYNTHIA's 16 classes is mapped back to the 19 Cityscapes train ids), written flat as
  ``<export_dir>/<image stem>.png`` (e.g. ``GOPR0356_frame_000321_rgb_anon.png``). This is what the
  official DAFormer/HRDA/MIC code submits to the ACDC and Dark Zurich servers (their README:
  ``tools/test.py ... --test-set --format-only --eval-option imgfile_prefix=labelTrainIds
  to_label_id=False``; mmseg's ``CityscapesDataset.results2img`` writes ``<prefix>/<basename>.png``,
  its palette is only a colouring of the same indices). Zip the folder for the upload. Not verified
  here: the Dark Zurich server's uncertainty-aware metric (UIoU) also takes confidence maps, which are
  not written; its mIoU needs only the train ids.

An evaluation split without labels (a benchmark test split: ``data.datamodule.val.split=test
++data.datamodule.val.with_labels=false``) is exported without scoring; a labelled one is scored as
usual and exported. ``export_network``: ``student`` (what ``test/mIoU`` scores) or ``teacher``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from mic_uda.data.datamodule import eval_collate

log = logging.getLogger("mic_uda")

EXPORT_MODES = ("cityscapes", "trainid")
EXPORT_NETWORKS = ("student", "teacher")
#: Cityscapes train id (index) -> label id, the inverse of mic_uda.data.seg_files.CITYSCAPES_ID_TO_TRAIN_ID
CITYSCAPES_TRAIN_ID_TO_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
#: what cityscapesscripts parses from a file name: <city>_<6-digit sequence>_<6-digit frame>_...
CITYSCAPES_FILE = re.compile(r"^[A-Za-z-]+_\d{6}_\d{6}_")


def output_values(mode: str, num_outputs: int, class_subset: Sequence[int] | None = None) -> torch.Tensor:
    """The pixel value written for each network output (a lookup table indexed by the argmax).

    ``class_subset``: the Cityscapes train ids of the outputs when the split was renumbered to a subset
    (e.g. SYNTHIA's 16 classes); without it, output k is train id k."""
    if mode not in EXPORT_MODES:
        raise ValueError(f"export={mode!r} is not one of {list(EXPORT_MODES)} (or null)")
    if class_subset is not None:
        ids = [int(c) for c in class_subset]
        if len(ids) != num_outputs:
            raise ValueError(
                f"export: the network has {num_outputs} outputs but the split's class_subset lists "
                f"{len(ids)} train ids"
            )
    else:
        ids = list(range(num_outputs))
    if mode == "cityscapes":
        if class_subset is None and num_outputs != len(CITYSCAPES_TRAIN_ID_TO_ID):
            raise ValueError(
                f"export=cityscapes writes Cityscapes label ids of the 19 train ids; this network has "
                f"{num_outputs} classes (export=trainid writes its own class ids)"
            )
        if any(not 0 <= c < len(CITYSCAPES_TRAIN_ID_TO_ID) for c in ids):
            raise ValueError(f"export=cityscapes: train ids {ids} are not all Cityscapes train ids 0..18")
        ids = [CITYSCAPES_TRAIN_ID_TO_ID[c] for c in ids]
    if max(ids) > 254:
        raise ValueError(f"export: {num_outputs} classes do not fit an 8-bit PNG below 255")
    return torch.tensor(ids, dtype=torch.uint8)


def export_name(image: Path, mode: str) -> Path:
    """The PNG a server expects for ``image``, relative to the export folder (see the module doc)."""
    if mode == "cityscapes":
        if not CITYSCAPES_FILE.match(image.name):
            raise ValueError(
                f"export=cityscapes: '{image}' is not a Cityscapes file name (<city>_<seq>_<frame>_"
                "leftImg8bit.png), which the Cityscapes server matches predictions by; export=trainid "
                "writes <image stem>.png"
            )
        return Path(image.parent.name) / f"{image.stem}.png"
    return Path(f"{image.stem}.png")


def base_dataset(dataset: Any) -> Any:
    """The file-based dataset under the datamodule's wrappers (bad-sample skipping, hidden labels)."""
    while not hasattr(dataset, "pairs") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if not hasattr(dataset, "pairs"):
        raise TypeError(
            f"export needs a file-based segmentation split (image files to name the predictions by); "
            f"the evaluation split is a {type(dataset).__name__}"
        )
    return dataset


class _Writer(L.LightningModule):
    """``trainer.predict`` on this writes the PNGs (device, precision and ranks as the trainer's)."""

    def __init__(
        self, net: nn.Module, values: torch.Tensor, images: list[Path], names: list[Path], out: Path
    ):
        super().__init__()
        self.net, self.images, self.names, self.out = net, images, names, out
        self.register_buffer("values", values, persistent=False)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> int:
        logits = self.net.predict(batch["image"])
        for i, index in enumerate(batch["index"].tolist()):
            width, height = Image.open(self.images[index]).size  # the header only
            up = F.interpolate(
                logits[i : i + 1].float(), (height, width), mode="bilinear", align_corners=False
            )
            write_png_atomic(self.out / self.names[index], self.values[up.argmax(1)[0]].cpu().numpy())
        return len(batch["index"])


def write_png_atomic(path: Path, array: np.ndarray) -> None:
    """An 8-bit one-channel PNG, written next to ``path`` and renamed over it (ranks may share a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array.astype(np.uint8), mode="L").save(tmp, format="PNG")
    os.replace(tmp, path)


@dataclass
class BenchmarkExport:
    """What ``export=...`` writes, checked before anything runs (:meth:`from_config`)."""

    mode: str
    out_dir: Path
    network: str
    net: nn.Module
    values: torch.Tensor
    images: list[Path]
    names: list[Path]
    labelled: bool
    datamodule: L.LightningDataModule

    @classmethod
    def from_config(
        cls, cfg: Any, model: L.LightningModule, datamodule: L.LightningDataModule
    ) -> BenchmarkExport | None:
        """None unless ``cfg.export`` is set; errors (mode, network, file names, classes) are raised
        here, before the evaluation runs."""
        mode = cfg.get("export")
        if not mode:
            return None
        if mode not in EXPORT_MODES:
            raise ValueError(f"export={mode!r} is not one of {list(EXPORT_MODES)} (or null)")
        if not hasattr(model, "last_iou"):
            raise ValueError(f"export={mode} writes segmentation maps; this is not a seg checkpoint")
        network = cfg.get("export_network", "student")
        if network not in EXPORT_NETWORKS or getattr(model, network, None) is None:
            raise ValueError(
                f"export_network={network!r}: expected one of {list(EXPORT_NETWORKS)} that the checkpoint "
                f"has (teacher: methods with a mean teacher)"
            )
        datamodule.setup("test")
        dataset = base_dataset(datamodule.datasets["test"])
        images = [Path(img) for img, _ in dataset.pairs]
        names = [export_name(p, mode) for p in images]
        seen: dict[Path, Path] = {}
        for img, name in zip(images, names):
            if name in seen:
                raise ValueError(f"export={mode}: '{seen[name]}' and '{img}' would both be written to {name}")
            seen[name] = img
        values = output_values(mode, int(model.num_classes), getattr(dataset, "class_subset", None))
        labelled = all(lbl is not None for _, lbl in dataset.pairs)
        out_dir = Path(cfg.get("export_dir") or Path(cfg.paths.output_dir) / "export")
        net = getattr(model, network)
        return cls(mode, out_dir, network, net, values, images, names, labelled, datamodule)

    def run(self, trainer_cfg: Any) -> dict[str, Any]:
        """Writes every image's PNG; returns a summary (for metrics.json)."""
        trainer: L.Trainer = instantiate(
            trainer_cfg, callbacks=[], logger=False, enable_checkpointing=False, enable_progress_bar=False
        )
        writer = _Writer(self.net, self.values, self.images, self.names, self.out_dir)
        dm = self.datamodule
        loader = DataLoader(  # in file order (the datamodule's evaluation order is a fixed shuffle)
            dm.datasets["test"],
            batch_size=getattr(dm, "val_batch_size", 1),
            num_workers=getattr(dm, "num_workers", 0),
            collate_fn=eval_collate,
        )
        trainer.predict(writer, dataloaders=loader, return_predictions=False)
        log.info("export=%s: %d PNGs of the %s in %s", self.mode, len(self.names), self.network, self.out_dir)
        return {
            "mode": self.mode,
            "dir": str(self.out_dir),
            "images": len(self.names),
            "network": self.network,
            "scored": self.labelled,
        }
