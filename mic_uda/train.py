"""`python -m mic_uda.train [group=option ...]`: compose, instantiate, fit, evaluate, report.

Thin on purpose (lightning-hydra-template `train.py`): every object comes from the config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torchmetrics import Metric

from mic_uda.data.bad_samples import check_on_bad_sample
from mic_uda.handover import adapt_bn_to_target, check_handover, has_running_bn, recalibrated_metrics
from mic_uda.models.weights import weights_file_format
from mic_uda.objective import check_objective, objective_value
from mic_uda.tasks.method import check_terms, parse_method
from mic_uda.utils.checkpointing import init_student_from
from mic_uda.utils.hydra_utils import (
    CONFIG_DIR,
    as_float_dict,
    instantiate_clearly,
    instantiate_dict,
    quiet_intentional,
    recipe_in_force,
    register_resolvers,
    task_wrapper,
    update_wandb_summary,
    write_json,
)

log = logging.getLogger("mic_uda")
register_resolvers()


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The data axis, told whether the method may see target labels (the oracle), the run seed (the
    training loaders' resumable order and augmentation) and what to do with unreadable samples."""
    method = parse_method(cfg.method)
    return instantiate(
        cfg.data.datamodule,
        target_labels=method.needs_target_labels,
        seed=cfg.seed,
        on_bad_sample=cfg.data.get("on_bad_sample", "error"),
        _recursive_=False,
    )


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """``last`` -> ``<run dir>/checkpoints/last.ckpt`` if it exists; ``auto`` -> the newest of that and
    the SLURM requeue checkpoints ``<run dir>/hpc_ckpt_*.ckpt`` (None: a fresh start); explicit paths
    must exist."""
    if ckpt_path in (None, ""):
        return None
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if ckpt_path == "last":
        return str(last) if last.is_file() else None
    if ckpt_path == "auto":
        found = [p for p in [last, *Path(output_dir).glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        newest = max(found, key=lambda p: p.stat().st_mtime, default=None)
        log.info("ckpt_path=auto: %s", f"resuming from {newest}" if newest else "no checkpoint, fresh start")
        return str(newest) if newest else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist")
    return ckpt_path


def validate_config(cfg: DictConfig) -> None:
    """Fail in the first second on what would otherwise fail after data loading."""
    method = parse_method(cfg.method)
    check_objective(cfg)
    supported = getattr(get_class(cfg.task.module._target_), "supported_terms", None)
    if supported is not None:
        check_terms(method, supported, cfg.task.name)
    for key in ("weights", "backbone_weights"):  # the network's own check, only earlier
        weights = cfg.backbone.get(key)
        if weights:
            b = cfg.backbone
            name = b.get("encoder_name") or b.get("backbone") or b.get("arch") or "the network"
            weights_file_format(Path(weights), str(name))  # exists, and is a torch/safetensors file
    check_on_bad_sample(cfg.data.get("on_bad_sample", "error"))
    check_handover(cfg.get("handover", "recalibrated"))
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("trainer.accelerator=gpu but no CUDA device is visible; use trainer=cpu")


def single_device_tester(cfg: DictConfig) -> L.Trainer:
    """After a multi-process fit, evaluate once on one device: a DistributedSampler pads and splits
    the evaluation set, so per-rank evaluation would count some images twice. No logger: the
    loggers' state lives in the (spawned) training processes; the numbers go to metrics.json."""
    return instantiate(
        cfg.trainer,
        devices=1,
        num_nodes=1,
        strategy="auto",
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
    )


@task_wrapper
def train(cfg: DictConfig) -> dict[str, Any]:
    """Train on source (+ unlabelled target), then evaluate on the target split; returns metrics."""
    started = time.monotonic()
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    with open_dict(cfg):
        cfg.tags = sorted({*cfg.get("tags", []), cfg.task.name, cfg.data.name, cfg.method.name})
    log.info("run folder: %s", cfg.paths.output_dir)
    log.info(recipe_in_force(cfg))

    datamodule = build_datamodule(cfg)
    model: L.LightningModule = instantiate_clearly(cfg.task.module, _recursive_=False)
    if cfg.get("init_from"):
        step = init_student_from(model, cfg.init_from)
        log.info(
            "student initialised from %s (its step %d); step, optimiser and teacher start fresh",
            cfg.init_from,
            step,
        )
    callbacks = instantiate_dict(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_dict(cfg.get("logger"), "logger")
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    metrics: dict[str, float] = {}
    handed_over = "student"
    if cfg.get("train"):
        with quiet_intentional(model):  # no "N modules in eval mode" warning for our teacher
            trainer.fit(
                model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
            )
        metrics.update(as_float_dict(trainer.callback_metrics))
    if cfg.get("test") and not trainer.fast_dev_run and trainer.is_global_zero:
        tester = trainer if trainer.world_size == 1 else single_device_tester(cfg)
        if tester is not trainer:  # the spawned ranks' last validation counts come back with the module
            for metric in model.modules():
                if isinstance(metric, Metric):
                    metric.reset()
        tester.test(model, datamodule=datamodule, verbose=False)  # the final weights, not a "best" pick
        metrics.update(as_float_dict(tester.callback_metrics))
        print(f"\nTarget evaluation ({cfg.data.name}, {cfg.method.name}, seed {cfg.seed}):")
        print(model.result_table())
        handed_over = hand_over(cfg, model, tester, datamodule, metrics)
    if trainer.is_global_zero:
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        update_wandb_summary(  # the final (= last checkpoint's) metrics as the W&B run summary
            {
                **metrics,
                "final/step": trainer.global_step,
                "final/ckpt_path": str(last) if last.is_file() else "",
            }
        )
        write_json(
            Path(cfg.paths.output_dir) / "metrics.json",
            {
                "metrics": metrics,
                "data": cfg.data.name,
                "method": cfg.method.name,
                "seed": cfg.seed,
                "task": cfg.task.name,
                "backbone": cfg.backbone.get("encoder_name")
                or cfg.backbone.get("backbone")
                or cfg.backbone.get("arch", "?"),
                "primary_metric": f"test/{model.primary_metric}"
                if handed_over != "recalibrated"
                else f"test/recalibrated/{model.primary_metric}",
                "handover": handed_over,
                "max_steps": cfg.trainer.max_steps,
                # this call's wall time (a resumed run: its last part), kept when the folder is copied
                "wall_s": time.monotonic() - started,
            },
        )
    return metrics


def hand_over(
    cfg: DictConfig,
    model: L.LightningModule,
    tester: L.Trainer,
    datamodule: L.LightningDataModule,
    metrics: dict[str, float],
) -> str:
    """Evaluate the student with BN statistics re-estimated on the unlabelled target (label-free) beside
    the student as trained and the teacher, and write the handed-over model to final.ckpt
    (:mod:`mic_uda.handover`). Returns what was handed over."""
    if not has_running_bn(model.student):
        return "student"
    adapt_bn_to_target(model, datamodule, seed=cfg.seed, networks=("student",))
    tester.test(model, datamodule=datamodule, verbose=False)
    metrics.update(recalibrated_metrics(as_float_dict(tester.callback_metrics)))
    print("\nThe student with BN statistics re-estimated on the unlabelled target images (AdaBN):")
    print(model.result_table())
    choice = cfg.get("handover", "recalibrated")
    if choice == "recalibrated" and cfg.get("train"):
        final = Path(cfg.paths.output_dir) / "checkpoints" / "final.ckpt"
        tester.save_checkpoint(final, weights_only=False)  # AtomicCheckpointIO where the trainer has it
        log.info("handed over: %s (the student with target BN statistics)", final)
    return choice


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry (`mic-uda-train`); returns `optimized_metric` (label-free by default) for sweepers."""
    torch.set_float32_matmul_precision("high")
    metrics = train(cfg)
    return objective_value(cfg, metrics)


if __name__ == "__main__":
    main()
