"""`python -m mic_uda.compare RUN_OR_CKPT [RUN_OR_CKPT ...] --images N`: models side by side.

The same target-evaluation images through each model, as the qualitative figures of UDA papers
(image | ground truth | source-only | DACS | MIC), written as one PNG:

- segmentation: one row per image; columns image | ground truth | each model's prediction in the
  dataset palette (``data.palette``), the per-image mIoU printed in each prediction panel. The score
  is what evaluation computes for that image alone: the logits upsampled to ``label_native`` where
  the split keeps it, the confusion matrix without ignored pixels, the NaN-mean of the IoUs of the
  classes present in label or prediction.
- detection: the same grid with boxes: the ground truth, each model's detections above ``--score``
  with class name and score; per-image mAP50 (the module's AP@0.5, classes absent from the image
  skipped).
- classification: the row-normalised confusion matrices of the models side by side, over the whole
  target-evaluation split, with accuracy and mean class accuracy (``--images`` does not apply).

Each argument is a run folder (its ``checkpoints/final.ckpt``, the handed-over model, else
``last.ckpt``) or a checkpoint inside one. The model is rebuilt from the checkpoint
(:func:`mic_uda.evaluate.load_module`), the evaluation split from the run's ``.hydra/config.yaml``
(the first model's; every model must share its ``data.name``); ``--set data.root=/elsewhere``
overrides keys of that config (data moved since training). ``--net teacher`` shows the EMA teachers
(a teacher with ``method.teacher.bn=batch`` normalises each image with its own statistics here).
Images are evenly spaced over the split (``--indices`` picks them). Colours and panels reuse
:mod:`mic_uda.media` / :mod:`mic_uda.utils.visualize`; figures are drawn with matplotlib (Agg).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from mic_uda.evaluate import load_module
from mic_uda.media import confusion_image, fallback_palette, to_uint8
from mic_uda.plots import DPI, new_figure
from mic_uda.utils.hydra_utils import register_resolvers
from mic_uda.utils.metrics import (
    class_accuracy_from_confusion,
    iou_from_confusion,
    nan_mean,
    overall_accuracy,
)
from mic_uda.utils.visualize import colourise

register_resolvers()
NETS = ("student", "teacher")
DRAW_MIN_PX = 256  # detection panels are upscaled to at least this (box labels stay legible)


@dataclass
class Model:
    name: str
    ckpt: Path
    run_dir: Path
    cfg: DictConfig
    module: L.LightningModule


@dataclass
class Comparison:
    """What was drawn. Seg/det: ``panels[row][column]`` (H, W, 3) uint8 for ``columns`` = image,
    ground truth, then one per model; ``scores[row][model]`` the per-image metric (percent, NaN when
    undefined), ``indices[row]`` the dataset index. Cls: one row of confusion-matrix images, one column
    per model, ``scores[0][model]`` the accuracy (and ``extra`` the mean class accuracies)."""

    task: str
    metric: str
    columns: list[str]
    indices: list[int]
    scores: list[list[float]]
    panels: list[list[np.ndarray]]
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs
def resolve_run(path: str | Path) -> tuple[Path, Path]:
    """``(checkpoint, run folder)`` of a run folder or of a checkpoint file inside one."""
    p = Path(path)
    if p.is_dir():
        ckpt = next(
            (c for c in (p / "checkpoints" / n for n in ("final.ckpt", "last.ckpt")) if c.is_file()), None
        )
        if ckpt is None:
            raise FileNotFoundError(f"{p} has no checkpoints/final.ckpt or checkpoints/last.ckpt")
        return ckpt, p
    if p.is_file():
        return p, p.parent.parent if p.parent.name == "checkpoints" else p.parent
    raise FileNotFoundError(f"{p} is neither a run folder nor a checkpoint file")


def run_config(run_dir: Path, overrides: Sequence[str] = ()) -> DictConfig:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the comparison builds the evaluation split from the run's saved config "
            "(a run folder written by `python -m mic_uda.train`)"
        )
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    assert isinstance(cfg, DictConfig)
    return cfg


def load_models(
    paths: Sequence[str | Path], names: Sequence[str] | None = None, overrides: Sequence[str] = ()
) -> list[Model]:
    """The models, named by ``names`` or their method (+ seed / folder when that repeats)."""
    if names and len(names) != len(paths):
        raise ValueError(f"--names gives {len(names)} names for {len(paths)} models")
    found = [resolve_run(p) for p in paths]
    cfgs = [run_config(run_dir, overrides) for _, run_dir in found]
    if len({str(c.data.name) for c in cfgs}) > 1:
        raise ValueError(
            "the models were trained on different data ("
            + ", ".join(f"{run}: {c.data.name}" for (_, run), c in zip(found, cfgs))
            + "); compare models of one dataset"
        )
    if names is None:
        names = [str(c.get("method", {}).get("name", "model")) for c in cfgs]
        seeds = [f"{n} (seed {c.get('seed')})" for n, c in zip(names, cfgs)]
        folders = [f"{n} [{run.name}]" for n, (_, run) in zip(names, found)]
        files = [f"{n} [{run.name}/{ckpt.stem}]" for n, (ckpt, run) in zip(names, found)]
        for alternative in (seeds, folders, files):  # method names, else + seed, folder, checkpoint
            if len(set(names)) < len(names):
                names = alternative
    models = []
    for name, (ckpt, run_dir), cfg in zip(names, found, cfgs):
        module = load_module(ckpt)
        module.train(False)  # eval mode; a teacher keeps its own BN policy
        models.append(Model(name, ckpt, run_dir, cfg, module))
    if len({type(m.module) for m in models}) > 1:
        raise ValueError(
            "the checkpoints are of different tasks: " + ", ".join(type(m.module).__name__ for m in models)
        )
    return models


def eval_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The run's datamodule (as ``evaluate`` builds it), set up for its test split."""
    dm = instantiate(cfg.data.datamodule, _recursive_=False)
    dm.setup("test")
    return dm


