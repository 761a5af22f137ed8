"""Summarise run folders (a sweep, or any folder tree) into mean/std tables per (task, data, method).

    python scripts/collect_results.py logs/train/multiruns/<time> [more dirs] [--metric KEY ...]
        [--csv out.csv] [--md out.md] [--per-class out.md] [--plot DIR]

Reads every ``metrics.json`` written by ``mic_uda.train`` (segmentation, classification, detection
alike). Without ``--metric`` each run is summarised by its own ``primary_metric`` (recorded in
metrics.json: ``test/mIoU`` for seg, ``test/acc`` or ``test/mean_class_acc`` for cls, ...), so a
folder mixing tasks gives one row per (task, data, method) with the right metric; ``--metric`` (may be
repeated) picks keys explicitly, e.g. ``--metric test/teacher/mIoU`` or the Optuna objective
``--metric train/loss_sup_avg``. One row per (task, data, method, other overrides, metric): runs that
differ only in ``seed`` are averaged, runs whose command-line overrides differ in anything else (an
Optuna trial's sampled values, ``method.mic.ratio=0.5,0.7``) get their own row with an ``overrides``
column. The wall time of a run is the ``wall_s`` its ``metrics.json`` records (the training call's wall
time; older files: the time from its ``.hydra/config.yaml`` to its ``metrics.json``).

``--per-class MD`` writes the per-class IoU / accuracy / AP50 of each method, mean ± std over seeds, as
a Markdown table (one per task and dataset; the numbers of the per-class bars below).

``--plot DIR`` also draws the figures of the same runs into DIR (``mic_uda.plots``): per-class IoU /
accuracy / AP50 as grouped bars (one group per class and the mean, one bar per method, error bars =
std over seeds) and the validation metric of student and teacher against the training step from each
run's ``csv/metrics.csv`` (mean line, min-max band over seeds); one PNG + one SVG each, and
``figures.json`` with the numbers behind them. ``--plot-net`` picks the network of the bars (default:
each run's handed-over model, the network of its primary metric).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

# the run grouping and the primary metric are shared with the figures
from mic_uda.plots import NETS, class_bars, differing_overrides, write_figures
from mic_uda.plots import run_primary as primary_metric

FIELDS = ["task", "data", "method", "overrides", "metric", "n", "seeds", "mean", "std", "values", "wall_min"]

#: override keys that are columns already or do not change the result, and prefixes of such keys
NOT_A_VARIANT = {"seed", "method", "data", "task", "ckpt_path"}
NOT_A_VARIANT_PREFIXES = ("hydra.", "hydra/", "paths.")


def variant(run_dir: Path) -> list[str]:
    """The run's command-line overrides other than seed/method/data/task (``.hydra/overrides.yaml``)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(path.read_text()) if path.is_file() else None
    keys = [(o, o.lstrip("+~").split("=")[0]) for o in overrides or []]
    return [o for o, k in keys if k not in NOT_A_VARIANT and not k.startswith(NOT_A_VARIANT_PREFIXES)]


def load_runs(roots: list[Path]) -> list[dict]:
    runs = []
    for root in roots:
        for path in sorted(root.rglob("metrics.json")):
            summary = json.loads(path.read_text())
            if "metrics" not in summary:
                continue  # not a training run's summary
            if "wall_s" not in summary:  # metrics.json written before it recorded its wall time
                cfg = path.parent / ".hydra" / "config.yaml"
                summary["wall_s"] = path.stat().st_mtime - cfg.stat().st_mtime if cfg.is_file() else math.nan
            summary["dir"] = str(path.parent)
            summary["overrides"] = variant(path.parent)
            runs.append(summary)
    return runs


