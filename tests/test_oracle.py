"""The target-supervised oracle on file-based data: target labels are read although the target
config says ``with_labels: false`` (for every other method they stay hidden), and a target without
labels on disk is a one-line error."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from mic_uda.train import build_datamodule, train

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fault_check", ROOT / "scripts" / "fault_check.py")
fault_check = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(fault_check)  # type: ignore[union-attr]


def test_oracle_reads_target_labels_that_other_methods_never_see(make_cfg, tmp_path: Path) -> None:
    root = fault_check.write_seg_folder(tmp_path / "d")
    for method, has_label in (("oracle", True), ("mic", False)):
        cfg = make_cfg([*fault_check.folder_seg(root), f"method={method}"], tiny=False, out=tmp_path / method)
        assert cfg.data.datamodule.target.with_labels is False  # the config as users have it
        dm = build_datamodule(cfg)
        dm.setup("fit")
        assert ("label" in dm.datasets["target"][0]) is has_label
    metrics = train(
        make_cfg([*fault_check.folder_seg(root), "method=oracle"], tiny=False, out=tmp_path / "run")
    )
    assert metrics["train/loss_sup"] > 0


def test_oracle_without_target_labels_on_disk_is_a_one_line_error(make_cfg, tmp_path: Path) -> None:
    root = fault_check.write_seg_folder(tmp_path / "d")
    unlabelled = tmp_path / "t"
    shutil.copytree(root / "images", unlabelled / "images")
    overrides = [*fault_check.folder_seg(root), f"data.datamodule.target.root={unlabelled}", "method=oracle"]
    dm = build_datamodule(make_cfg(overrides, tiny=False))
    with pytest.raises(ValueError, match=r"^method=oracle trains on the target's labels, but") as e:
        dm.setup("fit")
    assert "\n" not in str(e.value)
