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

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
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


@torch.no_grad()
def reestimate_bn_statistics(module: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """AdaBN (Li et al., 2018): replace the running statistics of ``module``'s BN layers by the plain
    average over ``batches`` (unlabelled target images), everything else in eval mode.

    A label-free evaluation choice for BN networks: running statistics collected on the source
    (``student_bn=source``) normalise target features with the wrong mean and variance. Layers that
    do not track running statistics (a ``batch`` teacher) are left alone. A one-image batch after
    the first (the remainder of a set whose size is 1 mod the batch size) is skipped: it has no batch
    variance in a BatchNorm1d (an error in train mode) and a degenerate one in a BN on 1x1 maps.
    Returns how many layers were re-estimated; ``module`` is left in eval mode.
    """
    layers = [bn for bn in batchnorm_layers(module) if bn.track_running_stats]
    module.eval()
    if not layers:
        return 0
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: every batch counts the same
        bn.train()
    seen = 0
    for images in batches:
        if images.shape[0] < 2 and seen > 0:
            continue
        module(images)
        seen += 1
    for bn, momentum in zip(layers, momenta, strict=True):
        bn.momentum = momentum
        bn.eval()
    if seen == 0:
        raise ValueError("reestimate_bn_statistics: no batches given (is the target set empty?)")
    return len(layers)