def summarise(runs: list[dict], metrics: list[str] | None = None) -> list[dict]:
    """One row per (task, data, method, overrides, metric): n, seeds, mean, std, per-seed values, wall."""
    # overrides every run shares (e.g. trainer.max_steps=2000 of the whole sweep) distinguish nothing
    groups: dict[tuple[str, str, str, str], list[dict]] = defaultdict(list)
    for r, differing in zip(runs, differing_overrides(runs)):
        groups[(r.get("task", "seg"), r.get("data", "?"), r.get("method", "?"), differing)].append(r)
    rows = []
    for (task, data, method, overrides), rs in sorted(groups.items()):
        keys = metrics or list(dict.fromkeys(primary_metric(r) for r in rs))
        for m in keys:
            with_m = [r for r in rs if m in r.get("metrics", {})]
            vals = [float(r["metrics"][m]) for r in with_m]
            walls = [r["wall_s"] for r in with_m if not math.isnan(r["wall_s"])]
            rows.append(
                {
                    "task": task,
                    "data": data,
                    "method": method,
                    "overrides": overrides,
                    "metric": m,
                    "n": len(vals),
                    "seeds": ",".join(str(r.get("seed")) for r in with_m),
                    "mean": statistics.fmean(vals) if vals else float("nan"),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else float("nan"),
                    "values": " / ".join(f"{v:.2f}" for v in vals),
                    "wall_min": statistics.fmean(walls) / 60 if walls else float("nan"),
                }
            )
    return rows


def markdown(rows: list[dict]) -> str:
    """The table; an ``overrides`` column only when some runs differ in more than the seed."""
    variants = any(r["overrides"] for r in rows)
    head = ["task", "data", "method", *(["overrides"] if variants else []), "metric", "seeds"]
    head += ["mean ± std", "per seed", "wall (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["task"], r["data"], r["method"], *([r["overrides"]] if variants else []), r["metric"]]
        cells.append(r["seeds"])
        cells += [f"{r['mean']:.2f} ± {r['std']:.2f}", r["values"], f"{r['wall_min']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_class_markdown(runs: list[dict], net: str = "handover") -> str:
    """Per (task, data): one row per method (and variant), one column per class and the mean metric,
    ``mean ± std`` over seeds: the numbers behind the per-class bars (:func:`mic_uda.plots.class_bars`)."""
    tables = []
    for bars in class_bars(runs, net):
        head = ["method", "net", "n", *bars.groups]
        lines = [f"{bars.task} / {bars.data}: {bars.axis}", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "---|" * len(head))
        for method, nets, means, stds, ns in zip(bars.methods, bars.nets, bars.mean, bars.std, bars.n):
            cells = [f"{m:.1f} ± {s:.1f}" if k > 1 else f"{m:.1f}" for m, s, k in zip(means, stds, ns)]
            lines.append("| " + " | ".join([method, nets, str(max(ns)), *cells]) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--metric", action="append", help="metric key(s) (default: each run's primary_metric)")
    p.add_argument("--csv", type=Path, help="also write the table as CSV")
    p.add_argument("--md", type=Path, help="also write the table as Markdown")
    p.add_argument("--per-class", type=Path, metavar="MD", help="also write the per-class table (Markdown)")
    p.add_argument("--plot", type=Path, metavar="DIR", help="also draw the figures (PNG + SVG) into DIR")
    p.add_argument(
        "--plot-net",
        default="handover",
        choices=NETS,
        help="network of the per-class bars (default: each run's handed-over model)",
    )
    args = p.parse_args(argv)
    runs = load_runs(args.roots)
    if not runs:
        raise SystemExit(f"no metrics.json under {[str(r) for r in args.roots]}")
    rows = summarise(runs, args.metric)
    table = markdown(rows)
    print(table)
    if args.md:
        args.md.write_text(table + "\n")
    if args.csv:
        write_csv(rows, args.csv)
    if args.per_class:
        args.per_class.write_text(per_class_markdown(runs, args.plot_net) + "\n")
    if args.plot:
        for stem in write_figures(runs, args.plot, args.plot_net):
            print(f"wrote {args.plot / stem}.png and .svg", file=sys.stderr)


if __name__ == "__main__":
    main()
