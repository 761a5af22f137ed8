"""Sharpness-Aware Minimisation as two functions around any optimiser (SDAT smooths the task loss).

``perturb`` moves the weights to ``w + rho * g / ||g||`` using the gradients currently stored (of the
task loss only); the caller then computes the full loss there, back-propagates, ``restore``s ``w``
and lets its own optimiser step with those gradients. Functions instead of an optimiser wrapper so
Lightning keeps owning the real optimiser (its state, schedulers and checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def perturb(
    params: Iterable[torch.nn.Parameter], rho: float
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Add ``e_w = rho * g / (||g||_2 + 1e-12)`` (global norm over all parameters) in place; returns
    the applied offsets for :func:`restore`. Parameters without a gradient are left alone."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return []
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad]))
    scale = rho / (grad_norm + 1e-12)
    offsets = []
    for p in with_grad:
        e_w = p.grad * scale
        p.add_(e_w)
        offsets.append((p, e_w))
    return offsets


@torch.no_grad()
def restore(offsets: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """Undo :func:`perturb` (back to ``w``) before the optimiser step."""
    for p, e_w in offsets:
        p.sub_(e_w)
