"""Semantic-segmentation UDA: one LightningModule for source-only, oracle, DACS and MIC.

The student, its EMA teacher and the method's loss terms live here; the maths is in
:mod:`mic_uda.uda`. Methods switch terms on (``mix``, ``mic``) through :class:`MethodConfig`.
Manual optimisation: each term is back-propagated as soon as it is computed (as the official code
does), so only one graph is alive at a time, then one optimiser step and the fused EMA update.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from mic_uda.tasks.method import MethodConfig, parse_method
from mic_uda.uda.augment import StrongAugment
from mic_uda.uda.bn import frozen_bn_statistics, set_teacher_mode
from mic_uda.uda.ema import copy_weights, ema_update
from mic_uda.uda.losses import weighted_cross_entropy
from mic_uda.uda.masking import apply_mask, block_mask
from mic_uda.uda.mixing import classmix_masks, mix
from mic_uda.uda.pseudo_label import confidence_weight, pseudo_label_from_logits
from mic_uda.utils.metrics import format_iou_table, iou_from_confusion, mean_iou
from mic_uda.utils.optim import param_groups, warmup_poly_scheduler
from mic_uda.utils.seeding import rank_generator


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


class SegUDAModule(L.LightningModule):
    """Student + EMA teacher for segmentation UDA; everything is built from plain configs so that
    ``SegUDAModule.load_from_checkpoint(path)`` rebuilds the model with no Hydra run around it."""

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
    ) -> None:
        super().__init__()
        net, method = _plain(net), _plain(method)
        optimizer, scheduler, param_group_keys = (
            _plain(optimizer),
            _plain(scheduler),
            _plain(param_group_keys),
        )
        class_names, palette = list(class_names), _plain(palette)
        if len(class_names) != num_classes:
            raise ValueError(f"data.class_names has {len(class_names)} names but num_classes={num_classes}")
        self.save_hyperparameters()
        self.automatic_optimization = False

        net_cfg = dict(net)
        self.pretrained_weights: str | None = net_cfg.pop("weights", None)
        self.student: nn.Module = instantiate(net_cfg, num_classes=num_classes)
        self.method: MethodConfig = parse_method(method)
        self.teacher: nn.Module | None = None
        if self.method.needs_teacher:
            self.teacher = copy.deepcopy(self.student)
            self.teacher.requires_grad_(False)
            set_teacher_mode(self.teacher, self.method.teacher.bn)
        self.augment = StrongAugment(**vars(self.method.augment))
        self.num_classes, self.class_names, self.ignore_index = num_classes, class_names, ignore_index
        self.val_confusion = nn.ModuleDict(
            {
                name: MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
                for name in (["student", "teacher"] if self.teacher is not None else ["student"])
            }
        )
        self.last_iou: dict[str, torch.Tensor] = {}
        self.generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None

    # ----------------------------------------------------------------- set-up and modes
    def setup(self, stage: str) -> None:
        self.generator = rank_generator(self.hparams.seed, self.global_rank)
        if self._pending_generator_state is not None:
            self.generator.set_state(self._pending_generator_state)
        if stage == "fit" and self.pretrained_weights:
            self.student.load_encoder_weights(self.pretrained_weights)
        if stage == "fit" and self.teacher is not None:
            copy_weights(self.teacher, self.student)  # resumed runs overwrite this from the checkpoint

    def train(self, mode: bool = True) -> SegUDAModule:
        """Lightning toggles train()/eval() on the whole module; the teacher keeps its own mode."""
        super().train(mode)
        if self.teacher is not None:
            set_teacher_mode(self.teacher, self.method.teacher.bn)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def _mask_fill(self) -> torch.Tensor | float:
        return getattr(self.student, "mean", 0.0)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Mapping[str, torch.Tensor]], batch_idx: int) -> None:
        opt = self.optimizers()
        sched = self.lr_schedulers()
        m, g = self.method, self.generator
        assert g is not None, "setup() creates the generator"
        src, tgt = batch["source"], batch["target"]
        sup = tgt if m.needs_target_labels else src
        logs: dict[str, torch.Tensor] = {}

        loss = weighted_cross_entropy(
            self.student(sup["image"]), sup["label"], ignore_index=self.ignore_index
        )
        self.manual_backward(loss)
        logs["train/loss_sup"] = loss.detach()

        if self.teacher is not None:
            x_t = tgt["image"]
            with torch.no_grad():
                pl, conf = pseudo_label_from_logits(self.teacher(x_t))
            pc = m.pseudo_label
            weight = confidence_weight(conf, pc.threshold, pc.weight_scope, pc.ignore_top, pc.ignore_bottom)
            logs["train/pseudo_weight"] = weight.mean()
            # label-free health check: the share of each class in the pseudo-labels (a class that
            # never appears cannot be learned by self-training; a collapsing class shows here first)
            share = torch.bincount(pl.flatten(), minlength=self.num_classes).float() / pl.numel()
            logs.update({f"train/pl_share_{c}": s for c, s in zip(self.class_names, share)})
            with frozen_bn_statistics(self.student, enabled=m.student_bn == "source"):
                if m.mix is not None:
                    logs["train/loss_mix"] = self._mix_term(src, x_t, pl, weight, g)
                if m.mic is not None:
                    logs["train/loss_mic"] = self._mic_term(x_t, pl, weight, g)

        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if self.teacher is not None:
            logs["train/ema_alpha"] = torch.tensor(
                ema_update(
                    self.teacher,
                    self.student,
                    self.global_step,
                    self.method.teacher.alpha,
                    average_buffers=self.method.teacher.bn == "running",
                )
            )
        logs["train/lr"] = torch.tensor(opt.param_groups[0]["lr"])
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False)
        self.log("train/loss", sum(v for k, v in logs.items() if k.startswith("train/loss_")), prog_bar=True)

    def _mix_term(
        self,
        src: Mapping[str, torch.Tensor],
        x_t: torch.Tensor,
        pl: torch.Tensor,
        weight: torch.Tensor,
        g: torch.Generator,
    ) -> torch.Tensor:
        """DACS: ClassMix source classes onto the target, strong aug, weighted CE to the mixed label."""
        mask = classmix_masks(src["label"], g, self.ignore_index).to(x_t)
        x_m = self.augment(mix(mask, src["image"], x_t), g)
        y_m = mix(mask, src["label"], pl)
        w_m = mix(mask, torch.ones_like(weight), weight)
        loss = self.method.mix.weight * weighted_cross_entropy(self.student(x_m), y_m, w_m, self.ignore_index)
        self.manual_backward(loss)
        return loss.detach()

    def _mic_term(
        self, x_t: torch.Tensor, pl: torch.Tensor, weight: torch.Tensor, g: torch.Generator
    ) -> torch.Tensor:
        """MIC: a fresh strong aug of the target, block-masked, against the clean-image pseudo-label."""
        mc = self.method.mic
        b, _, h, w = x_t.shape
        keep = block_mask(b, h, w, mc.block_size, mc.ratio, g, device=x_t.device).to(x_t.dtype)
        x_k = apply_mask(self.augment(x_t, g), keep, self._mask_fill())
        loss = mc.weight * weighted_cross_entropy(self.student(x_k), pl, weight, self.ignore_index)
        self.manual_backward(loss)
        return loss.detach()

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        preds = {"student": self.student(images).argmax(1)}
        if self.teacher is not None:
            preds["teacher"] = self.teacher(images).argmax(1)
        for name, p in preds.items():
            self.val_confusion[name].update(p, labels)
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
        self.log(f"{prefix}/mIoU", 100 * mean_iou(self.last_iou["student"]), prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def iou_table(self) -> str:
        """Per-class IoU of the last evaluation, student and teacher side by side."""
        return format_iou_table(self.class_names, self.last_iou)

    # ----------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg, sch_cfg = dict(self.hparams.optimizer), dict(self.hparams.scheduler)
        groups = param_groups(
            self.student, opt_cfg["lr"], opt_cfg.get("weight_decay", 0.0), self.hparams.param_group_keys or {}
        )
        optimizer = get_class(opt_cfg.pop("_target_"))(groups, **opt_cfg)
        max_steps = sch_cfg.pop("max_steps", None) or self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            raise ValueError("the poly schedule needs trainer.max_steps (or scheduler.max_steps) > 0")
        scheduler = warmup_poly_scheduler(optimizer, max_steps=max_steps, **sch_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- checkpoint state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mic_uda_module"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if self.generator is not None:
            checkpoint["uda_generator_state"] = self.generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("uda_generator_state")
        if state is not None:
            if self.generator is not None:
                self.generator.set_state(state)
            else:
                self._pending_generator_state = state
