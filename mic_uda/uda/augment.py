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

from mic_uda.uda.bn import check_choice

DRAW_CHOICES = ("image", "batch", "run")
SEMANTICS_CHOICES = ("torchvision", "kornia05")


def kornia05_brightness(img: torch.Tensor, factor: float) -> torch.Tensor:
    """kornia 0.5 ``ColorJitter`` brightness: additive, ``img + (factor - 1)``, clamped to [0, 1]."""
    return (img + (factor - 1.0)).clamp(0.0, 1.0)


def kornia05_contrast(img: torch.Tensor, factor: float) -> torch.Tensor:
    """kornia 0.5 contrast: a plain multiply (no blend towards the mean), clamped to [0, 1]."""
    return (img * factor).clamp(0.0, 1.0)


def kornia05_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    """kornia 0.5 saturation: the HSV S channel times ``factor``, clamped to [0, 1], H and V kept.

    In closed form (no HSV round trip): with V = max(r, g, b) and S = (V - min) / V, every channel is
    ``V - (V - c) * S' / S`` for the new S' = clamp(S * factor, 0, 1); grey pixels stay as they are."""
    v = img.amax(dim=-3, keepdim=True)
    sat = torch.where(v > 0, (v - img.amin(dim=-3, keepdim=True)) / v.clamp_min(1e-12), torch.zeros_like(v))
    new_sat = (sat * factor).clamp(0.0, 1.0)
    ratio = torch.where(sat > 0, new_sat / sat.clamp_min(1e-12), torch.ones_like(sat))
    return v - (v - img) * ratio


#: (brightness, contrast, saturation, hue) ops of each semantics; kornia's hue shift of factor * 2 pi
#: on H in [0, 2 pi) is torchvision's (h + factor) mod 1
TORCHVISION_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
KORNIA05_OPS = (kornia05_brightness, kornia05_contrast, kornia05_saturation, TF.adjust_hue)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, device=generator.device).item()


@dataclass(frozen=True)
class StrongAugment:
    """Colour jitter (strength ``s``, probability ``color_jitter_p``) then Gaussian blur.

    Factors in ``[1-s, 1+s]`` for brightness/contrast/saturation, hue shift in ``[-s, s]`` of the hue
    circle, ops in a random order. ``semantics``: what the factors do. ``torchvision`` (default):
    multiplicative brightness, contrast blended towards the grey mean, saturation blended with
    greyscale; ``kornia05``: what the official code's pinned kornia 0.5 ``ColorJitter`` does
    (``kornia/augmentation/augmentation.py`` ``ColorJitter.apply_transform`` and ``kornia/enhance/adjust.py``
    at v0.5.10): brightness additive, contrast a plain multiply, saturation on the HSV S channel.
    Blur kernel ~ 10 % of the image side (odd), sigma ~ U(blur_sigma).

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
    semantics: str = "torchvision"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("method.augment.draw", self.draw, DRAW_CHOICES)
        check_choice("method.augment.semantics", self.semantics, SEMANTICS_CHOICES)

    def run_coins(self) -> tuple[float, float]:
        """The (jitter, blur) coins of ``draw=run``: a function of the seed alone, so a resumed run
        gets the same ones without checkpointing them."""
        g = torch.Generator().manual_seed(int(self.seed) + 0x5EED)
        return _uniform(g, 0, 1), _uniform(g, 0, 1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augmented copy of ``images`` ``(B, 3, H, W)`` in [0, 1]; every draw from ``generator``."""
        coins: tuple[float, float] | None = None
        if self.draw == "run":
            coins = self.run_coins()
        elif self.draw == "batch":
            coins = (_uniform(generator, 0, 1), _uniform(generator, 0, 1))
        return torch.stack([self._one(img, generator, coins) for img in images])

    def _one(self, img: torch.Tensor, g: torch.Generator, coins: tuple[float, float] | None) -> torch.Tensor:
        s = self.color_jitter_strength
        if s > 0 and (coins[0] if coins else _uniform(g, 0, 1)) < self.color_jitter_p:
            fns = KORNIA05_OPS if self.semantics == "kornia05" else TORCHVISION_OPS
            ops = [
                (fns[0], _uniform(g, max(0.0, 1 - s), 1 + s)),
                (fns[1], _uniform(g, max(0.0, 1 - s), 1 + s)),
                (fns[2], _uniform(g, max(0.0, 1 - s), 1 + s)),
                (fns[3], _uniform(g, -min(s, 0.5), min(s, 0.5))),
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