def pick_indices(size: int, n: int) -> list[int]:
    """``n`` dataset indices evenly spaced over ``size`` items (first and last included)."""
    if n < 1:
        raise ValueError(f"--images must be >= 1, got {n}")
    return torch.linspace(0, size - 1, min(n, size)).round().long().unique().tolist()


def network(model: Model, net: str) -> torch.nn.Module:
    if net not in NETS:
        raise ValueError(f"--net {net!r} is not one of {list(NETS)}")
    found = getattr(model.module, net, None)
    if found is None:
        raise ValueError(f"{model.name} ({model.ckpt}) has no {net} (method {model.cfg.method.name})")
    return found


# --------------------------------------------------------------------------- per-image scores
def seg_image_score(logits: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> float:
    """mIoU (percent) of one image as evaluation computes it: ``logits`` (1, C, h, w) upsampled
    bilinearly to the label's size when they differ, ignored pixels left out, NaN-mean of the IoUs."""
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits.float(), label.shape[-2:], mode="bilinear", align_corners=False)
    pred, label = logits.argmax(1).flatten().cpu(), label.flatten().cpu().long()
    valid = label != ignore_index
    conf = torch.bincount(num_classes * label[valid] + pred[valid], minlength=num_classes**2)
    return 100 * nan_mean(iou_from_confusion(conf.view(num_classes, num_classes)))


