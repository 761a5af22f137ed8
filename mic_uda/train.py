"""`python -m mic_uda.train [group=option ...]`: compose, instantiate, fit, evaluate, report.

Thin on purpose (lightning-hydra-template `train.py`): every object comes from the config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from mic_uda.models.weights import require_weights_file
from mic_uda.tasks.method import check_terms, parse_method
from mic_uda.utils.hydra_utils import (
    CONFIG_DIR,
    as_float_dict,
    instantiate_clearly,
    instantiate_dict,
    register_resolvers,
    task_wrapper,
    write_json,
)

log = logging.getLogger("mic_uda")
register_resolvers()


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The data axis, told only whether the method may see target labels (the oracle)."""
    method = parse_method(cfg.method)
    return instantiate(cfg.data.datamodule, target_labels=method.needs_target_labels, _recursive_=False)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """``last`` -> ``<run dir>/checkpoints/last.ckpt`` if it exists; explicit paths must exist."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist")
    return ckpt_path


def validate_config(cfg: DictConfig) -> None:
    """Fail in the first second on what would otherwise fail after data loading."""
    method = parse_method(cfg.method)
    supported = getattr(get_class(cfg.task.module._target_), "supported_terms", None)
    if supported is not None:
        check_terms(method, supported, cfg.task.name)
    weights = cfg.backbone.get("weights")
    if weights:  # the same check the network runs when it loads them, only earlier
        require_weights_file(Path(weights), cfg.backbone.get("encoder_name", "the encoder"))
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
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    with open_dict(cfg):
        cfg.tags = sorted({*cfg.get("tags", []), cfg.task.name, cfg.data.name, cfg.method.name})
    log.info("run folder: %s", cfg.paths.output_dir)

    datamodule = build_datamodule(cfg)
    model: L.LightningModule = instantiate_clearly(cfg.task.module, _recursive_=False)
    callbacks = instantiate_dict(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_dict(cfg.get("logger"), "logger")
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    metrics: dict[str, float] = {}
    if cfg.get("train"):
        trainer.fit(
            model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
        )
        metrics.update(as_float_dict(trainer.callback_metrics))
    if cfg.get("test") and not trainer.fast_dev_run and trainer.is_global_zero:
        tester = trainer if trainer.world_size == 1 else single_device_tester(cfg)
        tester.test(model, datamodule=datamodule, verbose=False)  # the final weights, not a "best" pick
        metrics.update(as_float_dict(tester.callback_metrics))
        print(f"\nTarget evaluation ({cfg.data.name}, {cfg.method.name}, seed {cfg.seed}):")
        print(model.result_table())
    if trainer.is_global_zero:
        write_json(
            Path(cfg.paths.output_dir) / "metrics.json",
            {
                "metrics": metrics,
                "data": cfg.data.name,
                "method": cfg.method.name,
                "seed": cfg.seed,
                "task": cfg.task.name,
                "backbone": cfg.backbone.get("encoder_name") or cfg.backbone.get("backbone", "?"),
                "primary_metric": f"test/{model.primary_metric}",
                "max_steps": cfg.trainer.max_steps,
            },
        )
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry (`mic-uda-train`); returns the target metric (task.primary_metric) for sweepers."""
    torch.set_float32_matmul_precision("high")
    metrics = train(cfg)
    return metrics.get(f"test/{cfg.task.primary_metric}", metrics.get(f"val/{cfg.task.primary_metric}"))


if __name__ == "__main__":
    main()
