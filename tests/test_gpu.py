"""The GPU path (``trainer=gpu``: CUDA, bf16-mixed) for every task, through the real entry points.

Marked ``gpu``: CI has no GPU and skips them; run with ``python -m pytest -m gpu tests/test_gpu.py``
on a CUDA machine. Each run is the tiny CPU recipe of ``conftest`` with ``trainer=gpu`` instead.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLS, TINY_DET, TINY_SEG

from mic_uda.evaluate import evaluate, load_module
from mic_uda.train import train
from mic_uda.uda.masking import block_mask
from mic_uda.uda.mixing import classmix_masks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def on_gpu(tiny: list[str], *extra: str) -> list[str]:
    return ["trainer=gpu" if o == "trainer=cpu" else o for o in tiny] + list(extra)


def finite(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    picked = {k: v for k, v in metrics.items() if k.startswith(prefix)}
    assert picked, f"no {prefix} metrics in {sorted(metrics)}"
    assert all(math.isfinite(v) for v in picked.values()), picked
    return picked


def master_weights_stay_fp32(out: Path) -> None:
    """bf16-mixed autocasts the maths; the student, its EMA teacher and the checkpoint stay float32."""
    module = load_module(out / "checkpoints" / "last.ckpt")
    dtypes = {p.dtype for p in module.parameters()}
    assert dtypes == {torch.float32}, dtypes


def evaluate_on_gpu(make_cfg, run: Path, out: Path, *data_overrides: str) -> dict[str, float]:
    """``python -m mic_uda.evaluate`` of the run's last checkpoint with ``trainer=gpu``."""
    ecfg = make_cfg(
        [
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            *data_overrides,
            "trainer=gpu",
            "+trainer.enable_progress_bar=false",
        ],
        config_name="eval",
        out=out,
    )
    return evaluate(ecfg)


@pytest.mark.parametrize("method", ["dacs", "mic"])
def test_seg_bf16_on_gpu_trains_checkpoints_and_evaluates(method: str, make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(on_gpu(TINY_SEG, f"method={method}"), tiny=False)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    metrics = train(cfg)
    finite(metrics, "train/loss")
    assert 0.0 <= metrics["test/mIoU"] <= 100.0 and "val/teacher/mIoU" in metrics
    out = Path(cfg.paths.output_dir)
    master_weights_stay_fp32(out)
    evaluated = evaluate_on_gpu(
        make_cfg, out, tmp_path / "eval", "data.size=32", "data.datamodule.val.num_images=4"
    )
    # the same weights give the same numbers up to GPU kernels' non-bitwise-determinism (a few pixels)
    assert evaluated["test/mIoU"] == pytest.approx(metrics["test/mIoU"], abs=0.5)


def test_cls_bf16_on_gpu_with_adabn_evaluation(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(on_gpu(TINY_CLS, "task=cls", "method=sdat_mic"), tiny=False)
    metrics = train(cfg)
    finite(metrics, "train/loss")
    out = Path(cfg.paths.output_dir)
    master_weights_stay_fp32(out)
    evaluated = evaluate_on_gpu(
        make_cfg,
        out,
        tmp_path / "eval",
        "data=synthetic_cls",
        "data.image_size=16",
        "data.datamodule.val.num_images=8",
        "data.datamodule.target.num_images=16",
        "bn_stats=target",
    )
    assert 0.0 <= evaluated["test/acc"] <= 100.0


@pytest.mark.parametrize("method", ["sada", "sada_mic"])
def test_det_bf16_on_gpu(method: str, make_cfg) -> None:
    cfg = make_cfg(on_gpu(TINY_DET, "task=det", f"method={method}"), tiny=False)
    metrics = train(cfg)
    finite(metrics, "train/loss")
    assert 0.0 <= metrics["test/mAP50"] <= 100.0
    master_weights_stay_fp32(Path(cfg.paths.output_dir))


def test_masks_are_the_same_on_cpu_and_gpu_for_the_same_seed() -> None:
    """Masks come from the module's CPU generator and are moved, so a seed means the same masks anywhere."""
    on_cpu = block_mask(2, 64, 96, 16, 0.7, torch.Generator().manual_seed(3), device="cpu")
    on_cuda = block_mask(2, 64, 96, 16, 0.7, torch.Generator().manual_seed(3), device="cuda")
    assert on_cuda.is_cuda and torch.equal(on_cpu, on_cuda.cpu())
    labels = torch.randint(0, 7, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    mix_cpu = classmix_masks(labels, torch.Generator().manual_seed(5))
    mix_cuda = classmix_masks(labels.cuda(), torch.Generator().manual_seed(5))
    assert torch.equal(mix_cpu, mix_cuda.cpu())
