"""Optimiser parameter groups and the warm-up + poly schedule of DAFormer/MIC (mmcv semantics)."""

from __future__ import annotations

from collections.abc import Mapping

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
