"""Summarise run folders (a sweep, or any folder tree) into mean/std tables per (data, method).

    python scripts/collect_results.py logs/train/multiruns/<time> [more dirs] [--metric test/mIoU]
        [--csv out.csv] [--md out.md]

Reads every ``metrics.json`` written by ``mic_uda.train``; the wall time of a run is the time from
its ``.hydra/config.yaml`` to its ``metrics.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path


def load_runs(roots: list[Path]) -> list[dict]:
    runs = []
    for root in roots:
        for path in sorted(root.rglob("metrics.json")):
            summary = json.loads(path.read_text())
            cfg = path.parent / ".hydra" / "config.yaml"
            summary["wall_s"] = path.stat().st_mtime - cfg.stat().st_mtime if cfg.is_file() else float("nan")
            summary["dir"] = str(path.parent)
            runs.append(summary)
    return runs


def summarise(runs: list[dict], metrics: list[str]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r.get("data", "?"), r.get("method", "?"))].append(r)
    rows = []
    for (data, method), rs in sorted(groups.items()):
        row = {
            "data": data,
            "method": method,
            "n": len(rs),
            "seeds": ",".join(str(r.get("seed")) for r in rs),
        }
        for m in metrics:
            vals = [r["metrics"][m] for r in rs if m in r.get("metrics", {})]
            row[f"{m} mean"] = statistics.fmean(vals) if vals else float("nan")
            row[f"{m} std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else float("nan")
            row[f"{m} values"] = " / ".join(f"{v:.2f}" for v in vals)
        row["wall_min mean"] = statistics.fmean(r["wall_s"] for r in rs) / 60
        rows.append(row)
    return rows


def markdown(rows: list[dict], metrics: list[str]) -> str:
    head = ["data", "method", "seeds"] + [f"{m} (mean ± std)" for m in metrics] + ["per seed", "wall (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["data"], r["method"], r["seeds"]]
        cells += [f"{r[f'{m} mean']:.2f} ± {r[f'{m} std']:.2f}" for m in metrics]
        cells += [r[f"{metrics[0]} values"], f"{r['wall_min mean']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--metric", action="append", help="metric keys (default: test/mIoU)")
    p.add_argument("--csv", type=Path)
    p.add_argument("--md", type=Path)
    args = p.parse_args()
    metrics = args.metric or ["test/mIoU"]
    runs = load_runs(args.roots)
    if not runs:
        raise SystemExit(f"no metrics.json under {[str(r) for r in args.roots]}")
    rows = summarise(runs, metrics)
    table = markdown(rows, metrics)
    print(table)
    if args.md:
        args.md.write_text(table + "\n")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
