"""Train-time image transforms that torchvision lacks, for the ``transform`` hook of the datasets.

Digit UDA (USPS -> MNIST-M) needs the small-image augmentation of self-ensembling (French et al., ICLR
2018, the mean-teacher ancestor of MIC): a digit's class does not depend on its stroke polarity or
colour, so the source is shown with random intensity flips and per-channel gain/offset. This is
prior knowledge about the task, not a choice fitted to target labels: USPS strokes are white on
black, MNIST-M strokes are the inverse of a colour photograph patch (dark or light, any hue).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class IntensityAugment:
    """Random intensity flip, then per channel ``x -> g x + o`` of a ``(C, H, W)`` float image in
    [0, 1], with the gain ``g ~ U(gain)`` and the offset ``o ~ U(0, 1 - g)``: the channel's range
    [0, 1] becomes a random sub-range [o, o + g], so contrast shrinks and hue changes but nothing is
    clipped (a clamped offset could erase the stroke entirely).

    Args:
        flip_p: probability of ``x -> 1 - x`` (stroke polarity).
        gain: range of the per-channel contrast factor, within [0, 1] (``(1, 1)`` = off).
        per_channel: draw per channel (colour strokes and backgrounds) or once per image (grey).

    Draws use the global torch RNG, like torchvision's transforms, so a seeded run (and each seeded
    DataLoader worker) repeats exactly.
    """

    def __init__(
        self,
        flip_p: float = 0.5,
        gain: Sequence[float] = (1.0, 1.0),
        per_channel: bool = True,
    ) -> None:
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"IntensityAugment: flip_p must be in [0, 1], got {flip_p}")
        if len(gain) != 2 or not 0.0 <= gain[0] <= gain[1] <= 1.0:
            raise ValueError(
                f"IntensityAugment: gain must be a [low, high] range within [0, 1], got {list(gain)}"
            )
        self.flip_p = float(flip_p)
        self.gain = (float(gain[0]), float(gain[1]))
        self.per_channel = per_channel

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if not img.is_floating_point():
            raise TypeError(f"IntensityAugment expects a float image in [0, 1], got {img.dtype}")
        c = img.shape[0] if self.per_channel else 1
        if torch.rand(()) < self.flip_p:
            img = 1.0 - img
        gain = torch.empty(c, 1, 1).uniform_(*self.gain)
        offset = torch.rand(c, 1, 1) * (1.0 - gain)
        return img * gain + offset

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(flip_p={self.flip_p}, gain={self.gain}, per_channel={self.per_channel})"
        )
