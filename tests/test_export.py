"""Benchmark-server export (``python -m mic_uda.evaluate ... export=cityscapes|trainid``, mic_uda/export.py)
of a checkpoint trained here through the real entry point, on tiny files in the Cityscapes / ACDC /
Dark Zurich layouts with their official file names: names, native sizes, values, and equality with the
argmax of the logits upsampled to the label's size, computed independently below."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from data_layouts import acdc, dark_zurich, data_root, tiny_data
from PIL import Image

from mic_uda.data.acdc import ACDC
from mic_uda.data.dark_zurich import DarkZurich
from mic_uda.data.seg_files import CITYSCAPES_ID_TO_TRAIN_ID, Cityscapes
from mic_uda.data.synthia import SYNTHIA_16_CLASSES
from mic_uda.evaluate import evaluate, load_module
from mic_uda.export import export_name, output_values
from mic_uda.train import train
from mic_uda.utils.metrics import iou_from_confusion, mean_iou

# written out here rather than imported: the server's table (cityscapesscripts labels.py, trainId -> id)
LABEL_ID = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, checkpoint): 2 steps of source-only training on GTA5 -> Cityscapes files."""
    tmp = tmp_path_factory.mktemp("export")
    root = data_root(tmp / "data", "gta2cs")
    acdc(root / "acdc", splits=("train", "val", "test"), labelled=("train", "val"))
    dark_zurich(root / "dark_zurich")
    overrides = [
        "data=gta2cs",
        "method=source_only",
        f"paths.data_dir={root}",
        *tiny_data("gta2cs"),
        f"data.rcs.cache_dir={tmp / 'rcs'}",
        "data.datamodule.num_workers=0",
        "data.datamodule.pin_memory=false",
        "backbone.embed_dim=16",
        "trainer=cpu",
        "logger=csv",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "++trainer.limit_val_batches=0",
        "~callbacks.progress_bar",
        "+trainer.enable_progress_bar=false",
    ]
    train(compose_cfg("train", overrides, tmp / "run"))
    return root, tmp / "run" / "checkpoints" / "last.ckpt"


def _evaluate(run: tuple[Path, Path], out: Path, *overrides: str) -> tuple[dict, dict]:
    root, ckpt = run
    cfg = compose_cfg(
        "eval",
        [
            f"ckpt_path={ckpt}",
            f"paths.data_dir={root}",
            "data.datamodule.num_workers=0",
            "data.datamodule.pin_memory=false",
            "trainer=cpu",
            "+trainer.enable_progress_bar=false",
            *overrides,
        ],
        out,
    )
    metrics = evaluate(cfg)
    return metrics, json.loads((out / "metrics.json").read_text())


