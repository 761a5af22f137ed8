"""Prediction panels (mic_uda/media.py) and what W&B receives: run identity, config, media, summary."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torchvision.io import read_image

import mic_uda.utils.hydra_utils as hydra_utils
from mic_uda.media import confusion_image, hstack, seg_panel_columns
from mic_uda.train import train

SEG_COLUMNS = [
    "image",
    "ground truth",
    "student",
    "teacher pseudo-label",
    "teacher confidence",
    "MIC-masked input",
    "student on masked",
]


def test_confusion_image_exact() -> None:
    img = confusion_image(torch.tensor([[2, 0], [1, 1]]), cell_px=1)
    assert img.shape == (3, 2, 2) and img.dtype == torch.uint8
    assert img[:, 0, 0].tolist() == [8, 48, 107]  # row 0: all correct -> dark blue
    assert img[:, 0, 1].tolist() == [255, 255, 255]  # nothing -> white
    assert img[:, 1, 0].tolist() == [132, 152, 181]  # half way
    assert (
        confusion_image(torch.tensor([[0, 0], [0, 3]]), cell_px=3)[:, 0, 0].tolist() == [200] * 3
    )  # no samples
    assert hstack([img, img], gap=1).shape == (3, 2, 5)


@pytest.mark.parametrize("method", ["mic", "source_only"])
def test_seg_panels_are_fixed_and_change_no_training_state(method: str, make_cfg) -> None:
    cfg = make_cfg([f"method={method}"])
    module = instantiate(cfg.task.module, _recursive_=False)
    module.setup("fit")
    module.eval()
    g_state, weights = module.generator.get_state(), {k: v.clone() for k, v in module.state_dict().items()}
    images, labels = torch.rand(2, 3, 32, 32), torch.randint(0, 8, (2, 32, 32))
    first = seg_panel_columns(module, images, labels, seed=0)
    again = seg_panel_columns(module, images, labels, seed=0)
    expected = SEG_COLUMNS if method == "mic" else [c.replace("teacher", "student") for c in SEG_COLUMNS[:5]]
    assert list(first) == expected
    assert all(torch.equal(first[k], again[k]) for k in first)  # same mask and augmentation every time
    assert all(v.shape == (2, 3, 32, 32) and v.dtype == torch.uint8 for v in first.values())
    assert torch.equal(module.generator.get_state(), g_state)  # the training generator is not consumed
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())  # no BN buffer moved
    if method == "mic":
        other = seg_panel_columns(module, images, labels, seed=1)
        assert not torch.equal(first["MIC-masked input"], other["MIC-masked input"])


def test_seg_panels_reach_files_tensorboard_and_wandb(
    make_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One tiny MIC run with W&B (offline) + TensorBoard: panels every 2 steps and at validation
    (step 3); W&B gets name/group/job type/tags from the config, the resolved config, the media and
    the final metrics as run summary."""
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(hydra_utils, "close_loggers", lambda: None)  # inspect wandb.run before finishing
    cfg = make_cfg(
        [
            "logger=[wandb,tensorboard]",
            "method=mic",
            "callbacks.prediction_panels.every_n_steps=2",
            "tags=[mine]",
        ]
    )
    try:
        metrics = train(cfg)
        run = wandb.run
        assert run is not None
        assert run.name == "synthetic_seg-mic-s0" and run.group == "synthetic_seg" and run.job_type == "mic"
        assert set(run.tags) == {"mine", "seg", "synthetic_seg", "mic"}
        assert run.config["method"]["mic"]["ratio"] == 0.7 and run.config["paths"]["output_dir"] == str(
            cfg.paths.output_dir
        )  # the resolved config
        assert run.summary["test/mIoU"] == pytest.approx(metrics["test/mIoU"])
        assert run.summary["final/ckpt_path"].endswith("last.ckpt") and run.summary["final/step"] == 3
    finally:
        wandb.finish()

    out = Path(cfg.paths.output_dir)
    for step in (2, 3):
        pngs = sorted((out / "media" / f"step_{step:06d}").glob("target_val_*.png"))
        assert [p.name for p in pngs] == [f"target_val_{i:06d}.png" for i in range(4)]  # 4 val images: all
        img = read_image(str(pngs[0]))
        assert img.shape == (3, 32, 7 * 32 + 6 * 2)  # 7 columns, 2 px gaps
    assert (out / "media" / "step_000003" / "columns.txt").read_text().strip() == " | ".join(SEG_COLUMNS)
    # the panels of one image are identical between two steps only where the model does not enter:
    # the image and ground-truth columns
    a, b = (read_image(str(out / "media" / f"step_00000{s}" / "target_val_000000.png")) for s in (2, 3))
    assert torch.equal(a[..., : 2 * 32 + 2], b[..., : 2 * 32 + 2])

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {f"media/target_panels/{i}" for i in range(4)} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("media/target_panels/0")] == [2, 3]

    wandb_media = list((out / "wandb").glob("offline-run-*/files/media/images/**/target_panels_*.png"))
    assert len(wandb_media) == 8  # 4 images x 2 steps


def test_cls_confusion_matrix_and_class_table(make_cfg) -> None:
    cfg = make_cfg(["task=cls", "method=mic", "logger=tensorboard"])
    metrics = train(cfg)
    step_dir = Path(cfg.paths.output_dir) / "media" / "step_000003"
    n = len(cfg.data.class_names)
    for name in ("student", "teacher"):
        assert read_image(str(step_dir / f"confusion_{name}.png")).shape == (3, 16 * n, 16 * n)
    rows = list(csv.DictReader((step_dir / "per_class_accuracy.csv").open()))
    assert [r["class"] for r in rows] == list(cfg.data.class_names)
    assert sum(int(r["support"]) for r in rows) == cfg.data.datamodule.val.num_images
    for r in rows:
        if r["student acc"]:
            assert float(r["student acc"]) == pytest.approx(
                metrics[f"val/student/acc_{r['class']}"], abs=0.01
            )
    assert (step_dir / "per_class_accuracy.md").read_text().startswith("| class | support | student acc |")
    assert not list(step_dir.glob("target_val_*.png"))  # segmentation panels only for seg modules


def test_fast_dev_run_writes_no_media(make_cfg) -> None:
    cfg = make_cfg(["++trainer.fast_dev_run=true", "callbacks.prediction_panels.every_n_steps=1"])
    train(cfg)
    assert not (Path(cfg.paths.output_dir) / "media").exists()


def test_panels_under_two_process_ddp(make_cfg) -> None:
    """Computed on both ranks (collective BN layers stay in step), written once by rank 0."""
    cfg = make_cfg(["trainer=ddp_sim", "method=mic", "callbacks.prediction_panels.every_n_steps=2"])
    train(cfg)
    media = Path(cfg.paths.output_dir) / "media"
    assert sorted(p.name for p in media.iterdir()) == ["step_000002", "step_000003"]
    assert len(list((media / "step_000003").glob("target_val_*.png"))) == 4