def det_image_score(
    module: Any, detections: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> float:
    """mAP50 (percent) of one image: the module's metric (AP@0.5, per class, classes absent skipped)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_thresholds=[0.5], class_metrics=True)
    metric.update([{k: v.cpu() for k, v in detections.items()}], [{k: v.cpu() for k, v in target.items()}])
    return 100 * nan_mean(module._per_class_ap(metric.compute()))


# --------------------------------------------------------------------------- the comparisons
def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).numpy()


@torch.no_grad()
def seg_rows(
    models: list[Model], dataset: Dataset, indices: list[int], net: str, device: torch.device
) -> tuple:
    data = models[0].cfg.data
    first = models[0].module
    num_classes, ignore = int(first.num_classes), int(first.ignore_index)
    palette = data.get("palette") or first.hparams.get("palette") or fallback_palette(num_classes)
    palette = [list(c) for c in palette]
    panels, scores = [], []
    for i in indices:
        item = dataset[i]
        image = item["image"].unsqueeze(0).to(device)
        label = torch.as_tensor(item["label"])
        scored = torch.as_tensor(item.get("label_native", label))
        row = [_hwc(to_uint8(image)[0]), _hwc(colourise(label, palette, ignore))]
        row_scores = []
        for m in models:
            logits = network(m, net).predict(image)
            row_scores.append(seg_image_score(logits, scored, num_classes, ignore))
            row.append(_hwc(colourise(logits.argmax(1)[0].cpu(), palette, ignore)))
        panels.append(row)
        scores.append(row_scores)
    return panels, scores


@torch.no_grad()
def det_rows(
    models: list[Model],
    dataset: Dataset,
    indices: list[int],
    net: str,
    device: torch.device,
    score: float,
    max_boxes: int = 30,
) -> tuple:
    """Ground-truth boxes and each model's detections above ``score`` (at most ``max_boxes``, best
    first), labelled with class and score, on images upscaled (nearest) to >= 256 px for the text."""
    from torchvision.utils import draw_bounding_boxes

    first = models[0].module
    names = list(first.class_names)
    colours = [tuple(c) for c in fallback_palette(len(names))]

    def draw(
        img: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None
    ) -> np.ndarray:
        up = max(1, math.ceil(DRAW_MIN_PX / max(img.shape[-2:])))
        img = img.repeat_interleave(up, -2).repeat_interleave(up, -1)
        text = [
            (names[int(c) - 1] if 1 <= int(c) <= len(names) else str(int(c)))
            + ("" if scores is None else f" {float(s):.2f}")
            for c, s in zip(labels, scores if scores is not None else labels)
        ]
        col = [colours[(int(c) - 1) % len(colours)] for c in labels]
        return _hwc(draw_bounding_boxes(img, boxes.cpu() * up, text, colors=col, width=2))

    panels, scores = [], []
    for i in indices:
        item = dataset[i]
        image = item["image"].unsqueeze(0).to(device)
        keep = item["labels"] > 0
        target = {"boxes": item["boxes"][keep], "labels": item["labels"][keep]}
        img = to_uint8(image)[0]
        up = max(1, math.ceil(DRAW_MIN_PX / max(img.shape[-2:])))
        row = [_hwc(img.repeat_interleave(up, -2).repeat_interleave(up, -1))]
        row.append(draw(img, target["boxes"], target["labels"], None))
        row_scores = []
        for m in models:
            det = {k: v.cpu() for k, v in network(m, net)(image)[0].items()}
            row_scores.append(det_image_score(m.module, det, target))
            shown = (det["scores"] > score).nonzero().flatten()
            shown = shown[det["scores"][shown].argsort(descending=True)][:max_boxes]
            row.append(draw(img, det["boxes"][shown], det["labels"][shown], det["scores"][shown]))
        panels.append(row)
        scores.append(row_scores)
    return panels, scores


@torch.no_grad()
def cls_confusions(
    models: list[Model], dm: L.LightningDataModule, net: str, device: torch.device
) -> list[torch.Tensor]:
    """Each model's confusion matrix (rows = true class) over the whole evaluation split."""
    c = int(models[0].module.num_classes)
    out = [torch.zeros(c, c, dtype=torch.long) for _ in models]
    for batch in dm.test_dataloader():
        images, labels = batch["image"].to(device), batch["label"].long().cpu()
        for conf, m in zip(out, models):
            pred = network(m, net)(images).argmax(1).cpu()
            conf += torch.bincount(c * labels + pred, minlength=c * c).view(c, c)
    return out