def _expected(ckpt: Path, image: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Train ids: the student's logits of the network-sized image, bilinearly upsampled to ``size``."""
    model = load_module(ckpt).eval()
    with torch.no_grad():
        logits = model.student.predict(image[None])
    up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return up.argmax(1)[0].numpy()


def test_cityscapes_export_is_label_ids_at_native_size_named_for_the_server(run, tmp_path: Path) -> None:
    root, ckpt = run
    out = tmp_path / "eval"
    metrics, summary = _evaluate(
        run, out, "data=gta2cs", "data.datamodule.val.resize=[64,32]", "export=cityscapes"
    )
    val = Cityscapes(root / "cityscapes", split="val", resize=(64, 32), crop_size=None)
    images = [img for img, _ in val.pairs]
    expected_names = {
        f"{p.parent.name}/{p.name}" for p in images
    }  # <city>/<city>_<seq>_<frame>_leftImg8bit.png
    written = {str(p.relative_to(out / "export")) for p in (out / "export").rglob("*.png")}
    assert written == expected_names and len(written) == 2
    assert not list((out / "export").rglob("*.tmp"))
    confusion = torch.zeros(19, 19, dtype=torch.long)
    to_train = np.full(256, 255, np.int64)
    for k, v in CITYSCAPES_ID_TO_TRAIN_ID.items():
        to_train[k] = v
    for i, img in enumerate(images):
        png = Image.open(out / "export" / img.parent.name / img.name)
        label_file = val.pairs[i][1]
        assert png.mode == "L" and png.size == Image.open(label_file).size == (128, 64)  # native, not 64x32
        ids = np.array(png)
        assert set(np.unique(ids)) <= set(LABEL_ID.tolist())
        np.testing.assert_array_equal(ids, LABEL_ID[_expected(ckpt, val[i]["image"], (64, 128))])
        # scored as cityscapesscripts would: the exported ids against the label-id ground truth
        pred, gt = to_train[ids], to_train[np.array(Image.open(label_file))]
        keep = gt != 255
        confusion += torch.bincount(torch.from_numpy(gt[keep] * 19 + pred[keep]), minlength=361).reshape(
            19, 19
        )
    assert metrics["test/mIoU"] == pytest.approx(100 * mean_iou(iou_from_confusion(confusion)), abs=1e-4)
    assert summary["export"] == {
        "mode": "cityscapes",
        "dir": str(out / "export"),
        "images": 2,
        "network": "student",
        "scored": True,
    }


@pytest.mark.parametrize("dataset", ["acdc", "dark_zurich"])
def test_trainid_export_of_a_labelled_split(run, tmp_path: Path, dataset: str) -> None:
    root, ckpt = run
    data = {"acdc": "cs2acdc", "dark_zurich": "cs2darkzurich"}[dataset]
    out = tmp_path / "eval"
    metrics, _ = _evaluate(
        run,
        out,
        f"data={data}",
        "data.datamodule.val.resize=[64,36]",
        "export=trainid",
        f"export_dir={tmp_path / 'sub'}",
    )
    assert "test/mIoU" in metrics
    if dataset == "acdc":
        val = ACDC(root / "acdc", split="val", resize=(64, 36), crop_size=None)
    else:
        val = DarkZurich(root / "dark_zurich", split="val", resize=(64, 36), crop_size=None)
    written = sorted(p.name for p in (tmp_path / "sub").iterdir())
    assert written == sorted(
        f"{img.stem}.png" for img, _ in val.pairs
    )  # flat <stem>.png, e.g. ..._rgb_anon.png
    for i, (img, _) in enumerate(val.pairs):
        png = Image.open(tmp_path / "sub" / f"{img.stem}.png")
        assert png.mode == "L" and png.size == (96, 54)
        ids = np.array(png)
        assert ids.max() <= 18
        np.testing.assert_array_equal(ids, _expected(ckpt, val[i]["image"], (54, 96)))


def test_unlabelled_test_split_is_exported_without_scoring(run, tmp_path: Path) -> None:
    root, ckpt = run
    out = tmp_path / "eval"
    metrics, summary = _evaluate(
        run,
        out,
        "data=cs2acdc",
        "data.datamodule.val.resize=[64,36]",
        "data.datamodule.val.split=test",
        "++data.datamodule.val.with_labels=false",
        "export=trainid",
    )
    assert metrics == {} and summary["metrics"] == {} and summary["export"]["scored"] is False
    test = ACDC(root / "acdc", split="test", with_labels=False, resize=(64, 36), crop_size=None)
    assert len(test) == 4
    for i, (img, label) in enumerate(test.pairs):
        assert label is None
        ids = np.array(Image.open(out / "export" / f"{img.stem}.png"))
        np.testing.assert_array_equal(ids, _expected(ckpt, test[i]["image"], (54, 96)))


def test_export_errors_before_anything_runs(run, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"export='labelids' is not one of \['cityscapes', 'trainid'\]"):
        _evaluate(run, tmp_path / "a", "data=gta2cs", "export=labelids")
    with pytest.raises(
        ValueError, match=r"GOPR0405_frame_000003_rgb_anon\.png' is not a Cityscapes file name"
    ):
        _evaluate(run, tmp_path / "b", "data=cs2acdc", "export=cityscapes")
    with pytest.raises(ValueError, match=r"export_network='teacher'.*mean teacher"):
        _evaluate(run, tmp_path / "c", "data=gta2cs", "export=cityscapes", "export_network=teacher")
    assert not (tmp_path / "a" / "metrics.json").exists()


def test_output_values_and_names() -> None:
    assert output_values("cityscapes", 19).tolist() == LABEL_ID.tolist()
    assert output_values("trainid", 11).tolist() == list(range(11))  # CamVid: its own class ids
    # a 16-class SYNTHIA network: output k is Cityscapes train id SYNTHIA_16_CLASSES[k]
    assert output_values("trainid", 16, SYNTHIA_16_CLASSES).tolist() == list(SYNTHIA_16_CLASSES)
    assert (
        output_values("cityscapes", 16, SYNTHIA_16_CLASSES).tolist()
        == LABEL_ID[list(SYNTHIA_16_CLASSES)].tolist()
    )
    with pytest.raises(ValueError, match=r"19 train ids; this network has 11 classes"):
        output_values("cityscapes", 11)
    with pytest.raises(ValueError, match=r"16 outputs but the split's class_subset lists 13"):
        output_values("trainid", 16, SYNTHIA_16_CLASSES[:13])
    img = Path("/d/cityscapes/leftImg8bit/test/berlin/berlin_000123_000019_leftImg8bit.png")
    assert export_name(img, "cityscapes") == Path("berlin/berlin_000123_000019_leftImg8bit.png")
    assert export_name(img, "trainid") == Path("berlin_000123_000019_leftImg8bit.png")
    dz = Path("/d/rgb_anon/test/night/GOPR0356/GOPR0356_frame_000321_rgb_anon.png")
    assert export_name(dz, "trainid") == Path("GOPR0356_frame_000321_rgb_anon.png")
    with pytest.raises(ValueError, match="not a Cityscapes file name"):
        export_name(dz, "cityscapes")
