"""The result-collection script used for the README tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(root: Path, method: str, seed: int, miou: float) -> None:
    d = root / f"{method}_{seed}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (d / "metrics.json").write_text(
        json.dumps({"data": "synthetic_seg", "method": method, "seed": seed, "metrics": {"test/mIoU": miou}})
    )


def test_collect_results_mean_std_table(tmp_path: Path) -> None:
    for seed, v in enumerate((50.0, 52.0, 54.0)):
        _run(tmp_path, "mic", seed, v)
    _run(tmp_path, "dacs", 0, 40.0)
    md = tmp_path / "table.md"
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "collect_results.py"),
            str(tmp_path),
            "--md",
            str(md),
            "--csv",
            str(tmp_path / "t.csv"),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "| synthetic_seg | mic | 0,1,2 | 52.00 ± 2.00 | 50.00 / 52.00 / 54.00 |" in out
    assert "| synthetic_seg | dacs | 0 | 40.00 ± 0.00 |" in out
    assert md.read_text().strip() == out.strip()
    assert (tmp_path / "t.csv").read_text().startswith("data,method,n,seeds")
