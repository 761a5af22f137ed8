"""Segmentation evaluation at the label's resolution (official mmseg test): the image is resized for the
network, the logits are upsampled bilinearly (align_corners=False) to the label file's size and scored
against the full-resolution ground truth. Fixture: a tiny Cityscapes val split whose labels hold 1-px
structures that a nearest-downsampled label loses."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image

from mic_uda.data.datamodule import UDADataModule
from mic_uda.data.seg_files import CITYSCAPES_CLASSES, Cityscapes
from mic_uda.models.seg_base import SegNetwork
from mic_uda.utils.metrics import iou_from_confusion

H, W = 32, 64  # label files; the network sees 16 x 32
POLE, SIGN, ROAD = 5, 7, 0


def _label() -> np.ndarray:
    lab = np.full((H, W), ROAD, dtype=np.uint8)
    lab[:30, 13] = POLE  # a 1-px pole in an odd column: the 2x nearest downsampling keeps even ones
    lab[9, 20:41] = SIGN  # a 1-px horizontal structure in an odd row
    lab[30:] = 255  # ignored rows (ego car)
    return lab


def _cityscapes_val(root: Path, sizes: list[tuple[int, int]] | None = None) -> Path:
    for i, (h, w) in enumerate(sizes or [(H, W), (H, W)]):
        stem = f"ulm_000000_{i:06d}"
        img = root / "leftImg8bit" / "val" / "ulm" / f"{stem}_leftImg8bit.png"
        lbl = root / "gtFine" / "val" / "ulm" / f"{stem}_gtFine_labelTrainIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        lbl.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img)
        Image.fromarray(_label() if (h, w) == (H, W) else np.zeros((h, w), np.uint8)).save(lbl)
    return root


def _val_cfg(root: Path, native: bool = True) -> dict:
    return {
        "_target_": "mic_uda.data.seg_files.Cityscapes",
        "root": str(root),
        "split": "val",
        "resize": [W // 2, H // 2],
        "crop_size": None,
        "native_label": native,
    }


class FixedLogits(SegNetwork):
    """A stand-in network: seeded logits at the input's resolution (as the real networks return)."""

    def __init__(self, seed: int, num_classes: int = 19) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("logits", torch.randn(1, num_classes, H // 2, W // 2, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == self.logits.shape[-2:]
        return self.logits.expand(x.shape[0], -1, -1, -1) + 0 * x.mean()


def _module(make_cfg, method: str) -> L.LightningModule:
    cfg = make_cfg([f"method={method}"])
    with open_dict(cfg):
        cfg.data.num_classes, cfg.data.class_names = 19, list(CITYSCAPES_CLASSES)
    model = instantiate(cfg.task.module, _recursive_=False)
    model.student = FixedLogits(0)
    if model.teacher is not None:
        model.teacher = FixedLogits(1)
    return model


def _expected_confusion(net: FixedLogits, label: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(net.logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    pred = up.argmax(1).expand(label.shape[0], -1, -1)
    keep = label != 255
    return torch.bincount(label[keep] * 19 + pred[keep], minlength=19 * 19).reshape(19, 19)


def test_val_split_keeps_the_label_at_native_resolution(tmp_path: Path) -> None:
    ds = Cityscapes(_cityscapes_val(tmp_path), split="val", resize=(W // 2, H // 2), crop_size=None)
    old = ds[0]
    assert old["label"].shape == (H // 2, W // 2) and "label_native" not in old
    assert (old["label"] == POLE).sum() == 0 and (old["label"] == SIGN).sum() == 0  # lost at half size
    native = Cityscapes(tmp_path, split="val", resize=(W // 2, H // 2), crop_size=None, native_label=True)[0]
    assert native["image"].shape == (3, H // 2, W // 2) and torch.equal(native["image"], old["image"])
    assert torch.equal(native["label_native"], torch.from_numpy(_label()).long())
    assert torch.equal(native["label"], old["label"])


@pytest.mark.parametrize("method", ["source_only", "dacs"])
def test_confusion_counts_the_native_label_pixels(tmp_path: Path, make_cfg, method: str) -> None:
    dm = UDADataModule(
        _val_cfg(_cityscapes_val(tmp_path)), _val_cfg(tmp_path), _val_cfg(tmp_path), val_batch_size=2
    )
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, H // 2, W // 2) and batch["label_native"].shape == (2, H, W)
    model = _module(make_cfg, method)
    preds = model._eval_step(batch)
    assert preds["student"].shape == (2, H // 2, W // 2)  # returned at the network's size (image writers)
    nets = {"student": model.student} | ({"teacher": model.teacher} if model.teacher is not None else {})
    assert set(preds) == set(nets)
    for name, net in nets.items():
        confusion = model.val_confusion[name].compute().cpu()
        assert confusion.sum() == 2 * 30 * W  # every non-ignored native pixel, not (H / 2) * (W / 2)
        assert confusion[POLE].sum() == 2 * 30 and confusion[SIGN].sum() == 2 * 21  # the 1-px structures
        assert torch.equal(confusion, _expected_confusion(net, batch["label_native"]))


def test_validation_run_scores_at_label_resolution(tmp_path: Path, make_cfg) -> None:
    root = _cityscapes_val(tmp_path)
    model = _module(make_cfg, "source_only")
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    results = {}
    for native in (True, False):
        dm = UDADataModule(
            _val_cfg(root, native), _val_cfg(root, native), _val_cfg(root, native), val_batch_size=1
        )
        trainer.validate(model, datamodule=dm, verbose=False)
        results[native] = model.last_iou["student"]
    labels = torch.stack([torch.from_numpy(_label()).long()] * 2)
    expected = iou_from_confusion(_expected_confusion(model.student, labels))
    assert torch.allclose(results[True], expected, equal_nan=True)
    # native_label=false (the previous behaviour): scored at 16 x 32 against the nearest-downsampled
    # labels, where the pole has no pixel at all
    small = torch.stack(
        [Cityscapes(root, split="val", resize=(W // 2, H // 2), crop_size=None)[i]["label"] for i in (0, 1)]
    )
    assert (small == POLE).sum() == 0
    keep = small != 255
    pred = model.student.logits.argmax(1).expand(2, -1, -1)
    at_half = torch.bincount(small[keep] * 19 + pred[keep], minlength=19 * 19).reshape(19, 19)
    assert torch.allclose(results[False], iou_from_confusion(at_half), equal_nan=True)
    assert not torch.allclose(results[True], results[False], equal_nan=True)


def test_labels_of_different_sizes_in_one_batch_fail_clearly(tmp_path: Path) -> None:
    root = _cityscapes_val(tmp_path, sizes=[(H, W), (H + 2, W + 4)])  # both resized to 16 x 32
    cfg = _val_cfg(root)
    dm = UDADataModule(cfg, cfg, cfg, val_batch_size=2)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"'label_native' differs in size.*val_batch_size=1"):
        next(iter(dm.val_dataloader()))
    one = UDADataModule(cfg, cfg, cfg, val_batch_size=1)
    one.setup("validate")
    assert sorted(tuple(b["label_native"].shape) for b in one.val_dataloader()) == [
        (1, H, W),
        (1, H + 2, W + 4),
    ]


@pytest.mark.parametrize(
    ("data", "network", "native"),
    [
        ("gta2cs", [1024, 512], True),
        ("synthia2cs", [1024, 512], True),
        ("synthia2cs_13", [1024, 512], True),
        ("cs2acdc", [960, 540], True),
        ("cs2darkzurich", [960, 540], True),
        ("cs2bdd_night", [1280, 720], True),
    ],
)
def test_benchmark_configs_evaluate_at_label_resolution(
    make_cfg, data: str, network: list, native: bool
) -> None:
    cfg = make_cfg([f"data={data}"], tiny=False)
    val = cfg.data.datamodule.val
    assert val.native_label is native and list(val.resize) == network and val.crop_size is None
    if data == "gta2cs":
        assert cfg.data.datamodule.source.keep_ratio is True  # 1914x1052 -> 1280x704


def test_gta2cs_val_items_at_cityscapes_size(tmp_path: Path, make_cfg) -> None:
    """The composed gta2cs val split on a Cityscapes-size frame: network input 1024x512, label 2048x1024."""
    from mic_uda.train import build_datamodule

    frame = tmp_path / "cityscapes" / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000000_leftImg8bit.png"
    gt = tmp_path / "cityscapes" / "gtFine" / "val" / "ulm" / "ulm_000000_000000_gtFine_labelTrainIds.png"
    for path, array in [(frame, np.zeros((1024, 2048, 3), np.uint8)), (gt, np.zeros((1024, 2048), np.uint8))]:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
    dm = build_datamodule(make_cfg(["data=gta2cs", f"paths.data_dir={tmp_path}"], tiny=False))
    dm.setup("validate")
    item = dm.datasets["val"][0]
    assert item["image"].shape == (3, 512, 1024) and item["label_native"].shape == (1024, 2048)
