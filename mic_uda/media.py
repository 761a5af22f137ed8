"""Prediction panels for the loggers and the run folder: a callback, no plotting in the training step.

At every validation (and every ``every_n_steps`` training steps) :class:`PredictionPanels` shows what
the model does on a few **fixed** target-validation images, so panels are comparable over time:

- segmentation: one strip per image, ``image | ground truth | student prediction | teacher
  pseudo-label | pseudo-label confidence | MIC-masked input | student prediction on it``
  (colourised with the dataset palette). The masked input comes from the module's own
  :func:`~mic_uda.uda.masking.block_mask`, :func:`~mic_uda.uda.masking.apply_mask` and strong
  augmentation, drawn from a generator seeded afresh each time, so every panel uses the same mask
  and augmentation. Without a teacher (source-only, oracle) the pseudo-label columns show the student's
  own prediction/confidence; without ``method.mic`` the masked columns are left out.
- classification: the row-normalised confusion matrix of student (and teacher) as an image, and the
  per-class accuracy table.
- detection: ``image | ground-truth boxes | student detections | teacher pseudo boxes | student
  detections on the MIC-masked input`` (torchvision ``draw_bounding_boxes``, class names as labels).

Panels go to W&B (``wandb.Image`` / ``wandb.Table``) when a W&B logger is active, to TensorBoard
(``add_image`` / ``add_text``) when one is active, and **always** to PNG/CSV/Markdown files under
``<out_dir>/step_XXXXXX/``. Cheap: no gradients, a handful of images, computed on every rank (so
collective BatchNorm layers stay in step) and written by rank 0 only; skipped in ``fast_dev_run``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchvision.io import write_png

from mic_uda.uda.masking import apply_mask, block_mask
from mic_uda.uda.pseudo_label import pseudo_label_from_logits
from mic_uda.utils.metrics import class_accuracy_from_confusion
from mic_uda.utils.visualize import colourise

GAP_PX = 2  # white separator between the columns of a strip


# --------------------------------------------------------------------------- pure helpers
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` float images ``(..., 3, H, W)`` -> uint8 on the CPU."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def grey(values: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` values in ``[0, 1]`` -> ``(N, 3, H, W)`` uint8 grey images (white = 1)."""
    return to_uint8(values.unsqueeze(1).expand(-1, 3, -1, -1))


def hstack(columns: Sequence[torch.Tensor], gap: int = GAP_PX) -> torch.Tensor:
    """Uint8 ``(3, H, W_i)`` images side by side, separated by ``gap`` white pixels."""
    h = columns[0].shape[-2]
    sep = torch.full((3, h, gap), 255, dtype=torch.uint8)
    parts: list[torch.Tensor] = []
    for i, c in enumerate(columns):
        parts += [sep, c] if i else [c]
    return torch.cat(parts, dim=-1)


def fallback_palette(num_classes: int) -> list[list[int]]:
    """Distinct colours for a dataset without a palette (golden-angle hues)."""
    import colorsys

    return [
        [round(255 * v) for v in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)]
        for i in range(num_classes)
    ]


