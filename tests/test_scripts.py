"""The result-collection script used for the README tables (segmentation and classification runs)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(
    root: Path,
    method: str,
    seed: int,
    metrics: dict[str, float],
    overrides: tuple[str, ...] = (),
    **summary: str,
) -> None:
    d = root / f"{summary.get('task', 'seg')}_{method}_{seed}_{len(list(root.glob('*')))}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text("seed: 0\n")
    lines = [f"- {o}" for o in (f"method={method}", f"seed={seed}", *overrides)]
    (d / ".hydra" / "overrides.yaml").write_text("\n".join(lines) + "\n")
    payload = {"data": "synthetic_seg", "method": method, "seed": seed, "metrics": metrics, **summary}
    (d / "metrics.json").write_text(json.dumps(payload))


def _collect(*args: str) -> str:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "collect_results.py"), *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_collect_results_mean_std_table(tmp_path: Path) -> None:
    for seed, v in enumerate((50.0, 52.0, 54.0)):
        _run(
            tmp_path, "mic", seed, {"test/mIoU": v, "test/acc": 90.0}, task="seg", primary_metric="test/mIoU"
        )
    _run(tmp_path, "dacs", 0, {"test/mIoU": 40.0})  # an older metrics.json: no task / primary_metric
    md, table_csv = tmp_path / "table.md", tmp_path / "t.csv"
    out = _collect(str(tmp_path), "--md", str(md), "--csv", str(table_csv))
    assert "| seg | synthetic_seg | mic | test/mIoU | 0,1,2 | 52.00 ± 2.00 | 50.00 / 52.00 / 54.00 |" in out
    assert "| seg | synthetic_seg | dacs | test/mIoU | 0 | 40.00 ± 0.00 |" in out
    assert "test/acc" not in out  # only the primary metric unless asked
    assert md.read_text().strip() == out.strip()
    assert table_csv.read_text().startswith(
        "task,data,method,overrides,metric,n,seeds,mean,std,values,wall_min"
    )


def test_collect_results_classification_and_mixed_tasks(tmp_path: Path) -> None:
    for seed, (acc, mca) in enumerate(((80.0, 70.0), (84.0, 74.0))):
        _run(
            tmp_path,
            "sdat_mic",
            seed,
            {"test/acc": acc, "test/mean_class_acc": mca},
            task="cls",
            data="synthetic_cls",
            primary_metric="test/acc",
        )
    _run(tmp_path, "mic", 0, {"test/mIoU": 47.5}, task="seg", primary_metric="test/mIoU")
    _run(tmp_path, "mic", 0, {"test/acc": 60.0}, task="cls", data="visda")  # no primary_metric: task default
    table_csv = tmp_path / "t.csv"
    out = _collect(str(tmp_path), "--csv", str(table_csv))
    assert "| cls | synthetic_cls | sdat_mic | test/acc | 0,1 | 82.00 ± 2.83 | 80.00 / 84.00 |" in out
    assert "| cls | visda | mic | test/acc | 0 | 60.00 ± 0.00 |" in out
    assert "| seg | synthetic_seg | mic | test/mIoU | 0 | 47.50 ± 0.00 |" in out
    rows = list(csv.DictReader(table_csv.open()))
    assert [(r["task"], r["metric"]) for r in rows] == [
        ("cls", "test/acc"),
        ("cls", "test/acc"),
        ("seg", "test/mIoU"),
    ]
    assert float(rows[0]["mean"]) == 82.0 and rows[0]["n"] == "2"

    explicit = _collect(str(tmp_path), "--metric", "test/mean_class_acc", "--metric", "test/acc")
    assert "| cls | synthetic_cls | sdat_mic | test/mean_class_acc | 0,1 | 72.00 ± 2.83 |" in explicit
    assert "| cls | synthetic_cls | sdat_mic | test/acc | 0,1 | 82.00 ± 2.83 |" in explicit
    # a metric a group does not have is reported as missing, not as zero
    assert "| seg | synthetic_seg | mic | test/acc |  | nan ± nan |" in explicit


def test_collect_results_separates_runs_that_differ_in_more_than_the_seed(tmp_path: Path) -> None:
    """An Optuna sweep or `-m method.mic.ratio=0.5,0.7 seed=0,1`: one row per setting; overrides that
    every run shares (`trainer.max_steps=100`) are not shown."""
    shared = ("trainer.max_steps=100", "hydra.sweep.dir=x")
    for seed, (r5, r7) in enumerate(((40.0, 44.0), (42.0, 46.0))):
        _run(tmp_path, "mic", seed, {"test/mIoU": r5}, ("method.mic.ratio=0.5", *shared), task="seg")
        _run(tmp_path, "mic", seed, {"test/mIoU": r7}, ("method.mic.ratio=0.7", *shared), task="seg")
    out = _collect(str(tmp_path))
    assert out.splitlines()[0].startswith("| task | data | method | overrides | metric | seeds |")
    assert "| seg | synthetic_seg | mic | method.mic.ratio=0.5 | test/mIoU | 0,1 | 41.00 ± 1.41 |" in out
    assert "| seg | synthetic_seg | mic | method.mic.ratio=0.7 | test/mIoU | 0,1 | 45.00 ± 1.41 |" in out
    assert "max_steps" not in out and "hydra" not in out


def test_collect_results_no_runs_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "collect_results.py"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "no metrics.json" in proc.stderr


def test_collect_results_wall_time_from_metrics_json(tmp_path: Path) -> None:
    """A result folder copied into the repository loses its file times: the ``wall_s`` that
    metrics.json records is the wall time; older files fall back to the file times."""
    _run(tmp_path, "mic", 0, {"test/mIoU": 50.0}, primary_metric="test/mIoU", wall_s=1200.0)
    _run(tmp_path, "mic", 1, {"test/mIoU": 52.0}, primary_metric="test/mIoU", wall_s=1500.0)
    table_csv = tmp_path / "t.csv"
    _collect(str(tmp_path), "--csv", str(table_csv))
    (row,) = list(csv.DictReader(table_csv.open()))
    assert float(row["wall_min"]) == 22.5  # (1200 + 1500) / 2 s
