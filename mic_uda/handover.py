"""The model a training run hands over, and the evaluation at the end of training.

Why this exists: with ``method.student_bn=source`` the student's BatchNorm running statistics are the
source domain's while self-training (DACS/MIC) and alignment (SDAT) fit the network to target batches,
so ``last.ckpt`` normalises target images with the wrong mean and variance. Measured here (README): on
USPS -> MNIST-M the SDAT+MIC student scores ~8 points more with its BN statistics re-estimated on the
unlabelled target images (AdaBN) and as much as its EMA teacher; on CamVid day -> dusk the source-only
student ~10 mIoU more, the adapted ones within noise. Re-estimation reads no target label and costs
one pass over the target training images.

``handover=recalibrated`` (default): after training, the run evaluates the student as trained, the
teacher, and the student with re-estimated statistics side by side (``test/student/*``,
``test/teacher/*``, ``test/recalibrated/*``), and writes that recalibrated model to
``checkpoints/final.ckpt`` (atomically); ``last.ckpt`` stays the training state for exact resumption.
The reported ``primary_metric`` is the handed-over model's. ``handover=student``: the student as
trained (what the official code evaluates; the paper presets use it), recalibrated numbers still
reported. Networks without tracked BN statistics (LayerNorm-only, frozen BN) hand over the student.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from mic_uda.uda.bn import batchnorm_layers, check_choice, reestimate_bn_statistics

log = logging.getLogger("mic_uda")
HANDOVER_CHOICES = ("recalibrated", "student")


def check_handover(value: str) -> None:
    check_choice("handover", value, HANDOVER_CHOICES)


def has_running_bn(net: torch.nn.Module | None) -> bool:
    """Whether re-estimating BN statistics can change ``net`` at all."""
    return net is not None and any(bn.track_running_stats for bn in batchnorm_layers(net))


def adapt_bn_to_target(
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    seed: int = 0,
    networks: tuple[str, ...] = ("student", "teacher"),
) -> int:
    """AdaBN on the module's networks that keep running statistics; returns how many BN layers were
    re-estimated. The target set's random crop/flip draw from the global RNG, seeded here with
    ``seed`` inside a fork of it: the same statistics whether called at the end of training or by
    ``evaluate bn_stats=target``, and the caller's RNG streams are left as they were."""
    total = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in networks:
            net = getattr(model, name, None)
            if net is not None:  # a fresh pass per network: the images are never all held in memory
                images = (batch["image"] for batch in datamodule.target_eval_dataloader())
                n = reestimate_bn_statistics(net, images)
                total += n
                log.info(f"bn_stats=target: {n} BatchNorm layers of the {name} re-estimated on the target")
    model.train(False)  # restores the teacher's own BN mode
    return total


def recalibrated_metrics(test_metrics: dict[str, float]) -> dict[str, float]:
    """A test run of the recalibrated student: its ``test/student/*`` keys as ``test/recalibrated/*``
    (the teacher's are unchanged by the student's statistics and not repeated)."""
    prefix = "test/student/"
    return {
        "test/recalibrated/" + k[len(prefix) :]: v for k, v in test_metrics.items() if k.startswith(prefix)
    }
