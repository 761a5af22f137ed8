"""Semantic-segmentation UDA: one LightningModule for source-only, oracle, DACS and MIC.

The student, its EMA teacher and the method's loss terms live here; the maths is in
:mod:`mic_uda.uda`. Methods switch terms on (``mix``, ``mic``) through :class:`MethodConfig`.
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
from mic_uda.uda.bn import frozen_bn_statistics
from mic_uda.uda.feature_distance import ImageNetFeatureDistance
from mic_uda.uda.masking import apply_mask, block_mask
from mic_uda.uda.mixing import classmix_masks, mix
from mic_uda.uda.pseudo_label import confidence_weight, pseudo_label_from_logits
from mic_uda.utils.metrics import format_iou_table, iou_from_confusion, mean_iou


class SegUDAModule(UDAModuleBase):
    """Student + EMA teacher for segmentation UDA (source-only, oracle, DACS, MIC)."""

    supported_terms = ("mix", "mic", "fd")
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
        self.fd: ImageNetFeatureDistance | None = None
        if self.method.fd is not None:
            f = self.method.fd
            self.fd = ImageNetFeatureDistance(
                f.weight, f.classes, f.scale_min_ratio, num_classes, ignore_index
            )
            self.fd.build_reference(self.student, None)  # the ImageNet weights are loaded in setup

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.fd is not None:
            if not self.pretrained_weights:
                raise ValueError(
                    "method.fd compares with the ImageNet encoder: it needs backbone.weights (a local file)"
                )
            self.fd.load_reference(self.pretrained_weights)  # resuming restores it too

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Mapping[str, torch.Tensor]], batch_idx: int) -> None:
        m, g = self.method, self.generator
        assert g is not None, "setup() creates the generator"
        src, tgt = batch["source"], batch["target"]
        sup = tgt if m.needs_target_labels else src
        logs: dict[str, torch.Tensor] = {}

        # the network answers for its own loss (HRDA: its multi-resolution loss) and, for FD, for
        # the features of that very pass (HRDA: the low-resolution context)
        views = self.fd is not None
        out = self.student.train_loss(
            sup["image"], sup["label"], ignore_index=self.ignore_index, generator=g, with_views=views
        )
        loss = out.loss
        logs["train/loss_sup"] = loss.detach()
        logs.update(out.logs)
        if self.fd is not None:
            context = out.views["context"]
            fd, fd_mask = self.fd(context.image, context.labels, context.stages[-1])
            logs["train/loss_fd"] = fd.detach()
            logs["train/fd_cells"] = fd_mask.float().mean() if fd_mask is not None else torch.tensor(1.0)
            logs["train/fd_memory_mb"] = torch.tensor(self.fd.memory_bytes() / 2**20)
            loss = loss + fd
        self.manual_backward(loss)

        if self.teacher is not None:
            x_t = tgt["image"]
            with torch.no_grad():
                pl, conf = pseudo_label_from_logits(self.teacher(x_t))
            pc = m.pseudo_label
            weight = confidence_weight(
                conf, pc.threshold, pc.weight_scope, pc.ignore_top, pc.ignore_bottom, pc.weight_type
            )
            if "valid_mask" in tgt:  # pseudo-label margins of the uncropped frame (data.pseudo_margins)
                weight = weight * tgt["valid_mask"].to(weight)
            logs["train/pseudo_weight"] = weight.mean()
            # label-free health check: the share of each class in the pseudo-labels (a class that
            # never appears cannot be learned by self-training; a collapsing class shows here first)
            share = torch.bincount(pl.flatten(), minlength=self.num_classes).float() / pl.numel()
            logs.update({f"train/pl_share_{c}": s for c, s in zip(self.class_names, share)})
            with frozen_bn_statistics(self.student, enabled=m.student_bn == "source"):
                if m.mix is not None:
                    logs["train/loss_mix"] = self._mix_term(src, x_t, pl, weight, g)
                if m.mic is not None:
                    logs["train/loss_mic"] = self._mic_term(src, x_t, pl, weight, g)

        self.finish_step(logs)

    def _mix_term(
        self,
        src: Mapping[str, torch.Tensor],
        x_t: torch.Tensor,
        pl: torch.Tensor,
        weight: torch.Tensor,
        g: torch.Generator,
    ) -> torch.Tensor:
        """DACS: ClassMix source classes onto the target, strong aug, weighted CE to the mixed label."""
        mc = self.method.mix
        mask = classmix_masks(src["label"], g, self.ignore_index, mc.classes, mc.include_ignore).to(x_t)
        x_m = self.augment(mix(mask, src["image"], x_t), g)
        y_m = mix(mask, src["label"], pl)
        w_m = mix(mask, torch.ones_like(weight), weight)
        loss = self.method.mix.weight * self._network_loss(x_m, y_m, w_m, g)
        self.manual_backward(loss)
        return loss.detach()

    def _mic_term(
        self,
        src: Mapping[str, torch.Tensor],
        x_t: torch.Tensor,
        pl: torch.Tensor,
        weight: torch.Tensor,
        g: torch.Generator,
    ) -> torch.Tensor:
        """MIC: a fresh strong aug of the images (``mic.images``: the target with its clean-image
        pseudo-label and weight by default), block-masked, against those labels."""
        mc = self.method.mic
        images, labels, weights = self._mic_inputs(src, x_t, pl, weight)
        b, _, h, w = images.shape
        keep = block_mask(b, h, w, mc.block_size, mc.ratio, g, device=images.device).to(images.dtype)
        if mc.augment:
            images = self.augment(images, g)
        x_k = apply_mask(images, keep, self.mask_fill())
        loss = mc.weight * self._network_loss(x_k, labels, weights, g)
        self.manual_backward(loss)
        return loss.detach()

    def _network_loss(
        self, images: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, g: torch.Generator
    ) -> torch.Tensor:
        """The student's own training loss for (images, labels, weight): every term goes through here."""
        out = self.student.train_loss(images, labels, weight, ignore_index=self.ignore_index, generator=g)
        return out.loss

    def _mic_inputs(
        self, src: Mapping[str, torch.Tensor], x_t: torch.Tensor, pl: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The masked batch of the official ``mask_mode``s: target, source, or the first half of the
        batch from the source (ground truth, weight 1) and the rest from the target."""
        mode = self.method.mic.images
        if mode == "target":
            return x_t, pl, weight
        if mode == "source":
            return src["image"], src["label"], None
        k = x_t.shape[0] // 2  # source images; the other n target images
        n = x_t.shape[0] - k
        return (
            torch.cat([src["image"][:k], x_t[:n]]),
            torch.cat([src["label"][:k], pl[:n]]),
            torch.cat([torch.ones_like(weight[:k]), weight[:n]]),
        )

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