# --------------------------------------------------------------------------- drawing
def draw_grid(
    columns: list[str],
    panels: list[list[np.ndarray]],
    scores: list[list[float]],
    metric: str,
    indices: list[int],
    path: Path,
) -> None:
    rows, cols = len(panels), len(columns)
    h, w = panels[0][0].shape[:2]
    panel_in = 2.2
    fig = new_figure((panel_in * cols, rows * (panel_in * h / w + 0.1) + 0.35))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(panels[r][c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"#{indices[r]}", fontsize=8)
            if c >= 2:
                v = scores[r][c - 2]
                ax.text(
                    0.02,
                    0.98,
                    f"{metric} {v:.1f}" if not math.isnan(v) else f"{metric} –",
                    transform=ax.transAxes,
                    va="top",
                    ha="left",
                    fontsize=7,
                    bbox={"facecolor": "white", "alpha": 0.8, "pad": 1.5, "linewidth": 0},
                )
    fig.savefig(path, dpi=DPI)


def draw_confusions(
    names: list[str], class_names: list[str], confusions: list[torch.Tensor], path: Path
) -> tuple:
    k, c = len(names), len(class_names)
    fig = new_figure((min(4.0 * k, 12.0), 4.6))
    axes = fig.subplots(1, k, squeeze=False)[0]
    accs, mcas, images = [], [], []
    for ax, name, conf in zip(axes, names, confusions):
        img = _hwc(confusion_image(conf, cell_px=1))
        images.append(img)
        acc, mca = 100 * overall_accuracy(conf), 100 * nan_mean(class_accuracy_from_confusion(conf))
        accs.append(acc)
        mcas.append(mca)
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks(range(c), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(c), class_names if ax is axes[0] else [""] * c, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        if ax is axes[0]:
            ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"{name}\nacc {acc:.1f} · mean class acc {mca:.1f}", fontsize=9)
        if c <= 12:
            frac = conf.double() / conf.sum(1, keepdim=True).clamp_min(1)
            for t in range(c):
                for p in range(c):
                    if conf[t, p] > 0:
                        ax.text(
                            p,
                            t,
                            f"{100 * frac[t, p]:.0f}",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="white" if frac[t, p] > 0.5 else "black",
                        )
    fig.savefig(path, dpi=DPI)
    return accs, mcas, images


def compare(
    paths: Sequence[str | Path],
    images: int = 4,
    out: str | Path = "compare.png",
    names: Sequence[str] | None = None,
    net: str = "student",
    indices: Sequence[int] | None = None,
    score: float = 0.5,
    overrides: Sequence[str] = (),
    device: str | None = None,
) -> Comparison:
    """Draw the comparison of the models at ``paths`` into ``out``; returns what was drawn."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = load_models(paths, names, overrides)
    for m in models:
        m.module.to(dev)
    dm = eval_datamodule(models[0].cfg)
    dataset = dm.test_dataloader().dataset
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = models[0].module
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if hasattr(module, "last_confusion"):  # classification
            confusions = cls_confusions(models, dm, net, dev)
            labels = [m.name for m in models]
            accs, mcas, imgs = draw_confusions(labels, list(module.class_names), confusions, out)
            return Comparison(
                "cls",
                "acc",
                labels,
                list(range(len(dataset))),
                [accs],
                [imgs],
                out,
                {"mean_class_acc": mcas, "confusions": confusions},
            )
        picked = list(indices) if indices else pick_indices(len(dataset), images)
        if any(not 0 <= i < len(dataset) for i in picked):
            raise ValueError(f"--indices {picked}: the evaluation split has {len(dataset)} items")
        if hasattr(module, "last_ap"):
            task, metric = "det", "mAP50"
            panels, scores = det_rows(models, dataset, picked, net, dev, score)
        else:
            task, metric = "seg", "mIoU"
            panels, scores = seg_rows(models, dataset, picked, net, dev)
    columns = ["image", "ground truth", *(m.name for m in models)]
    draw_grid(columns, panels, scores, metric, picked, out)
    return Comparison(task, metric, columns, picked, scores, panels, out)


def main(argv: Sequence[str] | None = None) -> Comparison:
    p = argparse.ArgumentParser(
        prog="python -m mic_uda.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", help="run folders (final.ckpt, else last.ckpt) or checkpoint files")
    p.add_argument("--images", type=int, default=4, help="how many target-evaluation images (seg/det)")
    p.add_argument("--indices", type=int, nargs="+", help="these dataset indices instead (seg/det)")
    p.add_argument("--out", type=Path, default=Path("compare.png"), help="the PNG to write")
    p.add_argument("--names", nargs="+", help="column names, one per model (default: the method names)")
    p.add_argument("--net", default="student", choices=NETS, help="which network of each checkpoint")
    p.add_argument("--score", type=float, default=0.5, help="detection: draw boxes scoring above this")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the runs' saved config, e.g. data.root=/data/camvid",
    )
    p.add_argument("--device", help="cpu / cuda (default: cuda when visible)")
    args = p.parse_args(argv)
    result = compare(
        args.runs,
        args.images,
        args.out,
        args.names,
        args.net,
        args.indices,
        args.score,
        args.overrides,
        args.device,
    )
    print(f"wrote {result.path}: {' | '.join(result.columns)}")
    for row, i in enumerate(result.indices if result.task != "cls" else []):
        cells = " ".join(f"{s:6.2f}" for s in result.scores[row])
        print(f"  #{i}: {result.metric} {cells}")
    if result.task == "cls":
        for name, acc, mca in zip(result.columns, result.scores[0], result.extra["mean_class_acc"]):
            print(f"  {name}: acc {acc:.2f}, mean class acc {mca:.2f}")
    return result


if __name__ == "__main__":
    main()
