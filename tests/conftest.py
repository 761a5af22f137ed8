"""Compose the real Hydra configs (as the entry points do) with tiny overrides for fast CPU runs."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from mic_uda.utils.hydra_utils import CONFIG_DIR, register_resolvers

# an explicit OMP_NUM_THREADS wins (2 threads on a CPU busy with other work can be 20x slower); under
# pytest-xdist (``-n auto`` in pyproject) the cores are shared by the workers, and the processes a test
# starts (DDP ranks, the CLI, the notebook kernel) inherit the worker's share
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
_THREADS = int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
if "PYTEST_XDIST_WORKER" in os.environ:  # not in xdist's controller: its workers would inherit it
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
torch.set_num_threads(_THREADS)
register_resolvers()

# A run small enough for a 2-core CPU in seconds: 32 px scenes, tiny head, 3 steps.
TINY_SEG = [
    "trainer=cpu",
    "logger=csv",
    "data.size=32",
    "data.datamodule.source.num_images=8",
    "data.datamodule.target.num_images=8",
    "data.datamodule.val.num_images=4",
    "data.datamodule.val_batch_size=4",
    "backbone.embed_dim=16",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
]


# The classification equivalent: 16 px procedural images, 4 + 4 per batch, 3 steps.
TINY_CLS = [
    "trainer=cpu",
    "logger=csv",
    "data.image_size=16",
    "data.mask_block_size=4",
    "data.datamodule.source.num_images=16",
    "data.datamodule.target.num_images=16",
    "data.datamodule.val.num_images=8",
    "data.datamodule.batch_size=4",
    "data.datamodule.target_batch_size=4",
    "data.datamodule.val_batch_size=8",
    "backbone.bottleneck_dim=16",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
]


# Detection: 64 px scenes upscaled to 128 for the MobileNetV3-FPN detector, 2 + 2 per batch, 2 steps.
TINY_DET = [
    "trainer=cpu",
    "logger=csv",
    "data.size=64",
    "data.datamodule.source.dataset.num_images=4",
    "data.datamodule.target.dataset.num_images=4",
    "data.datamodule.val.dataset.num_images=4",
    "data.datamodule.val_batch_size=4",
    "backbone.min_size=128",
    "backbone.max_size=128",
    "backbone.box_batch_size_per_image=16",
    "backbone.target_proposals=16",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
]


def compose_cfg(config_name: str, overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """What ``@hydra.main`` would build, with ``paths.output_dir`` pointed at ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        del cfg["hydra"]
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def _make(
        overrides: Sequence[str] = (), config_name: str = "train", tiny: bool = True, out: Path | None = None
    ) -> DictConfig:
        base: list[str] = []
        if tiny and config_name == "train":
            base = {"task=cls": TINY_CLS, "task=det": TINY_DET}.get(
                next((o for o in overrides if o.startswith("task=")), ""), TINY_SEG
            )
        return compose_cfg(config_name, [*base, *overrides], out or tmp_path / "run")

    return _make
