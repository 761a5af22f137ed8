"""Callbacks that keep I/O and plotting out of the training step."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchvision.io import write_png

from mic_uda.utils.visualize import colourise

log = logging.getLogger("mic_uda")


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


class FinalModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` (and kept ``step_*.ckpt``) always hold the final weights.

    Lightning 2.6 saves every ``every_n_train_steps`` and, when training ends, writes ``last`` only if
    it was never written. With ``max_steps`` not a multiple of the interval, ``last.ckpt`` stayed at
    the previous multiple while the run's test metrics (and ``metrics.json``'s ``final/ckpt_path``)
    were of the final weights, and ``evaluate`` on it disagreed with the run.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips fast_dev_run, already-saved steps
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


class PreemptionCheckpoint(L.Callback):
    """SIGTERM (cluster pre-emption, ``scancel``, ``kill``): write ``<dirpath>/last.ckpt``, then stop.

    Lightning's own SIGTERM handling (``_SignalConnector``, lightning 2.6) only sets
    ``trainer.received_sigterm`` and, at the end of the current training step (or evaluation batch),
    raises ``SIGTERMException`` (a ``SystemExit``: the process exits with status 0); it writes no
    checkpoint (only the SLURM requeue signal does, see ``trainer=slurm``). This callback saves at the
    end of the step in which the signal arrived (the point ModelCheckpoint saves at, so the run resumes
    exactly with ``ckpt_path=last`` or ``auto``), or where Lightning stops if the signal came later in
    the step (after a validation batch, or at the end of an epoch).
    The decision is reduced over ranks, so every DDP rank saves at the same step.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self._saved_at: int | None = None

    def _save(self, trainer: L.Trainer, where: str) -> None:
        trainer.save_checkpoint(str(self.path))
        self._saved_at = trainer.global_step
        if trainer.is_global_zero:
            log.warning(
                "SIGTERM received: checkpoint of step %d written to %s (%s); stopping. "
                "Resume with ckpt_path=auto (or last) and the same run folder.",
                trainer.global_step,
                self.path,
                where,
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.strategy.reduce_boolean_decision(bool(trainer.received_sigterm), all=False):
            self._save(trainer, "end of a training step")
            raise SIGTERMException  # every rank, now (Lightning would raise per rank, maybe a step apart)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if isinstance(exception, SIGTERMException) and fitting and self._saved_at != trainer.global_step:
            self._save(trainer, "Lightning stopped at the end of an epoch or in a validation")


def _count_bad(batch: Any) -> int:
    if isinstance(batch, Mapping):
        n = batch.get("bad_samples")
        count = int(n.sum()) if isinstance(n, torch.Tensor) else 0
        return count + sum(_count_bad(v) for k, v in batch.items() if k != "bad_samples")
    return 0


class BadSampleCounter(L.Callback):
    """Logs how many unreadable samples ``data.on_bad_sample=skip`` replaced: ``train/bad_samples`` (source
    and target batches since the start of training, kept in checkpoints; under DDP rank 0's count) and
    ``val/bad_samples`` / ``test/bad_samples`` per evaluation (summed over ranks). Silent (logs nothing)
    in the default ``error`` mode, where such a sample stops the run."""

    def __init__(self) -> None:
        self.train_total = 0
        self.eval_count = 0
        self.seen = False

    def state_dict(self) -> dict[str, int]:
        return {"train_total": self.train_total}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.train_total = int(state_dict.get("train_total", 0))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if _has_key(batch):
            self.train_total += _count_bad(batch)
            pl_module.log("train/bad_samples", float(self.train_total), on_step=True, on_epoch=False)

    def _eval_batch(self, batch: Any) -> None:
        if _has_key(batch):
            self.seen = True
            self.eval_count += _count_bad(batch)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:  # type: ignore[no-untyped-def]
        self._eval_batch(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._eval_batch(batch)

    def _eval_end(self, pl_module: L.LightningModule, prefix: str) -> None:
        if self.seen:
            pl_module.log(f"{prefix}/bad_samples", float(self.eval_count), reduce_fx="sum", sync_dist=True)
        self.eval_count, self.seen = 0, False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(pl_module, "test")


def _has_key(batch: Any) -> bool:
    if isinstance(batch, Mapping):
        return "bad_samples" in batch or any(_has_key(v) for v in batch.values())
    return False
