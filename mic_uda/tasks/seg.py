"""Semantic-segmentation UDA: one LightningModule for source-only, oracle, DACS and MIC.

The student and its EMA teacher live here; the method's loss terms are modules of their own
(:mod:`mic_uda.tasks.seg_terms`, called through one :class:`SegStep` per step), the maths is in
:mod:`mic_uda.uda`. Methods switch terms on (``fd``, ``mix``, ``mic``) through :class:`MethodConfig`.
Manual optimisation: each term is back-propagated as soon as it is computed (as the official code
does), so only one graph is alive at a time, then one optimiser step and the fused EMA update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from mic_uda.models.seg_base import SegNetwork
from mic_uda.tasks.base import UDAModuleBase
from mic_uda.tasks.seg_terms import SegStep, build_seg_terms
from mic_uda.uda.bn import frozen_bn_statistics
from mic_uda.uda.pseudo_label import confidence_weight, pseudo_label_from_logits
from mic_uda.utils.metrics import format_iou_table, iou_from_confusion, mean_iou


class SegUDAModule(UDAModuleBase):
    """Student + EMA teacher for segmentation UDA (source-only, oracle, DACS, MIC)."""

    supported_terms = ("mix", "mic", "fd", "pipa", "rccr", "ir2f")
    primary_metric = "mIoU"

    def __init__(
        self,
        net: Mapping[str, Any],
        method: Mapping[str, Any],
        num_classes: int,
        class_names: Sequence[str],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        param_group_keys: Mapping[str, Mapping[str, float]] | None = None,
        ignore_index: int = 255,
        palette: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
        max_bad_steps: int = 20,
        miou_subsets: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """``miou_subsets``: extra mean IoUs over class subsets of the evaluation, by name (SYNTHIA's
        ``mIoU16`` / ``mIoU13``: averages of 16 / 13 of the 19 per-class IoUs, as the papers report)."""
        super().__init__(
            net,
            method,
            num_classes,
            class_names,
            optimizer,
            scheduler,
            param_group_keys,
            seed,
            max_bad_steps,
            ignore_index=ignore_index,
            palette=palette,
            miou_subsets=miou_subsets,
        )
        self.ignore_index = ignore_index
        self.miou_subsets = {str(k): [int(c) for c in v] for k, v in (miou_subsets or {}).items()}
        for key, ids in self.miou_subsets.items():
            if not key.startswith("mIoU") or any(not 0 <= c < num_classes for c in ids):
                raise ValueError(
                    f"data.miou_subsets.{key}: expected a name starting with 'mIoU' and class ids in "
                    f"[0, {num_classes}), got {ids}"
                )
        if not isinstance(self.student, SegNetwork):
            raise TypeError(
                f"backbone._target_ builds a {type(self.student).__name__}: a segmentation network must "
                "subclass mic_uda.models.seg_base.SegNetwork (forward, predict, train_loss)"
            )
        self.val_confusion = nn.ModuleDict(
            {
                name: MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
                for name in (["student", "teacher"] if self.teacher is not None else ["student"])
            }
        )
        self.last_iou: dict[str, torch.Tensor] = {}
        # the method's loss terms (mic_uda.tasks.seg_terms): built from the config, called in order
        self.terms = build_seg_terms(self.method, num_classes, ignore_index, self.student)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            for term in self.terms.values():
                term.setup_fit(self.pretrained_weights)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The student and the terms' own parameters (projection heads, auxiliary classifiers, ...)."""
        trainable: dict[str, nn.Module] = {"student": self.student}
        if any(p.requires_grad for p in self.terms.parameters()):
            trainable["terms"] = self.terms
        return trainable

    def after_ema(self, alpha: float) -> None:
        for term in self.terms.values():
            term.after_ema(alpha)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Mapping[str, torch.Tensor]], batch_idx: int) -> None:
        m, g = self.method, self.generator
        assert g is not None, "setup() creates the generator"
        src, tgt = batch["source"], batch["target"]
        sup = tgt if m.needs_target_labels else src
        source_terms = [(n, t) for n, t in self.terms.items() if t.stage == "source"]
        target_terms = [(n, t) for n, t in self.terms.items() if t.stage == "target"]
        step = SegStep(
            source=src,
            target=tgt,
            student=self.student,
            teacher=self.teacher,
            generator=g,
            step=self.global_step,
            max_steps=int(self.trainer.max_steps or 0) if self._trainer is not None else 0,
            ignore_index=self.ignore_index,
            augment=self.augment,
            mask_fill=self.mask_fill(),
        )
        logs = step.logs
        # the network answers for its own loss (HRDA: its multi-resolution loss) and, for the source
        # terms, for the feature views of that very pass (HRDA: LR context, HR detail)
        views = any(t.needs_views for _, t in source_terms)
        step.source_pass = step.network_loss(sup["image"], sup["label"], with_views=views)
        loss = step.source_pass.loss
        logs["train/loss_sup"] = loss.detach()
        logs.update(step.source_pass.logs)
        for name, term in source_terms:
            term_loss = term(step)
            logs[f"train/loss_{name}"] = term_loss.detach()
            loss = loss + term_loss
        self.manual_backward(loss)
        step.source_pass = None  # its graph is freed

        if self.teacher is not None:
            x_t = tgt["image"]
            with torch.no_grad():
                if any(t.needs_teacher_features for _, t in target_terms):
                    step.teacher_logits, step.teacher_stages = self.teacher.forward_with_features(x_t)
                else:
                    step.teacher_logits = self.teacher(x_t)
                pl, conf = pseudo_label_from_logits(step.teacher_logits)
            pc = m.pseudo_label
            weight = confidence_weight(
                conf, pc.threshold, pc.weight_scope, pc.ignore_top, pc.ignore_bottom, pc.weight_type
            )
            if "valid_mask" in tgt:  # pseudo-label margins of the uncropped frame (data.pseudo_margins)
                weight = weight * tgt["valid_mask"].to(weight)
            step.pseudo_label, step.pseudo_weight = pl, weight
            logs["train/pseudo_weight"] = weight.mean()
            # label-free health check: the share of each class in the pseudo-labels (a class that
            # never appears cannot be learned by self-training; a collapsing class shows here first)
            share = torch.bincount(pl.flatten(), minlength=self.num_classes).float() / pl.numel()
            logs.update({f"train/pl_share_{c}": s for c, s in zip(self.class_names, share)})
            with frozen_bn_statistics(self.student, enabled=m.student_bn == "source"):
                for name, term in target_terms:
                    term_loss = term(step)
                    if term_loss.requires_grad:  # a term before its start returns a plain zero
                        self.manual_backward(term_loss)
                    logs[f"train/loss_{name}"] = term_loss.detach()

        self.finish_step(logs)

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scores against ``label_native`` when the split keeps it (``native_label``): the logits are
        upsampled bilinearly (align_corners=False) to its size first, as the official test rescales
        them to ``ori_shape``. Returns the predictions at the network's resolution (for the writers)."""
        images, labels = batch["image"], batch.get("label_native", batch["label"])
        preds = {}
        for name, net in [("student", self.student), ("teacher", self.teacher)]:
            if net is None:
                continue
            logits = net.predict(images)
            preds[name] = logits.argmax(1)
            if logits.shape[-2:] != labels.shape[-2:]:
                logits = F.interpolate(
                    logits.float(), labels.shape[-2:], mode="bilinear", align_corners=False
                )
            self.val_confusion[name].update(logits.argmax(1), labels)
        return preds

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch)

    def _eval_epoch_end(self, prefix: str) -> None:
        for name, metric in self.val_confusion.items():
            iou = iou_from_confusion(metric.compute())
            metric.reset()
            self.last_iou[name] = iou.cpu()
            miou = mean_iou(iou)
            self.log(f"{prefix}/{name}/mIoU", 100 * miou if not math.isnan(miou) else miou, sync_dist=False)
            for cname, v in zip(self.class_names, iou.tolist()):
                self.log(f"{prefix}/{name}/IoU_{cname}", 100 * v, sync_dist=False)
            for key, ids in self.miou_subsets.items():
                self.log(f"{prefix}/{name}/{key}", 100 * mean_iou(iou[ids]), sync_dist=False)
        self.log(f"{prefix}/mIoU", 100 * mean_iou(self.last_iou["student"]), prog_bar=True)
        for key, ids in self.miou_subsets.items():
            self.log(f"{prefix}/{key}", 100 * mean_iou(self.last_iou["student"][ids]))

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def result_table(self) -> str:
        """Per-class IoU of the last evaluation, student and teacher side by side."""
        return format_iou_table(self.class_names, self.last_iou)
