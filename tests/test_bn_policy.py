"""The BN-statistics policy (method.teacher.bn, method.student_bn) after a real training step and
after evaluation, for segmentation and classification (detection: tests/test_det_bn_policy.py).

Teacher ``batch``: every BN layer in train mode without running statistics, buffers never touched,
whatever forward ran. Student ``source``: only the supervised pass(es) move the running statistics;
``all``: every pass does (the official train-mode forwards)."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch

import mic_uda.train as train_module
from mic_uda.train import train
from mic_uda.uda.bn import batchnorm_layers


class Snapshots(L.Callback):
    """The module before its first step, and the module after that step and after validation."""

    def __init__(self) -> None:
        self.module: Any = None
        self.before: dict[str, Any] | None = None
        self.after_step: dict[str, Any] | None = None
        self.after_val: list[tuple[list[bool], list[bool]]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.module = pl_module
        if self.before is None:
            self.before = {
                "student": copy.deepcopy(pl_module.student),
                "teacher": copy.deepcopy(pl_module.teacher),
                "batch": copy.deepcopy(batch),
                "rng": torch.get_rng_state(),  # drop-path draws of the supervised pass
            }

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if self.after_step is None:
            self.after_step = {"student": copy.deepcopy(pl_module.student)}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if pl_module.teacher is not None:
            self.after_val.append(bn_modes(pl_module.teacher))


def bn_modes(net: torch.nn.Module) -> tuple[list[bool], list[bool]]:
    layers = batchnorm_layers(net)
    return [bn.training for bn in layers], [bn.track_running_stats for bn in layers]


def buffers(net: torch.nn.Module) -> list[torch.Tensor]:
    return [
        b for bn in batchnorm_layers(net) for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    ]


def run(make_cfg, monkeypatch: pytest.MonkeyPatch, overrides: list[str]) -> Snapshots:
    snaps = Snapshots()
    real = train_module.instantiate_dict
    monkeypatch.setattr(
        train_module,
        "instantiate_dict",
        lambda cfg, what: [*real(cfg, what), snaps] if what == "callbacks" else real(cfg, what),
    )
    train(make_cfg([*overrides, "trainer.max_steps=1", "trainer.val_check_interval=1"]))
    return snaps


def replay_supervised(snaps: Snapshots) -> torch.nn.Module:
    """The supervised pass alone, replayed on a copy of the starting student with the same RNG."""
    replay = copy.deepcopy(snaps.before["student"]).train()
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(snaps.before["rng"])
        replay(snaps.before["batch"]["source"]["image"])
    return replay


def assert_batch_teacher(snaps: Snapshots) -> None:
    teacher = snaps.module.teacher
    n = len(batchnorm_layers(teacher))
    assert n > 0
    assert bn_modes(teacher) == ([True] * n, [False] * n)  # after train, validation and test
    assert snaps.after_val and all(m == ([True] * n, [False] * n) for m in snaps.after_val)
    assert all(torch.equal(a, b) for a, b in zip(buffers(teacher), buffers(snaps.before["teacher"])))
    assert not teacher.training  # dropout / drop-path off


@pytest.mark.parametrize("student_bn", ["source", "all"])
def test_seg_bn_policy_after_a_step_and_after_evaluation(
    student_bn: str, make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    snaps = run(make_cfg, monkeypatch, ["method=mic", f"method.student_bn={student_bn}"])
    assert_batch_teacher(snaps)
    got, sup_only = buffers(snaps.after_step["student"]), buffers(replay_supervised(snaps))
    if student_bn == "source":
        assert all(torch.equal(a, b) for a, b in zip(got, sup_only))
    else:  # supervised + ClassMix + masked pass
        assert all(
            int(n) == 3
            for bn in batchnorm_layers(snaps.after_step["student"])
            for n in [bn.num_batches_tracked]
        )
        assert not all(torch.equal(a, b) for a, b in zip(got, sup_only))


@pytest.mark.parametrize(("student_bn", "passes"), [("source", 2), ("all", 4)])
def test_cls_bn_policy_after_a_step_and_after_evaluation(
    student_bn: str, passes: int, make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SDAT+MIC: the joint [source, target] forward runs twice (SAM ascent at w, update at w + e);
    ``all`` adds the two masked passes, as the official train-mode code."""
    snaps = run(make_cfg, monkeypatch, ["task=cls", "method=sdat_mic", f"method.student_bn={student_bn}"])
    assert_batch_teacher(snaps)
    tracked = {int(bn.num_batches_tracked) for bn in batchnorm_layers(snaps.after_step["student"])}
    assert tracked == {passes}


def test_cls_source_only_student_stats_are_the_supervised_batch_exactly(
    make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    snaps = run(make_cfg, monkeypatch, ["task=cls", "method=source_only"])
    replay = replay_supervised(snaps)
    assert all(torch.equal(a, b) for a, b in zip(buffers(snaps.after_step["student"]), buffers(replay)))
