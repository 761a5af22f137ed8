"""Figures (issue 19): sweep plots from run folders (collect_results --plot, mic_uda.plots) and the
side-by-side comparison of checkpoints (mic_uda.compare)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Subset

from mic_uda import plots
from mic_uda.compare import compare
from mic_uda.compare import main as compare_main
from mic_uda.evaluate import load_module
from mic_uda.train import train
from mic_uda.utils.visualize import colourise

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "collect_results.py"
CLASSES = ["road", "car", "sky"]
# (method, seed) -> per-class test IoU of the handed-over (recalibrated) student
IOUS = {
    ("dacs", 0): [80.0, 40.0, 90.0],
    ("dacs", 1): [84.0, 44.0, 88.0],
    ("mic", 0): [82.0, 50.0, 92.0],
    ("mic", 1): [86.0, 56.0, 90.0],
}
# (method, seed) -> val/student/mIoU at steps 0, 10, 20 (dacs seed 1 also logs step 30)
CURVES = {
    ("dacs", 0): [10.0, 20.0, 30.0],
    ("dacs", 1): [14.0, 22.0, 34.0, 40.0],
    ("mic", 0): [12.0, 25.0, 36.0],
    ("mic", 1): [16.0, 27.0, 38.0],
}


def _std2(a: float, b: float) -> float:
    """Sample std of two values."""
    return abs(a - b) / math.sqrt(2)


def _write_run(root: Path, method: str, seed: int, task: str = "seg", **over: object) -> Path:
    d = root / f"{method}_{seed}"
    (d / ".hydra").mkdir(parents=True)
    (d / "csv").mkdir()
    (d / ".hydra" / "config.yaml").write_text(f"data:\n  class_names: {CLASSES}\nseed: {seed}\n")
    (d / ".hydra" / "overrides.yaml").write_text(f"- method={method}\n- seed={seed}\n")
    ious = IOUS.get((method, seed), [0.0, 0.0, 0.0])  # cls/det runs replace the metrics
    metrics = {f"test/recalibrated/IoU_{c}": v for c, v in zip(CLASSES, ious)}
    metrics |= {f"test/student/IoU_{c}": v - 5 for c, v in zip(CLASSES, ious)}
    metrics |= {"test/recalibrated/mIoU": sum(ious) / 3, "test/student/mIoU": sum(ious) / 3 - 5}
    summary = {
        "metrics": metrics,
        "task": task,
        "data": "synthetic_seg",
        "method": method,
        "seed": seed,
        "primary_metric": "test/recalibrated/mIoU",
        **over,
    }
    (d / "metrics.json").write_text(json.dumps(summary))
    with (d / "csv" / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "val/student/mIoU", "val/teacher/mIoU"])
        for i, v in enumerate(CURVES.get((method, seed), [])):
            w.writerow([0, 10 * i, 1.5, "", ""])  # a training row: no validation value
            w.writerow([0, 10 * i, "", v, v + 1])
    return d


def _fake_sweep(root: Path) -> None:
    for method, seed in IOUS:
        _write_run(root, method, seed)


def _load_runs(*roots: Path) -> list[dict]:
    spec = importlib.util.spec_from_file_location("collect_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.load_runs(list(roots))


# --------------------------------------------------------------------------- sweep figures
def test_collect_results_plot_writes_the_figures_and_their_numbers(tmp_path: Path) -> None:
    sweep, out = tmp_path / "sweep", tmp_path / "figs"
    _fake_sweep(sweep)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(sweep), "--plot", str(out), "--per-class", str(tmp_path / "pc.md")],
        check=True,
        capture_output=True,
        text=True,
    )
    # the table is printed as before
    assert "| seg | synthetic_seg | mic | test/recalibrated/mIoU | 0,1 | 76.00 ± 1.89 |" in proc.stdout
    stems = ["class_bars_seg_synthetic_seg", "learning_curves_seg_synthetic_seg"]
    w, h = (round(v * plots.DPI) for v in plots.FIGSIZE)
    for stem in stems:
        png, svg = out / f"{stem}.png", out / f"{stem}.svg"
        assert png.stat().st_size > 10_000 and svg.stat().st_size > 10_000
        assert Image.open(png).size == (w, h)  # README width, the same for every figure
        root = ET.parse(svg).getroot()
        assert root.tag.endswith("svg") and root.get("width") == f"{plots.FIGSIZE[0] * 72:g}pt"
    numbers = json.loads((out / "figures.json").read_text())
    assert set(numbers) == set(stems)
    assert numbers[stems[0]]["mean"][1] == pytest.approx([84.0, 53.0, 91.0, 76.0])
    # the per-class table: the bars' numbers, mean ± sample std over the two seeds, by hand
    per_class = (tmp_path / "pc.md").read_text().splitlines()
    assert per_class[0] == "seg / synthetic_seg: IoU (%)"
    assert per_class[2] == "| method | net | n | road | car | sky | mIoU |"
    assert per_class[4] == "| dacs | recalibrated | 2 | 82.0 ± 2.8 | 42.0 ± 2.8 | 89.0 ± 1.4 | 71.0 ± 1.4 |"
    assert per_class[5] == "| mic | recalibrated | 2 | 84.0 ± 2.8 | 53.0 ± 4.2 | 91.0 ± 1.4 | 76.0 ± 1.9 |"


def test_class_bars_are_the_means_and_stds_over_seeds(tmp_path: Path) -> None:
    _fake_sweep(tmp_path)
    (bars,) = plots.class_bars(_load_runs(tmp_path))
    assert (bars.task, bars.data) == ("seg", "synthetic_seg")
    assert bars.groups == [*CLASSES, "mIoU"] and bars.methods == ["dacs", "mic"]
    assert bars.nets == ["recalibrated", "recalibrated"]
    for m, method in enumerate(bars.methods):
        a, b = IOUS[(method, 0)], IOUS[(method, 1)]
        expect_mean = [(x + y) / 2 for x, y in zip(a, b)] + [(sum(a) + sum(b)) / 6]
        expect_std = [_std2(x, y) for x, y in zip(a, b)] + [_std2(sum(a) / 3, sum(b) / 3)]
        assert bars.mean[m] == pytest.approx(expect_mean)
        assert bars.std[m] == pytest.approx(expect_std)
        assert bars.n[m] == [2, 2, 2, 2]
    assert bars.mean[0] == pytest.approx([82.0, 42.0, 89.0, 71.0])  # dacs, by hand
    assert bars.std[1][1] == pytest.approx(3 * math.sqrt(2))  # mic car: 50, 56
    # colours fixed per method name, whichever runs are plotted
    assert bars.colours == {"dacs": plots.METHOD_COLOURS["dacs"], "mic": plots.METHOD_COLOURS["mic"]}
    # another network on request: the student as trained
    (student,) = plots.class_bars(_load_runs(tmp_path), net="student")
    assert student.mean[0] == pytest.approx([77.0, 37.0, 84.0, 66.0])


def test_learning_curves_mean_and_min_max_band_over_seeds(tmp_path: Path) -> None:
    _fake_sweep(tmp_path)
    (curves,) = plots.learning_curves(_load_runs(tmp_path))
    assert curves.metric == "mIoU" and list(curves.panels) == ["student", "teacher"]
    dacs, mic = curves.panels["student"]
    assert (dacs.method, mic.method) == ("dacs", "mic")
    assert dacs.steps == [0, 10, 20]  # step 30 was logged by one seed only
    assert dacs.mean == pytest.approx([12.0, 21.0, 32.0])
    assert (dacs.low, dacs.high) == ([10.0, 20.0, 30.0], [14.0, 22.0, 34.0])
    assert mic.mean == pytest.approx([14.0, 26.0, 37.0]) and mic.seeds == 2
    teacher_dacs = curves.panels["teacher"][0]
    assert teacher_dacs.net == "teacher" and teacher_dacs.mean == pytest.approx([13.0, 22.0, 33.0])


def test_class_bars_of_classification_and_detection(tmp_path: Path) -> None:
    """Per-class accuracy (cls) and AP50 (det, a class absent from one seed's split is NaN there)."""
    cls_names, det_names = ["circle", "square"], ["car", "person"]
    for seed, (acc, circle, square) in enumerate(((60.0, 50.0, 70.0), (64.0, 54.0, 74.0))):
        d = _write_run(tmp_path / "cls", "sdat_mic", seed, task="cls", data="synthetic_cls")
        (d / ".hydra" / "config.yaml").write_text(f"data:\n  class_names: {cls_names}\n")
        metrics = {
            "test/recalibrated/acc": acc,
            "test/recalibrated/mean_class_acc": (circle + square) / 2,
            "test/recalibrated/acc_circle": circle,
            "test/recalibrated/acc_square": square,
        }
        summary = json.loads((d / "metrics.json").read_text())
        summary |= {"metrics": metrics, "primary_metric": "test/recalibrated/acc"}
        (d / "metrics.json").write_text(json.dumps(summary))
    for seed, (car, person) in enumerate(((20.0, float("nan")), (30.0, 10.0))):
        d = _write_run(tmp_path / "det", "sada", seed, task="det", data="synthetic_det")
        (d / ".hydra" / "config.yaml").write_text(f"data:\n  class_names: {det_names}\n")
        metrics = {"test/mAP50": 20.0, "test/student/AP50_car": car, "test/student/AP50_person": person}
        summary = json.loads((d / "metrics.json").read_text())
        summary |= {"metrics": metrics, "primary_metric": "test/mAP50", "handover": "student"}
        (d / "metrics.json").write_text(json.dumps(summary))  # NaN as metrics.json writes it
    cls_bars, det_bars = plots.class_bars(_load_runs(tmp_path))
    assert cls_bars.axis == "accuracy (%)" and cls_bars.groups == [*cls_names, "acc"]
    assert cls_bars.mean == [pytest.approx([52.0, 72.0, 62.0])]
    assert cls_bars.std == [pytest.approx([_std2(50, 54), _std2(70, 74), _std2(60, 64)])]
    assert det_bars.axis == "AP50 (%)" and det_bars.groups == [*det_names, "mAP50"]
    assert det_bars.nets == ["student"]
    assert det_bars.mean == [pytest.approx([25.0, 10.0, 20.0])]
    assert det_bars.n == [[2, 1, 2]] and det_bars.std[0][1] == 0.0
    written = plots.write_figures(_load_runs(tmp_path), tmp_path / "figs")
    assert {"class_bars_cls_synthetic_cls", "class_bars_det_synthetic_det"} <= set(written)
    assert (tmp_path / "figs" / "class_bars_det_synthetic_det.png").is_file()


def test_legend_labels_keep_only_the_overrides_that_tell_runs_apart() -> None:
    """``-m experiment=..._dacs,..._mic``: the experiment restates the method and is left out; an
    override that splits one method's runs (a ``method.mic.ratio`` sweep) stays in the label."""

    def run(method: str, seed: int, *overrides: str) -> dict:
        return {"task": "seg", "data": "camvid", "method": method, "seed": seed, "overrides": list(overrides)}

    runs = [
        run("dacs", 0, "experiment=camvid_dacs", "trainer.max_steps=10"),
        run("dacs", 1, "experiment=camvid_dacs", "trainer.max_steps=10"),
        run("mic", 0, "experiment=camvid_mic", "method.mic.ratio=0.5", "trainer.max_steps=10"),
        run("mic", 0, "experiment=camvid_mic", "method.mic.ratio=0.7", "trainer.max_steps=10"),
        run("oracle", 0, "experiment=camvid_dacs", "trainer.max_steps=10"),
    ]
    assert plots.method_labels(runs) == [
        "dacs",
        "dacs",
        "mic method.mic.ratio=0.5",
        "mic method.mic.ratio=0.7",
        "oracle",
    ]
    assert plots.method_order(plots.method_labels(runs)) == [
        "dacs",
        "mic method.mic.ratio=0.5",
        "mic method.mic.ratio=0.7",
        "oracle",
    ]
    colours = plots.method_colours(plots.method_labels(runs))
    assert (
        colours["dacs"] == plots.METHOD_COLOURS["dacs"]
        and colours["oracle"] == plots.METHOD_COLOURS["oracle"]
    )
    assert len(set(colours.values())) == 4  # the variants get their own (spare) colours


# --------------------------------------------------------------------------- comparison grid
def _trained(make_cfg, out: Path, overrides: list[str]) -> tuple[Path, object]:
    """A tiny run through the real entry point, with the config Hydra saves in the run folder."""
    cfg = make_cfg(overrides, out=out)
    train(cfg)
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return out, cfg


def _test_one(module: L.LightningModule, dataset, index: int) -> dict[str, float]:
    """What evaluation (the module's test pass) computes on a split of that one image."""
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    trainer.test(module, dataloaders=DataLoader(Subset(dataset, [index]), batch_size=1), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_compare_segmentation_grid_and_per_image_miou(make_cfg, tmp_path: Path) -> None:
    a, cfg = _trained(make_cfg, tmp_path / "source_only", ["method=source_only"])
    b, _ = _trained(make_cfg, tmp_path / "mic", ["method=mic"])
    out = tmp_path / "grid.png"
    result = compare_main([str(a), str(b), "--images", "3", "--out", str(out)])
    assert out.is_file() and Image.open(out).size[0] > 500
    assert result.task == "seg" and result.metric == "mIoU"
    assert result.columns == ["image", "ground truth", "source_only", "mic"]
    assert len(result.panels) == 3 and all(len(row) == 2 + 2 for row in result.panels)
    assert result.indices == [0, 2, 3]  # evenly spaced over the 4 evaluation images

    # independently: the evaluation split from the training config, the handed-over checkpoints
    dm = instantiate(cfg.data.datamodule, _recursive_=False)
    dm.setup("test")
    dataset = dm.test_dataloader().dataset
    palette = list(cfg.data.palette)
    for row, index in enumerate(result.indices):
        gt = colourise(torch.as_tensor(dataset[index]["label"]), palette, cfg.data.ignore_index)
        assert (result.panels[row][1] == gt.permute(1, 2, 0).numpy()).all()
        assert (result.panels[row][0].shape[:2]) == tuple(dataset[index]["image"].shape[1:])
    for k, run in enumerate((a, b)):
        module = load_module(run / "checkpoints" / "final.ckpt")
        for row, index in enumerate(result.indices):
            expected = _test_one(module, dataset, index)["test/student/mIoU"]
            assert result.scores[row][k] == pytest.approx(expected, abs=1e-4)

    # the run's saved config is what the evaluation split is built from: a bare checkpoint is refused
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "last.ckpt").write_bytes((a / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        compare([tmp_path / "bare" / "last.ckpt"], images=1, out=tmp_path / "y.png")


def test_compare_detection_boxes_and_per_image_map(make_cfg, tmp_path: Path) -> None:
    run, cfg = _trained(make_cfg, tmp_path / "mic", ["task=det", "method=mic"])
    ckpt = run / "checkpoints" / "last.ckpt"  # an explicit checkpoint (detection hands over last.ckpt)
    result = compare([ckpt], images=2, out=tmp_path / "boxes.png", score=0.0)
    assert result.task == "det" and result.metric == "mAP50" and (tmp_path / "boxes.png").is_file()
    assert result.columns == ["image", "ground truth", "mic"]
    assert len(result.panels) == 2 and all(len(row) == 3 for row in result.panels)
    dm = instantiate(cfg.data.datamodule, _recursive_=False)
    dm.setup("test")
    dataset = dm.test_dataloader().dataset
    module = load_module(ckpt)
    for row, index in enumerate(result.indices):
        expected = _test_one(module, dataset, index)["test/student/mAP50"]
        got = result.scores[row][0]
        assert got == pytest.approx(expected, abs=1e-4) or (math.isnan(got) and math.isnan(expected))


def test_compare_classification_confusion_matrices(make_cfg, tmp_path: Path) -> None:
    """One run twice: its folder (final.ckpt, the recalibrated student) and its last.ckpt (the student
    as trained): the accuracies are the run's test/recalibrated/acc and test/student/acc."""
    run, _ = _trained(make_cfg, tmp_path / "sdat_mic", ["task=cls", "method=sdat_mic"])
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["handover"] == "recalibrated"
    result = compare([run, run / "checkpoints" / "last.ckpt"], out=tmp_path / "confusion.png")
    assert result.task == "cls" and (tmp_path / "confusion.png").is_file()
    assert (
        result.columns == ["sdat_mic [sdat_mic/final]", "sdat_mic [sdat_mic/last]"]
        and len(result.panels[0]) == 2
    )
    for k, key in enumerate(("test/recalibrated/acc", "test/student/acc")):
        assert result.scores[0][k] == pytest.approx(summary["metrics"][key], abs=1e-4)
        assert int(result.extra["confusions"][k].sum()) == len(result.indices)
