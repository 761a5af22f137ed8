"""What every task's UDA LightningModule shares: student + EMA teacher, the method config, the
per-rank generator, the optimiser/schedule and the checkpointed UDA state.

Tasks (seg, cls, det) subclass :class:`UDAModuleBase` and write only their loss terms and metrics;
nothing here knows what is predicted. Manual optimisation: a task back-propagates each term as
soon as it is computed (one graph alive at a time), then calls :meth:`finish_step`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, get_method, instantiate
from omegaconf import OmegaConf
from torch import nn

from mic_uda.tasks.method import MethodConfig, check_terms, parse_method
from mic_uda.uda.augment import StrongAugment
from mic_uda.uda.bn import set_teacher_mode
from mic_uda.uda.ema import copy_weights, ema_update
from mic_uda.utils.optim import param_groups, warmup_poly_scheduler
from mic_uda.utils.seeding import global_rng_states, rank_generator, set_global_rng_states


def plain(cfg: Any) -> Any:
    """A DictConfig as plain containers (hyper-parameters must pickle without Hydra around)."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


class UDAModuleBase(L.LightningModule):
    """Student + EMA teacher built from plain configs, so ``Module.load_from_checkpoint(path)``
    rebuilds the model with no Hydra run around it.

    Subclasses set ``supported_terms`` (the optional method terms they implement) and write
    ``training_step`` and the evaluation hooks.
    """

    #: method terms (attributes of MethodConfig that may be non-null) this task implements
    supported_terms: tuple[str, ...] = ()
    #: the metric (without prefix) that ``train`` returns to sweepers and prints
    primary_metric: str = "mIoU"

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
        **task_hparams: Any,
    ) -> None:
        """``task_hparams``: the subclass's own constructor arguments (e.g. ``ignore_index``), saved
        with the shared ones so ``load_from_checkpoint`` can rebuild the subclass."""
        super().__init__()
        self.automatic_optimization = False
        self.save_hyperparameters(
            {
                "net": plain(net),
                "method": plain(method),
                "num_classes": num_classes,
                "class_names": list(class_names),
                "optimizer": plain(optimizer),
                "scheduler": plain(scheduler),
                "param_group_keys": plain(param_group_keys),
                "seed": seed,
                "max_bad_steps": max_bad_steps,
                **{k: plain(v) for k, v in task_hparams.items()},
            }
        )
        net_cfg = dict(plain(net))
        class_names = list(class_names)
        if len(class_names) != num_classes:
            raise ValueError(f"data.class_names has {len(class_names)} names but num_classes={num_classes}")
        self.pretrained_weights: str | None = net_cfg.pop("weights", None)
        self.student: nn.Module = instantiate(net_cfg, num_classes=num_classes)
        self.method: MethodConfig = parse_method(plain(method))
        check_terms(self.method, self.supported_terms, type(self).__name__)
        self.teacher: nn.Module | None = None
        if self.method.needs_teacher:
            self.teacher = copy.deepcopy(self.student)
            self.teacher.requires_grad_(False)
            set_teacher_mode(self.teacher, self.method.teacher.bn)
        self.augment = StrongAugment(**vars(self.method.augment), seed=seed)
        self.num_classes, self.class_names = num_classes, class_names
        self.generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None
        self._pending_rng_states: dict[str, Any] | None = None
        self.student_from_init = False  # init_from loaded the student: no ImageNet weights over it
        self.max_bad_steps = int(max_bad_steps)
        self.bad_steps = 0  # consecutive non-finite steps
        self.skipped_steps = 0  # all skipped steps of the run

    # ----------------------------------------------------------------- set-up and modes
    def setup(self, stage: str) -> None:
        self.generator = rank_generator(self.hparams.seed, self.global_rank)
        if self._pending_generator_state is not None:
            self.generator.set_state(self._pending_generator_state)
        if stage == "fit" and self.pretrained_weights and not self.student_from_init:
            self.student.load_encoder_weights(self.pretrained_weights)
        if stage == "fit" and self.teacher is not None:
            copy_weights(self.teacher, self.student)  # resumed runs overwrite this from the checkpoint

    def on_train_start(self) -> None:
        """A resumed run continues the global RNG streams (dropout, drop-path) from the checkpoint."""
        if self._pending_rng_states is not None and self.trainer.ckpt_path:
            set_global_rng_states(self._pending_rng_states)
        self._pending_rng_states = None

    def train(self, mode: bool = True) -> UDAModuleBase:
        """Lightning toggles train()/eval() on the whole module; the teacher keeps its own mode."""
        super().train(mode)
        if self.teacher is not None:
            set_teacher_mode(self.teacher, self.method.teacher.bn)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def mask_fill(self) -> torch.Tensor | float:
        """Masked pixels take the network's normalisation mean (= zero after normalisation)."""
        return getattr(self.student, "mean", 0.0)

    # ----------------------------------------------------------------- the end of every step
    def finish_step(self, logs: dict[str, torch.Tensor]) -> None:
        """Optimiser + scheduler step and the fused EMA update, or a skipped step when a loss is
        non-finite (the gradients are dropped, the teacher is untouched); then logging."""
        opts = _as_list(self.optimizers())
        losses = {k: v for k, v in logs.items() if k.startswith("train/loss_")}
        finite = all(bool(torch.isfinite(v).all()) for v in losses.values())
        if finite:
            for opt in opts:
                opt.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
            bad = [k for k, v in losses.items() if not bool(torch.isfinite(v).all())]
            if self.bad_steps >= self.max_bad_steps:
                raise FloatingPointError(
                    f"{self.bad_steps} consecutive steps with a non-finite loss ({', '.join(bad)}) at "
                    f"step {self.global_step}: stopping (task.module.max_bad_steps={self.max_bad_steps}); "
                    "lower the learning rate or check the data"
                )
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if finite:  # a skipped step is not a step: the schedule stays aligned with global_step
            for sched in _as_list(self.lr_schedulers()):
                sched.step()
        if finite and self.teacher is not None:
            alpha = ema_update(
                self.teacher,
                self.student,
                self.global_step,
                self.method.teacher.alpha,
                average_buffers=self.method.teacher.bn == "running",
            )
            self.after_ema(alpha)
            logs["train/ema_alpha"] = torch.tensor(alpha)
        logs["train/lr"] = torch.tensor(opts[0].param_groups[0]["lr"])
        logs["train/skipped_steps"] = torch.tensor(float(self.skipped_steps))
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False)
        total = sum(v for k, v in losses.items()) if finite else torch.tensor(float("nan"))
        self.log("train/loss", total, prog_bar=True)

    def after_ema(self, alpha: float) -> None:
        """After each EMA update of the teacher (a task's terms may keep momentum copies of their own)."""

    # ----------------------------------------------------------------- optimiser
    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules the optimiser trains (the student; a task may add e.g. a domain discriminator).

        One optimiser over all of them: in manual optimisation Lightning counts every
        ``optimizer.step()`` as a global step, so a second optimiser would halve the schedule.
        """
        return {"student": self.student}

    def configure_optimizers(self) -> Any:
        # a null optimiser argument means "the optimiser's default": a preset switching AdamW to SGD
        # sets betas: null (Hydra merges configs, it cannot delete AdamW's keys)
        opt_cfg = {k: v for k, v in dict(self.hparams.optimizer).items() if v is not None}
        sch_cfg = dict(self.hparams.scheduler)
        opt_cls = get_class(opt_cfg.pop("_target_"))
        max_steps = sch_cfg.pop("max_steps", None) or self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            raise ValueError("the lr schedule needs trainer.max_steps (or scheduler.max_steps) > 0")
        sched_fn = get_method(sch_cfg.pop("_target_")) if "_target_" in sch_cfg else warmup_poly_scheduler
        groups = [
            group
            for module in self.trainable_modules().values()
            for group in param_groups(
                module, opt_cfg["lr"], opt_cfg.get("weight_decay", 0.0), self.hparams.param_group_keys or {}
            )
        ]
        optimizer = opt_cls(groups, **opt_cfg)
        scheduler = sched_fn(optimizer, max_steps=max_steps, **sch_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- checkpoint state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Called on every rank (rank 0 writes the file): each rank's generator state is gathered."""
        checkpoint["mic_uda_module"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["uda_skipped_steps"] = self.skipped_steps
        checkpoint["uda_bad_steps"] = self.bad_steps
        checkpoint["uda_rng_states"] = global_rng_states()
        if self.generator is not None:
            checkpoint["uda_generator_state"] = self.generator.get_state()
            if self._trainer is not None and self.trainer.world_size > 1:
                gathered = self.all_gather(self.generator.get_state().to(self.device))
                checkpoint["uda_generator_states"] = [s.cpu().clone() for s in gathered]  # own storage

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("uda_skipped_steps", 0))
        self.bad_steps = int(checkpoint.get("uda_bad_steps", 0))
        self._pending_rng_states = checkpoint.get("uda_rng_states")
        state = checkpoint.get("uda_generator_state")
        per_rank = checkpoint.get("uda_generator_states")
        world = self.trainer.world_size if self._trainer is not None else 1
        if per_rank is not None and len(per_rank) == world:
            state = per_rank[self.global_rank].clone()  # set_state crashes on a view with an offset
        if state is not None:
            if self.generator is not None:
                self.generator.set_state(state)
            else:
                self._pending_generator_state = state

    # ----------------------------------------------------------------- reporting
    def result_table(self) -> str:
        """Per-class table of the last evaluation (printed at the end of train/evaluate)."""
        raise NotImplementedError


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
