"""Procedural shape images: an embedded source -> target *classification* UDA benchmark.

Why this exists: the classification task needs a default dataset that needs no files or downloads, runs
in minutes on a CPU, is deterministic from a seed, and still poses a genuine domain-adaptation problem,
so that source-only, DACS-style self-training and MIC can be compared end to end.

The classes are shapes (``SHAPES``: circle, square, triangle, plus, ring, bar, frame, cross, crescent,
hollow triangle; the first ``num_classes`` are used), drawn as signed distance fields with a random
position, size and a small rotation (+-15 degrees, so that "plus" and "cross" stay distinct; bars take
any orientation). What a shape *is* never changes between domains; how it is *rendered* does:

* ``"source"`` (clean rendered icons, like VisDA's synthetic half or USPS): a flat, pale-tinted
  background with a faint gradient, a flat foreground colour with a clear brightness step to it (either
  polarity), large shapes (radius 0.50-0.72 of the half-image), bold strokes (half-thickness 0.20-0.26
  of the radius), sharp anti-aliased edges, no blur, no noise.
* ``"target"`` (photographs, built like MNIST-M): a textured background (colour blobs, oriented grain,
  fine noise) and a foreground that *inverts* the background under the shape (``|background - mask|``,
  as MNIST-M blends digits into BSDS patches), so the foreground carries texture and its colour is the
  complement of the background's; smaller shapes (radius 0.42-0.65) with thin strokes (0.11-0.16),
  reduced contrast, a colour cast, Gaussian blur and sensor noise. Texture, blur and noise scale with a
  per-image severity drawn uniformly in [0, 1]: real target sets mix easy and hard images, and
  self-training grows from the easy ones.

What a source-trained classifier relies on (flat regions, crisp bold strokes, colour statistics) breaks
in the target, while the shape evidence survives. Measured with a 3-layer BN CNN on 32 px, 6 classes,
4000 images x 20 epochs, one seed: source-only 1.00 on source but 0.28 on target (0.43 when BatchNorm
normalises with target batch statistics, as the official train-mode teacher does; it mostly answers
"ring"), a target-trained oracle 0.81: a large gap to close, and a foothold for pseudo-labels; the
same structure as USPS -> MNIST-M.

Every item is generated on the fly from a seed derived from (seed, domain, split, index): no memory,
identical across processes and DataLoader workers, and a different ``seed`` gives other images.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["DOMAINS", "SHAPES", "SPLITS", "SyntheticClsDataset", "render_shape"]

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "plus",
    "ring",
    "bar",
    "frame",
    "cross",
    "crescent",
    "hollow_triangle",
)
DOMAINS: tuple[str, ...] = ("source", "target")
SPLITS: tuple[str, ...] = ("train", "val", "test")

_ROT_JITTER = math.radians(15.0)
# Per-domain geometry: shape radius (fraction of the half-image) and stroke half-thickness (fraction of
# the radius).
_RADIUS = {"source": (0.50, 0.72), "target": (0.42, 0.65)}
_STROKE = {"source": (0.20, 0.26), "target": (0.11, 0.16)}


def _u(gen: torch.Generator, lo: float, hi: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


def _box(u: torch.Tensor, v: torch.Tensor, bx: float, by: float | torch.Tensor) -> torch.Tensor:
    qx, qy = u.abs() - bx, v.abs() - by
    return torch.hypot(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def _triangle(u: torch.Tensor, v: torch.Tensor, r: float = 0.95) -> torch.Tensor:
    """Equilateral triangle pointing up (image v grows downwards), bounding box centred on the origin
    (Inigo Quilez's exact distance)."""
    k = math.sqrt(3.0)
    x = u.abs() - r
    y = -v + r / k + r / (2 * k)  # iq: base at y = 0; + r/(2k): bounding-box centre at the origin
    fold = (x + k * y) > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - x.clamp(-2 * r, 0)
    return -torch.hypot(x, y) * torch.sign(y)


def _sdf(shape: str, u: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) in units of the shape radius; ``t`` = stroke half-thickness."""
    if shape == "circle":
        return torch.hypot(u, v) - 0.9
    if shape == "square":
        return _box(u, v, 0.75, 0.75)
    if shape == "triangle":
        return _triangle(u, v)
    if shape in ("plus", "cross"):
        if shape == "cross":
            u, v = (u + v) / math.sqrt(2.0), (v - u) / math.sqrt(2.0)
        return torch.minimum(_box(u, v, 0.95, t), _box(v, u, 0.95, t))
    if shape == "ring":
        return (torch.hypot(u, v) - 0.75).abs() - t
    if shape == "bar":
        return _box(u, v, 1.0, 0.3)
    if shape == "frame":
        return _box(u, v, 0.75, 0.75).abs() - t
    if shape == "crescent":
        return torch.maximum(torch.hypot(u, v) - 0.9, 0.75 - torch.hypot(u - 0.4, v + 0.25))
    if shape == "hollow_triangle":
        return _triangle(u, v).abs() - t
    raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")


def _coverage(shape: str, domain: str, size: int, gen: torch.Generator) -> torch.Tensor:
    """Anti-aliased shape coverage (1,H,W) in [0,1] with a random pose drawn for ``domain``."""
    r = float(_u(gen, *_RADIUS[domain]))
    t = _u(gen, *_STROKE[domain])
    theta = float(_u(gen, 0, math.pi)) if shape == "bar" else float(_u(gen, -_ROT_JITTER, _ROT_JITTER))
    room = max(0.0, 0.95 - r)
    cx, cy = (float(c) for c in _u(gen, -room, room, (2,)))
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    dx, dy = grid.view(1, size) - cx, grid.view(size, 1) - cy
    c, s = math.cos(theta), math.sin(theta)
    u, v = (c * dx + s * dy) / r, (-s * dx + c * dy) / r
    dist_px = _sdf(shape, u, v, t) * r * size / 2
    return (0.5 - dist_px).clamp(0, 1).unsqueeze(0)


def _hsv(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    k = (torch.tensor([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def _render_source(alpha: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    size = alpha.shape[-1]
    # Flat colours with a clear brightness step between shape and background (either polarity).
    dark, light = float(_u(gen, 0.05, 0.35)), float(_u(gen, 0.7, 1.0))
    v_fg, v_bg = (light, dark) if bool(torch.rand((), generator=gen) < 0.5) else (dark, light)
    fg = _hsv(torch.rand((), generator=gen), _u(gen, 0.4, 1.0), torch.tensor(v_fg))
    bg = _hsv(torch.rand((), generator=gen), _u(gen, 0.0, 0.5), torch.tensor(v_bg)).view(3, 1, 1)
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    phi = float(_u(gen, 0, 2 * math.pi))
    ramp = math.cos(phi) * grid.view(1, 1, size) + math.sin(phi) * grid.view(1, size, 1)
    bg = bg + _u(gen, 0.0, 0.08) * ramp
    return bg * (1 - alpha) + fg.view(3, 1, 1) * alpha


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable 5-tap Gaussian with edge replication, as shifted slice sums: a grouped conv2d is ~100x
    slower on a tiny image when intra-op threads compete with a busy CPU (measured 48 ms vs 0.1 ms)."""
    taps = [math.exp(-0.5 * (j / sigma) ** 2) for j in range(-2, 3)]
    taps = [t / sum(taps) for t in taps]
    for dim in (-1, -2):
        n = img.shape[dim]
        first, last = img.narrow(dim, 0, 1), img.narrow(dim, n - 1, 1)
        padded = torch.cat([first, first, img, last, last], dim=dim)
        out = padded.narrow(dim, 0, n) * taps[0]
        for j in range(1, 5):
            out.add_(padded.narrow(dim, j, n), alpha=taps[j])
        img = out
    return img


def _render_target(alpha: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    size = alpha.shape[-1]
    # Per-image severity: real target sets mix easy and hard images, and self-training needs the easy
    # ones to start from; texture, blur and noise all grow with it.
    sev = float(torch.rand((), generator=gen))
    # Background brightness away from mid-grey, so the inverted foreground keeps some contrast.
    grey = _u(gen, 0.1, 0.35) if bool(torch.rand((), generator=gen) < 0.5) else _u(gen, 0.65, 0.9)
    mean = grey + 0.5 * (_u(gen, 0.15, 0.85, (3, 1, 1)) - grey)  # natural photos are not that saturated
    low = 0.08 * torch.randn((1, 1, 4, 4), generator=gen) + 0.05 * torch.randn((1, 3, 4, 4), generator=gen)
    blobs = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[0]
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    grain = torch.zeros(1, size, size)
    for _ in range(2):  # oriented wood/fabric-like grain: amp * sin(a x + b y + c)
        phi, freq, amp = float(_u(gen, 0, math.pi)), float(_u(gen, 3, 8)), float(_u(gen, 0.02, 0.06))
        ax = 2 * math.pi * freq * math.cos(phi) * grid
        by = 2 * math.pi * freq * math.sin(phi) * grid + float(_u(gen, 0, 2 * math.pi))
        # expanded as sin(ax) cos(by) + cos(ax) sin(by): sin on 32 values, not 1024 (torch runs sin
        # multi-threaded even on small tensors, ~7 ms per call on a busy 2-core CPU)
        grain += amp * (ax.sin().view(1, 1, size) * by.cos().view(1, size, 1))
        grain += amp * (ax.cos().view(1, 1, size) * by.sin().view(1, size, 1))
    fine = _u(gen, 0.02, 0.05) * torch.randn((1, size, size), generator=gen)
    bg = (mean + sev * (blobs + grain + fine)).clamp(0, 1)
    img = bg * (1 - alpha) + (1 - bg) * alpha  # = |bg - mask|: MNIST-M's blend
    m = img.mean(dim=(1, 2), keepdim=True)
    img = m + (img - m) * _u(gen, 0.75, 1.0)
    img = img * (1 + _u(gen, -0.1, 0.1, (3, 1, 1)))
    img = _gaussian_blur(img, 0.3 + 0.6 * sev)
    img = img + (0.01 + 0.03 * sev) * torch.randn(img.shape, generator=gen)
    return img


def render_shape(shape: str, domain: str, size: int, gen: torch.Generator) -> torch.Tensor:
    """One image (3,size,size) float32 in [0,1] of ``shape`` in the look of ``domain``."""
    _check_choice("domain", domain, DOMAINS)
    alpha = _coverage(shape, domain, size, gen)
    fn = _render_source if domain == "source" else _render_target
    return fn(alpha, gen).clamp_(0, 1)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"invalid {name} {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def _derive_seed(seed: int, domain: str, split: str) -> int:
    """Stable (process-independent, unlike hash()) seed per (seed, domain, split): independent draws."""
    digest = hashlib.sha256(f"mic_uda.synthetic_cls:{seed}:{domain}:{split}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


class SyntheticClsDataset(Dataset):
    """Embedded source/target shape classification dataset, generated per item (see module docstring).

    Items: ``{"image": float32 (3,size,size) in [0,1], "label": int64 scalar tensor}``. Labels cycle
    through the classes (``index % num_classes``), so every split is exactly balanced.
    """

    def __init__(
        self,
        domain: str = "source",
        split: str = "train",
        num_images: int = 2000,
        size: int = 32,
        seed: int = 0,
        num_classes: int = 6,
        hflip: bool = False,
    ) -> None:
        _check_choice("domain", domain, DOMAINS)
        _check_choice("split", split, SPLITS)
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in 2..{len(SHAPES)} (one per shape), got {num_classes}")
        if size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {size}")
        self.domain, self.split, self.num_images, self.size = domain, split, num_images, int(size)
        self.seed, self.num_classes, self.hflip = seed, num_classes, hflip
        self.class_names: list[str] = list(SHAPES[:num_classes])
        self._base_seed = _derive_seed(seed, domain, split)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        label = i % self.num_classes
        gen = torch.Generator().manual_seed((self._base_seed + 1_000_003 * i) % (2**63))
        image = render_shape(self.class_names[label], self.domain, self.size, gen)
        if self.hflip and torch.rand(()) < 0.5:  # global RNG: seeded per worker by Lightning
            image = image.flip(-1)
        return {"image": image, "label": torch.tensor(label, dtype=torch.int64)}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(domain={self.domain!r}, split={self.split!r}, "
            f"num_images={self.num_images}, size={self.size}, seed={self.seed}, "
            f"num_classes={self.num_classes}, hflip={self.hflip})"
        )
