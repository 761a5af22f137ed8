"""Optimiser parameter groups and the lr schedules: warm-up + poly of DAFormer/MIC (mmcv semantics),
inv of DANN/CDAN/SDAT, warm-up + multi-step of the MIC/SADA detection code (maskrcnn-benchmark).

A bias rule such as maskrcnn-benchmark's (``BIAS_LR_FACTOR 2``, ``WEIGHT_DECAY_BIAS 0``: every parameter
whose name contains "bias") is ``param_group_keys: {bias: {lr_mult: 2.0, decay_mult: 0.0}}`` in
:func:`param_groups`."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

import torch
from torch import nn


def param_groups(
    module: nn.Module, base_lr: float, weight_decay: float, custom_keys: Mapping[str, Mapping[str, float]]
) -> list[dict]:
    """Groups by substring of the parameter name, as mmcv's ``paramwise_cfg.custom_keys``.

    Keys are tried longest first and the first one contained in the name sets ``lr_mult`` and
    ``decay_mult`` (e.g. ``head: {lr_mult: 10}``, ``norm: {decay_mult: 0}``). Parameters without
    gradients (frozen parts) are left out.
    """
    keys = sorted(sorted(custom_keys), key=len, reverse=True)
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult, decay_mult = 1.0, 1.0
        for key in keys:
            if key in name:
                lr_mult = float(custom_keys[key].get("lr_mult", 1.0))
                decay_mult = float(custom_keys[key].get("decay_mult", 1.0))
                break
        groups.setdefault((lr_mult, decay_mult), []).append(p)
    return [
        {"params": ps, "lr": base_lr * lm, "weight_decay": weight_decay * dm, "lr_mult": lm}
        for (lm, dm), ps in groups.items()
    ]


def warmup_poly_factor(
    step: int,
    max_steps: int,
    warmup_steps: int,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> float:
    """LR multiplier at ``step``: mmcv's poly decay with linear warm-up, as the papers trained.

    ``poly = (1 - step / max_steps) ** power`` (to ``min_lr_ratio``); during warm-up it is scaled by
    ``1 - (1 - step / warmup_steps) * (1 - warmup_ratio)``.
    """
    if max_steps <= 0:
        raise ValueError(f"scheduler max_steps must be positive, got {max_steps}")
    progress = min(step, max_steps) / max_steps
    factor = (1.0 - min_lr_ratio) * (1.0 - progress) ** power + min_lr_ratio
    if step < warmup_steps:
        k = (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
        factor *= 1.0 - k
    return factor


def warmup_poly_scheduler(
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    warmup_steps: int,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` (so Lightning checkpoints and restores it) over :func:`warmup_poly_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_poly_factor(s, max_steps, warmup_steps, warmup_ratio, power, min_lr_ratio),
    )


def inv_factor(step: int, max_steps: int, gamma: float = 10.0, power: float = 0.75) -> float:
    """LR multiplier ``(1 + gamma p)^-power`` with progress ``p = step / max_steps`` (DANN/CDAN/SDAT:
    their ``(1 + 0.001 i)^-0.75`` over 10k iterations is this with gamma = 10)."""
    if max_steps <= 0:
        raise ValueError(f"scheduler max_steps must be positive, got {max_steps}")
    return float((1.0 + gamma * min(step, max_steps) / max_steps) ** (-power))


def inv_scheduler(
    optimizer: torch.optim.Optimizer, max_steps: int, gamma: float = 10.0, power: float = 0.75
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`inv_factor` (checkpointed and restored by Lightning)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: inv_factor(s, max_steps, gamma, power))


def inv_iteration_factor(step: int, gamma: float = 0.001, power: float = 0.75) -> float:
    """LR multiplier ``(1 + gamma t)^-power`` per iteration ``t``, independent of the run length: the
    official DANN/CDAN/SDAT/MIC-cls schedule (``--lr-gamma 0.001 --lr-decay 0.75``), which
    :func:`inv_factor` equals only for a 10k-iteration run."""
    return float((1.0 + gamma * step) ** (-power))


def inv_iteration_scheduler(
    optimizer: torch.optim.Optimizer, max_steps: int, gamma: float = 0.001, power: float = 0.75
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`inv_iteration_factor`; ``max_steps`` is accepted (every schedule
    gets it) and not used: the decay does not depend on when the run ends."""
    del max_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: inv_iteration_factor(s, gamma, power))


def warmup_multistep_factor(
    step: int,
    milestones: Sequence[int],
    gamma: float = 0.1,
    warmup_steps: int = 500,
    warmup_ratio: float = 1 / 3,
) -> float:
    """LR multiplier of maskrcnn-benchmark's ``WarmupMultiStepLR`` (linear warm-up), which the
    official MIC/SADA detection code uses: ``gamma ** (number of milestones <= step)``, during warm-up
    times ``warmup_ratio * (1 - a) + a`` with ``a = step / warmup_steps`` (the same ramp as
    :func:`warmup_poly_factor`'s; MIC det/maskrcnn_benchmark/solver/lr_scheduler.py:39-51)."""
    factor = 1.0
    if step < warmup_steps:
        a = step / warmup_steps
        factor = warmup_ratio * (1.0 - a) + a
    return float(factor * gamma ** bisect.bisect_right(sorted(milestones), step))


def warmup_multistep_scheduler(
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    milestones: Sequence[int],
    gamma: float = 0.1,
    warmup_steps: int = 500,
    warmup_ratio: float = 1 / 3,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`warmup_multistep_factor`; ``max_steps`` is accepted (every schedule
    gets it) and not used: the steps do not depend on when the run ends."""
    del max_steps
    steps = [int(m) for m in milestones]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_multistep_factor(s, steps, gamma, warmup_steps, warmup_ratio)
    )