@torch.no_grad()
def seg_panel_columns(
    module: Any, images: torch.Tensor, labels: torch.Tensor | None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The panel columns for a batch of target images, each ``(N, 3, H, W)`` uint8 on the CPU.

    ``module`` is a :class:`~mic_uda.tasks.seg.SegUDAModule` (student, optional teacher, ``method``,
    ``augment``, ``mask_fill``); it should be in eval mode (its teacher keeps its own BN policy).
    The MIC mask and augmentation come from ``torch.Generator().manual_seed(seed)``, never from the
    module's training generator, so calling this changes no training state.
    """
    palette = module.hparams.get("palette") or fallback_palette(module.num_classes)
    ignore = module.ignore_index
    images = images.to(module.device)
    student = module.student(images).argmax(1)
    cols: dict[str, torch.Tensor] = {"image": to_uint8(images)}
    if labels is not None:
        cols["ground truth"] = colourise(labels, palette, ignore)
    cols["student"] = colourise(student, palette, ignore)
    source, name = (module.teacher, "teacher") if module.teacher is not None else (module.student, "student")
    pl, conf = pseudo_label_from_logits(source(images))
    cols[f"{name} pseudo-label"] = colourise(pl, palette, ignore)
    cols[f"{name} confidence"] = grey(conf)
    mic = module.method.mic
    if mic is not None:
        g = torch.Generator().manual_seed(int(seed))
        b, _, h, w = images.shape
        keep = block_mask(b, h, w, mic.block_size, mic.ratio, g, device=images.device).to(images.dtype)
        masked = apply_mask(module.augment(images, g), keep, module.mask_fill())
        cols["MIC-masked input"] = to_uint8(masked)
        cols["student on masked"] = colourise(module.student(masked).argmax(1), palette, ignore)
    return cols


@torch.no_grad()
def det_panel_columns(
    module: L.LightningModule, fixed: dict[str, torch.Tensor], seed: int, score: float = 0.5
) -> dict[str, torch.Tensor]:
    """uint8 images per column for detection panels (boxes labelled with the class names)."""
    from torchvision.utils import draw_bounding_boxes

    from mic_uda.uda.masking import apply_mask, block_mask

    names = ["background", *module.class_names]
    images = fixed["image"].to(module.device)

    def draw(imgs: torch.Tensor, dets: Sequence[dict[str, torch.Tensor]], threshold: float) -> torch.Tensor:
        out = []
        for img, d in zip(to_uint8(imgs.cpu()), dets):
            keep = d.get("scores", torch.ones(len(d["boxes"]))).cpu() > threshold
            boxes, labels = d["boxes"].cpu()[keep], d["labels"].cpu()[keep]
            text = [names[int(c)] if int(c) < len(names) else str(int(c)) for c in labels]
            out.append(draw_bounding_boxes(img, boxes, text, colors="yellow", width=1))
        return torch.stack(out)

    cols = {"image": to_uint8(images.cpu())}
    if "boxes" in fixed:
        gt = [
            {"boxes": b[lab > 0], "labels": lab[lab > 0]} for b, lab in zip(fixed["boxes"], fixed["labels"])
        ]
        cols["ground truth"] = draw(images, gt, -1.0)
    cols["student"] = draw(images, module.student(images), score)
    method = module.method
    if module.teacher is not None:
        cols["teacher pseudo boxes"] = draw(images, module.teacher(images), method.pseudo_label.threshold)
    if method.mic is not None:
        g = torch.Generator().manual_seed(seed)
        b, _, h, w = images.shape
        keep = block_mask(b, h, w, method.mic.block_size, method.mic.ratio, g, device=images.device)
        masked = apply_mask(module.augment(images, g), keep.to(images.dtype), module.mask_fill())
        cols["student on MIC-masked"] = draw(masked, module.student(masked), score)
    return cols


def confusion_image(confusion: torch.Tensor, cell_px: int = 16) -> torch.Tensor:
    """Row-normalised confusion matrix (rows = true class) as a ``(3, C*cell, C*cell)`` uint8 image:
    white = 0, dark blue = 1 (the diagonal is the per-class accuracy); rows without samples grey."""
    c = confusion.double()
    support = c.sum(1, keepdim=True)
    frac = torch.where(support > 0, c / support.clamp_min(1), torch.full_like(c, float("nan")))
    low, high = torch.tensor([255.0, 255.0, 255.0]), torch.tensor([8.0, 48.0, 107.0])
    rgb = low + (high - low) * frac.nan_to_num(0.0).float().unsqueeze(-1)
    rgb[torch.isnan(frac)] = 200.0
    img = rgb.round().to(torch.uint8).permute(2, 0, 1)
    return img.repeat_interleave(cell_px, 1).repeat_interleave(cell_px, 2)


def class_accuracy_rows(
    class_names: Sequence[str], confusions: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the per-class accuracy table (percent; support from the first model)."""
    names = list(confusions)
    columns = ["class", "support", *(f"{n} acc" for n in names)]
    accs = {n: class_accuracy_from_confusion(c) for n, c in confusions.items()}
    support = next(iter(confusions.values())).sum(1)
    rows = []
    for i, cname in enumerate(class_names):
        cells: list[Any] = [cname, int(support[i])]
        cells += [
            round(100 * float(accs[n][i]), 2) if not math.isnan(float(accs[n][i])) else None for n in names
        ]
        rows.append(cells)
    return columns, rows


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("–" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the callback
class PredictionPanels(L.Callback):
    """Panels of fixed target-validation images at each validation and every ``every_n_steps``.

    Args:
        out_dir: panels are written to ``<out_dir>/step_XXXXXX/`` (always, whatever the loggers).
        every_n_steps: also after every this many training steps (segmentation); 0 = only validations.
        num_images: how many target-validation images (evenly spaced over the split, fixed for the run).
        seed: seeds the generator of the panels' MIC mask and augmentation (the same at every step).
        cell_px: side of one cell of the classification confusion-matrix image.
    """

    def __init__(
        self,
        out_dir: str | Path,
        every_n_steps: int = 2000,
        num_images: int = 4,
        seed: int = 0,
        cell_px: int = 16,
    ) -> None:
        if num_images < 1:
            raise ValueError(f"callbacks.prediction_panels.num_images must be >= 1, got {num_images}")
        if every_n_steps < 0:
            raise ValueError(f"callbacks.prediction_panels.every_n_steps must be >= 0, got {every_n_steps}")
        self.out_dir, self.every_n_steps, self.num_images = Path(out_dir), every_n_steps, num_images
        self.seed, self.cell_px = seed, cell_px
        self._fixed: dict[str, torch.Tensor] | None = None
        self._done: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._segmentation(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._segmentation(trainer, pl_module)
        self._classification(trainer, pl_module)
        self._detection(trainer, pl_module)

    # ------------------------------------------------------------------ what is drawn
    def _skip(self, trainer: L.Trainer, kind: str) -> bool:
        key = (kind, trainer.global_step)
        if trainer.fast_dev_run or key in self._done:
            return True
        self._done.add(key)
        return False

    def _segmentation(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "last_iou") or self._skip(trainer, "seg"):
            return
        fixed = self._fixed_images(trainer)
        if fixed is None:
            return
        modes = {m: m.training for m in pl_module.modules()}  # restored exactly (frozen parts stay eval)
        pl_module.eval()  # the teacher keeps its BN policy (UDAModuleBase.train)
        try:
            with trainer.precision_plugin.forward_context():
                cols = seg_panel_columns(pl_module, fixed["image"], fixed.get("label"), self.seed)
        finally:
            for m, training in modes.items():
                m.training = training
        if not trainer.is_global_zero:
            return
        names = list(cols)
        panels = [hstack([cols[n][i] for n in names]) for i in range(fixed["image"].shape[0])]
        folder = self._step_dir(trainer)
        captions = []
        for panel, index in zip(panels, fixed["index"].tolist()):
            write_png(panel, str(folder / f"target_val_{index:06d}.png"))
            captions.append(f"target val #{index}: " + " | ".join(names))
        (folder / "columns.txt").write_text(" | ".join(names) + "\n")
        self._send_images(trainer, "media/target_panels", panels, captions)

    def _classification(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        confusions: dict[str, torch.Tensor] = getattr(pl_module, "last_confusion", None) or {}
        if not confusions or not trainer.is_global_zero or self._skip(trainer, "cls"):
            return
        folder = self._step_dir(trainer)
        images = {n: confusion_image(c, self.cell_px) for n, c in confusions.items()}
        for n, img in images.items():
            write_png(img, str(folder / f"confusion_{n}.png"))
        columns, rows = class_accuracy_rows(pl_module.class_names, confusions)
        with (folder / "per_class_accuracy.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)
        (folder / "per_class_accuracy.md").write_text(markdown_table(columns, rows) + "\n")
        for n, img in images.items():
            self._send_images(
                trainer, f"media/confusion_{n}", [img], [f"{n}: rows = true class, row-normalised"]
            )
        self._send_table(trainer, "media/per_class_accuracy", columns, rows)

    def _detection(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Image | ground-truth boxes | student detections | teacher pseudo boxes | the MIC-masked input
        with the student's detections on it (boxes drawn with torchvision's draw_bounding_boxes)."""
        if not hasattr(pl_module, "last_ap") or self._skip(trainer, "det"):
            return
        fixed = self._fixed_images(trainer)
        if fixed is None:
            return
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                cols = det_panel_columns(pl_module, fixed, self.seed)
        finally:
            for m, training in modes.items():
                m.training = training
        if not trainer.is_global_zero:
            return
        names = list(cols)
        panels = [hstack([cols[n][i] for n in names]) for i in range(fixed["image"].shape[0])]
        folder = self._step_dir(trainer)
        for panel, index in zip(panels, fixed["index"].tolist()):
            write_png(panel, str(folder / f"target_val_boxes_{index:06d}.png"))
        (folder / "columns.txt").write_text(" | ".join(names) + "\n")
        self._send_images(trainer, "media/target_boxes", panels, [" | ".join(names)] * len(panels))

    # ------------------------------------------------------------------ data and output
    def _fixed_images(self, trainer: L.Trainer) -> dict[str, torch.Tensor] | None:
        """The same ``num_images`` target-validation samples for the whole run (cached on the CPU)."""
        if self._fixed is None:
            dm = trainer.datamodule
            loader = dm.val_dataloader() if dm is not None else trainer.val_dataloaders
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
            dataset = getattr(loader, "dataset", None)
            if dataset is None or len(dataset) == 0:
                return None
            n = min(self.num_images, len(dataset))
            indices = torch.linspace(0, len(dataset) - 1, n).round().long().unique().tolist()
            items = [dataset[i] for i in indices]
            fixed = {"image": torch.stack([it["image"] for it in items]), "index": torch.tensor(indices)}
            if all("label" in it for it in items):
                fixed["label"] = torch.stack([torch.as_tensor(it["label"]) for it in items])
            if all("boxes" in it for it in items):  # detection: padded boxes / labels (0 = padding)
                fixed["boxes"] = torch.stack([it["boxes"] for it in items])
                fixed["labels"] = torch.stack([it["labels"] for it in items])
            self._fixed = fixed
        return self._fixed

    def _step_dir(self, trainer: L.Trainer) -> Path:
        folder = self.out_dir / f"step_{trainer.global_step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @staticmethod
    def _send_images(trainer: L.Trainer, key: str, images: list[torch.Tensor], captions: list[str]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = trainer.global_step
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(
                    key, [img.permute(1, 2, 0).numpy() for img in images], step=step, caption=captions
                )
            elif isinstance(lg, TensorBoardLogger):
                for i, img in enumerate(images):
                    lg.experiment.add_image(f"{key}/{i}", img, global_step=step, dataformats="CHW")

    @staticmethod
    def _send_table(trainer: L.Trainer, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = trainer.global_step
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_table(key, columns=columns, data=rows, step=step)
            elif isinstance(lg, TensorBoardLogger):
                lg.experiment.add_text(key, markdown_table(columns, rows), global_step=step)
