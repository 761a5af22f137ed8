"""Explicit BatchNorm-statistics policies for teacher and student (SPEC section 1, step 8).

Which statistics a BN layer uses decides whether self-training on mixed/masked images helps or
collapses for BN networks, so both choices are options rather than accidents of train()/eval():

- teacher ``batch``: the official behaviour; the teacher is in eval mode except its BN layers, which
  normalise with the current (clean target) batch's own statistics and never update buffers.
- teacher ``running``: the teacher is fully in eval mode and uses running statistics (which the
  EMA then has to average from the student).
- student ``source``: only the supervised source pass updates the student's running statistics;
  mixed and masked passes normalise with their batch statistics but leave the buffers untouched.
- student ``all``: every student pass updates them (plain train mode).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from torch import nn

TeacherBN = Literal["batch", "running"]
StudentBN = Literal["source", "all"]
TEACHER_BN_CHOICES = ("batch", "running")
STUDENT_BN_CHOICES = ("source", "all")


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def set_teacher_mode(teacher: nn.Module, policy: TeacherBN) -> None:
    """Eval mode for everything (dropout, drop-path off), then BN per ``policy``."""
    check_choice("teacher_bn", policy, TEACHER_BN_CHOICES)
    teacher.eval()
    if policy == "batch":
        for bn in batchnorm_layers(teacher):
            bn.train()
            bn.track_running_stats = False  # batch statistics, buffers untouched


@contextmanager
def frozen_bn_statistics(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside, BN layers in train mode normalise with batch statistics but do not update buffers."""
    layers = [bn for bn in batchnorm_layers(module) if bn.track_running_stats] if enabled else []
    for bn in layers:
        bn.track_running_stats = False
    try:
        yield
    finally:
        for bn in layers:
            bn.track_running_stats = True
