"""`python -m mic_uda.evaluate ckpt_path=... [data=...]`: a checkpoint on a target split.

The model is rebuilt from the checkpoint alone (its hyper-parameters carry the network and method
config); the data group picks the split. Prints per-class IoU; optional colourised PNGs;
``export=cityscapes|trainid`` writes the benchmark servers' PNGs (mic_uda/export.py).
``hrda_scale=lr|hr`` scores an HRDA checkpoint with one branch alone.
``bn_stats=target`` first re-estimates the BatchNorm running statistics of the student (and of a
``running`` teacher) on the unlabelled target training images (AdaBN), never reading a target label.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from mic_uda.callbacks import SegPredictionWriter
from mic_uda.export import BenchmarkExport
from mic_uda.handover import adapt_bn_to_target
from mic_uda.models.hrda import INFERENCE_SCALES, HRDANet
from mic_uda.utils.checkpointing import check_checkpoint_fits
from mic_uda.utils.hydra_utils import CONFIG_DIR, as_float_dict, register_resolvers, task_wrapper, write_json

log = logging.getLogger("mic_uda")
register_resolvers()
BN_STATS = ("checkpoint", "target")


def load_module(ckpt_path: str | Path) -> L.LightningModule:
    """Rebuild the LightningModule class recorded in the checkpoint, with its weights, on the CPU."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r} does not exist (expected a .ckpt written by training)"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    target = ckpt.get("mic_uda_module")
    if target is None:
        raise ValueError(f"{path} was not written by mic_uda (no 'mic_uda_module' entry)")
    return get_class(target).load_from_checkpoint(path, map_location="cpu")


def set_hrda_scale(model: L.LightningModule, scale: str, ckpt_path: str) -> None:
    """Score an HRDA checkpoint with one branch alone (``HRDANet.set_inference_scale``)."""
    if scale not in INFERENCE_SCALES:
        raise ValueError(f"hrda_scale={scale!r} is not one of {list(INFERENCE_SCALES)}")
    if scale == "fused":
        return
    nets = [n for n in (getattr(model, "student", None), getattr(model, "teacher", None)) if n is not None]
    if not all(isinstance(n, HRDANet) for n in nets):
        raise ValueError(f"hrda_scale={scale!r}: {ckpt_path} is no HRDA checkpoint (expected fused)")
    for net in nets:
        net.set_inference_scale(scale)


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    check_checkpoint_fits(cfg.ckpt_path, cfg.data)  # one-line errors: not a checkpoint, other task/data
    model = load_module(cfg.ckpt_path)
    datamodule = instantiate(cfg.data.datamodule, _recursive_=False)
    callbacks = []
    if cfg.save_predictions and not hasattr(model, "last_iou"):
        raise ValueError("save_predictions=true writes segmentation masks; this is not a seg checkpoint")
    if cfg.save_predictions:
        out = Path(cfg.paths.output_dir) / "predictions"
        callbacks.append(
            SegPredictionWriter(out, cfg.data.palette, cfg.max_prediction_images, cfg.data.ignore_index)
        )
    if cfg.bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats={cfg.bn_stats!r} is not one of {list(BN_STATS)}")
    if cfg.bn_stats == "target":
        adapt_bn_to_target(model, datamodule, seed=cfg.seed)
    set_hrda_scale(model, cfg.get("hrda_scale", "fused"), cfg.ckpt_path)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    export = BenchmarkExport.from_config(cfg, model, datamodule)  # None unless export=... (checked now)
    metrics: dict[str, float] = {}
    if export is None or export.labelled:  # a benchmark test split has no labels: exported, not scored
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics = as_float_dict(trainer.callback_metrics)
    exported = export.run(cfg.trainer) if export is not None else None
    if trainer.is_global_zero:
        if export is None or export.labelled:
            print(f"\nEvaluation of {cfg.ckpt_path} on {cfg.data.name}:")
            print(model.result_table())
        write_json(
            Path(cfg.paths.output_dir) / "metrics.json",
            {"metrics": metrics, "ckpt_path": str(cfg.ckpt_path), "data": cfg.data.name}
            | ({"export": exported} if exported is not None else {}),
        )
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    """Console entry (`mic-uda-eval`)."""
    metrics = evaluate(cfg)
    return metrics.get("test/mIoU", metrics.get("test/acc"))


if __name__ == "__main__":
    main()
