"""Strong photometric augmentation of DACS/DAFormer/MIC (SPEC section 1, step 5).

Images are in [0, 1] (networks normalise internally), so no de-/re-normalisation is needed and
nothing is clamped to a wrong range. Every random draw comes from the caller's generator; the
per-image loop is over the batch only, the pixel work is torchvision's tensor ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

DRAW_CHOICES = ("image", "batch", "run")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, device=generator.device).item()


@dataclass(frozen=True)
class StrongAugment:
    """Colour jitter (strength ``s``, probability ``color_jitter_p``) then Gaussian blur.

    Factors follow torchvision semantics: brightness/contrast/saturation in ``[1-s, 1+s]``, hue shift
    in ``[-s, s]`` of the hue circle (kornia's ``hue=s`` of the official code, which it scales by 2*pi),
    ops in a random order. Blur kernel ~ 10 % of the image side (odd), sigma ~ U(blur_sigma).

    ``draw`` says when the apply/skip coins of jitter and blur are thrown (factors and sigma are
    always drawn per image): ``image`` per image and call; ``batch`` once per call, shared by the
    batch (official DACS/MIC segmentation, ``dacs.py`` draws them once per iteration); ``run`` once
    for the whole run from ``seed`` (the official MIC classification/detection ``Masking`` draws
    them in its constructor, so jitter/blur are on or off for a whole run: a defect kept as a flag).
    """

    color_jitter_strength: float = 0.2
    color_jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    draw: str = "image"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.draw not in DRAW_CHOICES:
            raise ValueError(f"method.augment.draw={self.draw!r} is not one of {list(DRAW_CHOICES)}")

    def run_coins(self) -> tuple[float, float]:
        """The (jitter, blur) coins of ``draw=run``: a function of the seed alone, so a resumed run
        gets the same ones without checkpointing them."""
        g = torch.Generator().manual_seed(int(self.seed) + 0x5EED)
        return _uniform(g, 0, 1), _uniform(g, 0, 1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        coins: tuple[float, float] | None = None
        if self.draw == "run":
            coins = self.run_coins()
        elif self.draw == "batch":
            coins = (_uniform(generator, 0, 1), _uniform(generator, 0, 1))
        return torch.stack([self._one(img, generator, coins) for img in images])

    def _one(self, img: torch.Tensor, g: torch.Generator, coins: tuple[float, float] | None) -> torch.Tensor:
        s = self.color_jitter_strength
        if s > 0 and (coins[0] if coins else _uniform(g, 0, 1)) < self.color_jitter_p:
            ops = [
                (TF.adjust_brightness, _uniform(g, max(0.0, 1 - s), 1 + s)),
                (TF.adjust_contrast, _uniform(g, max(0.0, 1 - s), 1 + s)),
                (TF.adjust_saturation, _uniform(g, max(0.0, 1 - s), 1 + s)),
                (TF.adjust_hue, _uniform(g, -min(s, 0.5), min(s, 0.5))),
            ]
            for i in torch.randperm(4, generator=g, device=g.device).tolist():
                fn, factor = ops[i]
                img = fn(img, factor)
        if (coins[1] if coins else _uniform(g, 0, 1)) < self.blur_p:
            sigma = _uniform(g, *self.blur_sigma)
            ky, kx = blur_kernel_size(img.shape[-2]), blur_kernel_size(img.shape[-1])
            img = TF.gaussian_blur(img, kernel_size=[kx, ky], sigma=[sigma, sigma])
        return img


def blur_kernel_size(side: int) -> int:
    """Odd kernel of about 10 % of the side, the official ``floor(ceil(0.1 s) - 0.5 + ceil(0.1 s) % 2)``."""
    c = math.ceil(0.1 * side)
    return max(3, math.floor(c - 0.5 + c % 2))
