"""Object-detection UDA: one LightningModule for source-only, oracle, SADA, MIC and SADA+MIC.

Terms (method config; maths in :mod:`mic_uda.uda` and the network):
- ``sada``: image-level (per FPN level) and instance-level (ROI) domain discriminators behind
  gradient reversal + their consistency (:mod:`mic_uda.uda.sada`, the official MIC det code's); the
  target ROIs are ``target_proposals`` (official 256) random training-mode RPN proposals per image,
  drawn with the module's generator;
- ``mic``: the EMA teacher's detections on the clean target image with score >= threshold (0.8, the
  official ``>=``) are pseudo ground truth; the student sees a photometrically augmented, block-masked
  target image (block 32, ratio 0.5) and is trained with the RPN objectness and ROI classification
  losses only, optionally confidence-weighted (``mic.confidence_weight: prob``, the official
  PSEUDO_LABEL_WEIGHT). As official (engine/trainer.py:243-246, 325-345), only target images with at
  least one pseudo box enter the masked batch; with none the term is an exact zero (no pass, no
  backward) and ``train/mic_images`` logs 0.
Augmentation is photometric only, so boxes stay valid; images stay in [0, 1] (no 0..255 clamp).

BatchNorm: the student's passes follow ``method.student_bn`` (``source``: only the supervised pass
updates running statistics; the SADA target pass and the masked pass normalise with their batch
statistics but leave the buffers alone); the teacher keeps ``method.teacher.bn`` through every
forward (``FasterRCNNDetector.forward`` changes no layer's mode).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from mic_uda.data.boxes import unpad_targets
from mic_uda.tasks.base import UDAModuleBase
from mic_uda.uda.adversarial import grl_coefficient
from mic_uda.uda.bn import frozen_bn_statistics
from mic_uda.uda.masking import apply_mask, block_mask
from mic_uda.uda.sada import ScaleAwareAlignment
from mic_uda.utils.metrics import format_iou_table, nan_mean

#: the losses the masked target image trains (SPEC section 4): no box regression on pseudo boxes
MIC_DET_LOSSES = ("loss_objectness", "loss_classifier")


def pseudo_targets(
    detections: Sequence[Mapping[str, torch.Tensor]], threshold: float
) -> list[dict[str, torch.Tensor]]:
    """Teacher detections with score >= ``threshold`` as targets (boxes, labels; official ``>=``,
    engine/trainer.py:334); may be empty."""
    out = []
    for d in detections:
        keep = d["scores"] >= threshold
        out.append({"boxes": d["boxes"][keep].detach(), "labels": d["labels"][keep].detach()})
    return out


class DetUDAModule(UDAModuleBase):
    """Faster R-CNN student (+ EMA teacher, + SADA discriminators) for detection UDA."""

    supported_terms = ("mic", "sada")
    primary_metric = "mAP50"

    def __init__(
        self,
        net: Mapping[str, Any],
        method: Mapping[str, Any],
        num_classes: int,
        class_names: Sequence[str],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        param_group_keys: Mapping[str, Mapping[str, float]] | None = None,
        seed: int = 0,
        max_bad_steps: int = 20,
    ) -> None:
        super().__init__(
            net, method, num_classes, class_names, optimizer, scheduler, param_group_keys, seed, max_bad_steps
        )
        if not hasattr(self.student, "supervised"):
            raise ValueError(
                "task=det needs a detection backbone (mic_uda.models.detector.FasterRCNNDetector, e.g. "
                f"backbone=fasterrcnn_r50_fpn|fasterrcnn_mobilenet_fpn), got {type(self.student).__name__}"
            )
        s = self.method.sada
        self.alignment: ScaleAwareAlignment | None = None
        if s is not None:
            self.alignment = ScaleAwareAlignment(
                self.student.feature_channels,
                self.student.instance_dim,
                self.student.feature_levels,
                roi_levels=len(self.student.roi_feature_levels),
                image_weight=s.image_weight,
                instance_weight=s.instance_weight,
                consistency_weight=s.consistency_weight,
                image_grl=s.image_grl,
                instance_grl=s.instance_grl,
                consistency_grl=s.consistency_grl,
                instance_heads=s.instance_heads,
            )
        names = ["student", "teacher"] if self.teacher is not None else ["student"]
        self.val_map = nn.ModuleDict(
            {n: MeanAveragePrecision(iou_thresholds=[0.5], class_metrics=True) for n in names}
        )
        self.last_ap: dict[str, torch.Tensor] = {}

    def trainable_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"student": self.student}
        if self.alignment is not None:
            modules["alignment"] = self.alignment
        return modules

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Mapping[str, torch.Tensor]], batch_idx: int) -> None:
        m, g = self.method, self.generator
        assert g is not None, "setup() creates the generator"
        src, tgt = batch["source"], batch["target"]
        sup = tgt if m.needs_target_labels else src
        logs: dict[str, torch.Tensor] = {}

        sup_pass = self.student.supervised(sup["image"], unpad_targets(sup["boxes"], sup["labels"]))
        loss = sum(sup_pass.losses.values())
        logs.update({f"train/det_{k}": v.detach() for k, v in sup_pass.losses.items()})
        logs["train/loss_sup"] = loss.detach()
        if self.alignment is not None:
            with frozen_bn_statistics(self.student, enabled=m.student_bn == "source"):
                tgt_pass = self.student.unsupervised_features(tgt["image"], generator=g)
            ramp = m.sada.grl_max_iters
            scale = grl_coefficient(self.global_step, ramp) if ramp > 0 else 1.0
            parts = self.alignment(sup_pass, tgt_pass, self.student.pool_rois, grl_scale=scale)
            logs["train/grl_coeff"] = torch.tensor(scale)
            logs.update({f"train/sada_{k}": v.detach() for k, v in parts.items() if k != "total"})
            logs["train/loss_sada"] = parts["total"].detach()
            loss = loss + parts["total"]
        self.manual_backward(loss)

        if m.mic is not None:
            logs.update(self._mic_term(tgt["image"], g))
        self.finish_step(logs)

    def _mic_term(self, x_t: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        """The masked target pass; mask and augmentation are drawn for every target image (so the
        generator stream does not depend on the teacher), then the images without a pseudo box are
        dropped (official: ``masked_target_images[pseudo_masks]``)."""
        assert self.teacher is not None
        m = self.method
        with torch.no_grad():
            targets = pseudo_targets(self.teacher(x_t), m.pseudo_label.threshold)
        b, _, h, w = x_t.shape
        keep = block_mask(b, h, w, m.mic.block_size, m.mic.ratio, g, device=x_t.device).to(x_t.dtype)
        x_k = apply_mask(self.augment(x_t, g), keep, self.mask_fill())
        boxed = [i for i, t in enumerate(targets) if len(t["boxes"]) > 0]
        n_boxes = sum(len(t["boxes"]) for t in targets)
        logs = {
            "train/pseudo_boxes_per_image": torch.tensor(n_boxes / b),
            "train/mic_images": torch.tensor(float(len(boxed))),
        }
        if not boxed:  # nothing to learn from: an exact zero, no pass and no backward
            logs["train/loss_mic"] = torch.zeros((), device=x_t.device)
            return logs
        with frozen_bn_statistics(self.student, enabled=m.student_bn == "source"):
            masked = self.student.supervised(
                x_k[boxed], [targets[i] for i in boxed], confidence_weight=m.mic.confidence_weight
            )
        loss = m.mic.weight * sum(masked.losses[k] for k in MIC_DET_LOSSES)
        self.manual_backward(loss)
        logs["train/loss_mic"] = loss.detach()
        return logs

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Mapping[str, torch.Tensor]) -> None:
        targets = unpad_targets(batch["boxes"], batch["labels"])
        self.val_map["student"].update(self.student(batch["image"]), targets)
        if self.teacher is not None:
            self.val_map["teacher"].update(self.teacher(batch["image"]), targets)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def _per_class_ap(self, result: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """AP@0.5 per class 1..K in class order (NaN for classes absent from the split)."""
        ap = torch.full((self.num_classes,), float("nan"))
        classes = result["classes"].view(-1).tolist()
        values = result["map_per_class"].view(-1).tolist()
        for c, v in zip(classes, values):
            if 1 <= c <= self.num_classes and v >= 0:
                ap[c - 1] = v
        return ap

    def _eval_epoch_end(self, prefix: str) -> None:
        for name, metric in self.val_map.items():
            result = metric.compute()
            metric.reset()
            ap = self._per_class_ap(result)
            self.last_ap[name] = ap
            mean = nan_mean(ap)
            self.log(f"{prefix}/{name}/mAP50", 100 * mean if not math.isnan(mean) else mean)
            for cname, v in zip(self.class_names, ap.tolist()):
                self.log(f"{prefix}/{name}/AP50_{cname}", 100 * v if not math.isnan(v) else v)
        student = self.last_ap["student"]
        mean = nan_mean(student)
        self.log(f"{prefix}/mAP50", 100 * mean if not math.isnan(mean) else mean, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def result_table(self) -> str:
        """Per-class AP@0.5 of the last evaluation, student and teacher side by side."""
        return format_iou_table(self.class_names, self.last_ap, mean_label="mAP50")
