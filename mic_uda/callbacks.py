"""Callbacks that keep I/O and plotting out of the training step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchvision.io import write_png

from mic_uda.utils.visualize import colourise


class SegPredictionWriter(L.Callback):
    """Writes ``image | label | student | teacher`` PNG strips of the evaluated split into ``out_dir``."""

    def __init__(
        self,
        out_dir: str | Path,
        palette: Sequence[Sequence[int]],
        max_images: int = 50,
        ignore_index: int = 255,
    ) -> None:
        self.out_dir, self.palette = Path(out_dir), palette
        self.max_images, self.ignore_index, self.written = max_images, ignore_index, 0

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.is_global_zero or not isinstance(outputs, dict):
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for i in range(batch["image"].shape[0]):
            if self.written >= self.max_images:
                return
            panels = [
                (batch["image"][i].clamp(0, 1) * 255).round().to(torch.uint8).cpu(),
                colourise(batch["label"][i], self.palette, self.ignore_index),
            ]
            panels += [colourise(p[i], self.palette, self.ignore_index) for p in outputs.values()]
            index = int(batch["index"][i]) if "index" in batch else self.written
            write_png(torch.cat(panels, dim=-1), str(self.out_dir / f"{index:06d}.png"))
            self.written += 1
