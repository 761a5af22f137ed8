"""Image-classification UDA: one LightningModule for source-only, oracle, SDAT, MIC and SDAT+MIC.

Terms (switched on by the method config, maths in :mod:`mic_uda.uda`):
- ``sam``: sharpness-aware minimisation as the official SDAT / SDAT+MIC code: the gradient of the
  task terms (source CE + MCC [+ the probability-weighted masked loss]) on the same joint
  [source, target] batch and the same masked image, weights moved to ``w + e``, the full loss
  (+ CDAN) computed there, weights restored, optimiser step;
- ``cdan``: conditional domain discriminator behind gradient reversal (plain CDAN as the official
  runs; entropy conditioning, CDAN+E, an option);
- ``mcc``: minimum class confusion on the target predictions;
- ``mic``: the student on a strongly augmented, block-masked target image against the EMA teacher's
  pseudo-label of the clean image, each sample weighted by the teacher's probability.
With ``cdan``/``mcc`` source and target go through the student as one batch (as SDAT), so the
"supervised" pass that updates BatchNorm statistics sees both domains; the masked pass follows
``method.student_bn``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from mic_uda.tasks.base import UDAModuleBase
from mic_uda.uda import sam
from mic_uda.uda.adversarial import ConditionalDomainAdversarial, grl_coefficient
from mic_uda.uda.bn import frozen_bn_statistics
from mic_uda.uda.masking import apply_mask, block_mask
from mic_uda.uda.mcc import mcc_loss
from mic_uda.uda.pseudo_label import confidence_weight, pseudo_label_from_logits
from mic_uda.utils.metrics import (
    class_accuracy_from_confusion,
    format_accuracy_table,
    nan_mean,
    overall_accuracy,
)

PRIMARY_METRICS = ("acc", "mean_class_acc")


class ClsUDAModule(UDAModuleBase):
    """Student (+ EMA teacher, + domain discriminator) for classification UDA."""

    supported_terms = ("mic", "cdan", "mcc", "sam")

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
        primary_metric: str = "acc",
    ) -> None:
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
            primary_metric=primary_metric,
        )
        if primary_metric not in PRIMARY_METRICS:
            raise ValueError(f"task.primary_metric={primary_metric!r} is not one of {list(PRIMARY_METRICS)}")
        self.primary_metric = primary_metric
        if not hasattr(self.student, "forward_with_features") or not hasattr(self.student, "feature_dim"):
            raise ValueError(
                f"task=cls needs a classification backbone (mic_uda.models.classifier.ImageClassifier, e.g. "
                f"backbone=resnet18_cls|resnet50|vit_b16), got {type(self.student).__name__}"
            )
        c = self.method.cdan
        self.adversarial: ConditionalDomainAdversarial | None = None
        if c is not None:
            self.adversarial = ConditionalDomainAdversarial(
                self.student.feature_dim,
                num_classes,
                c.hidden_dim,
                c.entropy_conditioning,
                c.randomized_dim,
                seed,
            )
        self.val_confusion = nn.ModuleDict(
            {
                name: MulticlassConfusionMatrix(num_classes)
                for name in (["student", "teacher"] if self.teacher is not None else ["student"])
            }
        )
        self.last_confusion: dict[str, torch.Tensor] = {}

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The discriminator trains with the same settings (SDAT's ``ad_optimizer``); SAM perturbs only
        the classifier."""
        modules: dict[str, nn.Module] = {"student": self.student}
        if self.adversarial is not None:
            modules["discriminator"] = self.adversarial
        return modules

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Mapping[str, torch.Tensor]], batch_idx: int) -> None:
        m, g = self.method, self.generator
        assert g is not None, "setup() creates the generator"
        src, tgt = batch["source"], batch["target"]
        sup = tgt if m.needs_target_labels else src
        x_s, y_s, x_t = sup["image"], sup["label"], tgt["image"]
        logs: dict[str, torch.Tensor] = {}
        n = x_s.shape[0]
        joint = m.cdan is not None or m.mcc is not None
        x = torch.cat([x_s, x_t]) if joint else x_s
        masked = self._masked_target(x_t, g) if m.mic is not None else None  # one mask for both passes

        offsets: list = []
        if m.sam is not None:  # SAM step 1: ascend along the gradient of the task terms at w
            logits = self.student(x)
            ascent = F.cross_entropy(logits[:n], y_s)
            if m.mcc is not None:
                ascent = ascent + m.mcc.weight * mcc_loss(logits[n:], m.mcc.temperature)
            if masked is not None:
                ascent = ascent + self._masked_loss(masked, weighted=True)
            self.manual_backward(ascent)
            logs["train/loss_sam_ascent"] = ascent.detach()
            offsets = sam.perturb(self.student.parameters(), m.sam.rho)
            for p in self.student.parameters():
                p.grad = None

        logits, feats = self.student.forward_with_features(x)
        loss = F.cross_entropy(logits[:n], y_s)
        logs["train/loss_sup"] = loss.detach()
        if self.adversarial is not None:
            coeff = grl_coefficient(self.global_step, m.cdan.grl_max_iters)
            adv = m.cdan.weight * self.adversarial(feats[:n], logits[:n], feats[n:], logits[n:], coeff)
            logs["train/loss_cdan"] = adv.detach()
            logs["train/grl_coeff"] = torch.tensor(coeff)
            logs["train/discriminator_acc"] = self.adversarial.discriminator_accuracy
            loss = loss + adv
        if m.mcc is not None:
            mcc = m.mcc.weight * mcc_loss(logits[n:], m.mcc.temperature)
            logs["train/loss_mcc"] = mcc.detach()
            loss = loss + mcc
        self.manual_backward(loss)

        if masked is not None:
            mic = self._masked_loss(masked, weighted=not m.mic.official_unweighted_update)
            self.manual_backward(mic)
            logs["train/loss_mic"] = mic.detach()
            logs["train/pseudo_weight"] = masked[2].mean()
        sam.restore(offsets)  # SAM step 2: back to w, step with the gradients taken at w + e
        self.finish_step(logs)

    def _masked_target(
        self, x_t: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MIC's inputs: the augmented, block-masked target image, the EMA teacher's pseudo-label of
        the clean image and its per-sample weight."""
        assert self.teacher is not None
        m = self.method
        with torch.no_grad():
            pl, conf = pseudo_label_from_logits(self.teacher(x_t))
        pc = m.pseudo_label
        weight = confidence_weight(conf, pc.threshold, pc.weight_scope, weight_type=pc.weight_type)
        b, _, h, w = x_t.shape
        keep = block_mask(b, h, w, m.mic.block_size, m.mic.ratio, g, device=x_t.device).to(x_t.dtype)
        return apply_mask(self.augment(x_t, g), keep, self.mask_fill()), pl, weight

    def _masked_loss(
        self, masked: tuple[torch.Tensor, torch.Tensor, torch.Tensor], weighted: bool
    ) -> torch.Tensor:
        """The student on the masked image vs the pseudo-label; ``weighted=False`` is the official
        update step's plain CE (``method.mic.official_unweighted_update``)."""
        m = self.method
        x_k, pl, weight = masked
        with frozen_bn_statistics(self.student, enabled=m.student_bn == "source"):
            ce = F.cross_entropy(self.student(x_k), pl, reduction="none")
        return m.mic.weight * ((ce * weight).mean() if weighted else ce.mean())

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Mapping[str, torch.Tensor]) -> None:
        images, labels = batch["image"], batch["label"]
        self.val_confusion["student"].update(self.student(images).argmax(1), labels)
        if self.teacher is not None:
            self.val_confusion["teacher"].update(self.teacher(images).argmax(1), labels)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_epoch_end(self, prefix: str) -> None:
        for name, metric in self.val_confusion.items():
            confusion = metric.compute().cpu()
            metric.reset()
            self.last_confusion[name] = confusion
            per_class = class_accuracy_from_confusion(confusion)
            self.log(f"{prefix}/{name}/acc", 100 * overall_accuracy(confusion))
            self.log(f"{prefix}/{name}/mean_class_acc", 100 * nan_mean(per_class))
            for cname, v in zip(self.class_names, per_class.tolist()):
                self.log(f"{prefix}/{name}/acc_{cname}", 100 * v if not math.isnan(v) else v)
        student = self.last_confusion["student"]
        self.log(f"{prefix}/acc", 100 * overall_accuracy(student), prog_bar=self.primary_metric == "acc")
        self.log(
            f"{prefix}/mean_class_acc",
            100 * nan_mean(class_accuracy_from_confusion(student)),
            prog_bar=self.primary_metric == "mean_class_acc",
        )

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def result_table(self) -> str:
        """Per-class accuracy of the last evaluation, student and teacher side by side."""
        return format_accuracy_table(
            self.class_names,
            {k: class_accuracy_from_confusion(v) for k, v in self.last_confusion.items()},
            {k: overall_accuracy(v) for k, v in self.last_confusion.items()},
        )
