"""What a run hands over: the student with BN statistics re-estimated on the unlabelled target
(``handover=recalibrated``, default) evaluated beside the student as trained and the teacher, written
to final.ckpt; ``handover=student`` keeps the trained statistics. Through the real entry points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mic_uda.evaluate import evaluate, load_module
from mic_uda.handover import has_running_bn, recalibrated_metrics
from mic_uda.train import train
from mic_uda.uda.bn import batchnorm_layers


def bn_state(net: nn.Module) -> list[torch.Tensor]:
    return [t for bn in batchnorm_layers(net) for t in (bn.running_mean, bn.running_var)]


def test_recalibrated_handover_is_evaluated_beside_student_and_teacher_and_written(make_cfg) -> None:
    cfg = make_cfg(["task=cls", "method=sdat_mic"])
    metrics = train(cfg)
    for who in ("student", "teacher", "recalibrated"):
        assert f"test/{who}/acc" in metrics and f"test/{who}/mean_class_acc" in metrics
    out = Path(cfg.paths.output_dir)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["handover"] == "recalibrated" and summary["primary_metric"] == "test/recalibrated/acc"
    final, last = (
        load_module(out / "checkpoints" / "final.ckpt"),
        load_module(out / "checkpoints" / "last.ckpt"),
    )
    # the handed-over student differs from the trained one only in its BN statistics ...
    f_state, l_state = final.student.state_dict(), last.student.state_dict()
    stats = {k for k in f_state if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert all(torch.equal(f_state[k], l_state[k]) for k in f_state if k not in stats)
    assert not all(torch.equal(f_state[k], l_state[k]) for k in stats)
    # ... and they are exactly what `evaluate bn_stats=target` re-estimates from last.ckpt (same seed)
    ecfg = make_cfg(
        [f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", "data=synthetic_cls", "bn_stats=target"],
        config_name="eval",
    )
    ecfg.data, ecfg.seed = cfg.data, cfg.seed  # the training run's tiny data settings
    emetrics = evaluate(ecfg)
    assert emetrics["test/student/acc"] == pytest.approx(metrics["test/recalibrated/acc"], abs=1e-9)
    final_eval = load_module(out / "checkpoints" / "final.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(bn_state(final_eval.student), bn_state(final.student)))


def test_student_handover_keeps_the_trained_statistics_and_still_reports_recalibrated(make_cfg) -> None:
    cfg = make_cfg(["task=cls", "method=source_only", "handover=student"])
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert "test/recalibrated/acc" in metrics and "test/student/acc" in metrics
    assert not (out / "checkpoints" / "final.ckpt").exists()
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["handover"] == "student" and summary["primary_metric"] == "test/acc"


def test_handover_choice_is_checked_at_start(make_cfg) -> None:
    with pytest.raises(ValueError, match=r"handover='teacher' is not one of \['recalibrated', 'student'\]"):
        train(make_cfg(["handover=teacher"]))


def test_only_networks_with_tracked_bn_statistics_are_recalibrated() -> None:
    assert has_running_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    assert not has_running_bn(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    assert not has_running_bn(nn.BatchNorm2d(4, track_running_stats=False))
    assert not has_running_bn(None)
    renamed = recalibrated_metrics({"test/student/acc": 1.0, "test/teacher/acc": 2.0, "test/acc": 1.0})
    assert renamed == {"test/recalibrated/acc": 1.0}
