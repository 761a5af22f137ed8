"""One end-to-end test per task family that fails when nothing is learned (a broken loss, optimiser,
data pairing or evaluation): short source-only runs through the real entry point against fixed,
generous floors, measured far above what an untrained network scores.

Measured on this 2-core CPU (one thread): seg 150 steps 27.6 / 28.5 mIoU (seeds 0 / 1) vs 0.2-2.6
after 3 steps; cls USPS -> MNIST-M 200 steps 28.2 % (chance 10 %); det 80 steps: the supervised loss
2.37 -> 0.78 (its mAP50 is too small and thread-dependent to be a floor)."""

from __future__ import annotations

import csv
from pathlib import Path

from mic_uda.train import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_seg_source_only_learns_the_embedded_default(make_cfg) -> None:
    cfg = make_cfg(
        [
            "method=source_only",
            "trainer.max_steps=150",
            "trainer.val_check_interval=150",
            "task.module.optimizer.lr=0.001",
            "task.module.scheduler.warmup_steps=10",
            "handover=student",
        ]
    )
    miou = train(cfg)["test/mIoU"]
    print(f"seg source-only learning mIoU: {miou:.2f}")
    assert miou > 15.0


def test_cls_source_only_learns_usps_to_mnistm(make_cfg) -> None:
    cfg = make_cfg(
        [
            "experiment=usps2mnistm_source_only",
            f"paths.data_dir={SHARED}",
            "trainer=cpu",
            "logger=csv",
            "trainer.max_steps=200",
            "trainer.val_check_interval=200",
            "~callbacks.progress_bar",
            "+trainer.enable_progress_bar=false",
            "handover=student",
        ],
        tiny=False,
    )
    assert train(cfg)["test/acc"] > 18.0  # 10 classes: chance is 10 %


def test_det_source_only_fits_the_embedded_boxes(make_cfg) -> None:
    cfg = make_cfg(
        [
            "task=det",
            "method=source_only",
            "trainer.max_steps=80",
            "trainer.val_check_interval=80",
            "task.module.optimizer.lr=0.02",
            "task.module.scheduler.warmup_steps=10",
            "data.datamodule.source.dataset.num_images=32",
        ]
    )
    metrics = train(cfg)
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss_sup"]) for r in csv.DictReader(f) if r.get("train/loss_sup")]
    first, last = losses[0], sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    # mAP50 after 80 steps on the embedded boxes is ~0-2 and depends on the thread count (0.0 with 1
    # thread at 160 steps, 1.7 at 80): no learning floor there; the evaluation must still run
    assert 0.0 <= metrics["test/mAP50"] <= 100.0
