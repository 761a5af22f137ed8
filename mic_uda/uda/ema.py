"""Mean teacher: the EMA update shared by every task (SPEC section 1, step 8)."""

from __future__ import annotations

import torch
from torch import nn


def ema_alpha(step: int, alpha: float) -> float:
    """Ramp ``min(1 - 1/(t+1), alpha)``: the teacher follows the student closely at the start."""
    return min(1.0 - 1.0 / (step + 1), alpha)


@torch.no_grad()
def copy_weights(teacher: nn.Module, student: nn.Module) -> None:
    """Make the teacher an exact copy of the student (parameters and buffers)."""
    teacher.load_state_dict(student.state_dict())


@torch.no_grad()
def ema_update(
    teacher: nn.Module, student: nn.Module, step: int, alpha: float, average_buffers: bool = False
) -> float:
    """One fused EMA step ``teacher <- a * teacher + (1 - a) * student`` over all parameters.

    Only parameters are averaged, as in the official code, unless ``average_buffers`` is set (then
    floating buffers such as BN running statistics are averaged too and integer ones copied), which
    a teacher that normalises with running statistics needs. Returns the alpha used.
    """
    a = ema_alpha(step, alpha)
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}: not twins")
    torch._foreach_lerp_(t_params, s_params, 1.0 - a)
    if average_buffers:
        for tb, sb in zip(teacher.buffers(), student.buffers()):
            if tb.is_floating_point():
                tb.lerp_(sb, 1.0 - a)
            else:
                tb.copy_(sb)
    return a
