"""Procedurally generated street scenes: an embedded source -> target segmentation UDA benchmark.

Why this exists: the project needs a default dataset that needs no files or downloads, is deterministic
from a seed, and still poses a *genuine* domain-adaptation problem, so that DACS/MIC can be exercised and
compared end to end on a laptop.

Design:

* :func:`generate_layouts` draws street-like label maps in a simple pinhole perspective: a horizon, a road
  converging to a vanishing point, sidewalks flanking it, building/hedge facades along the street, a distant
  skyline, and cars / persons / poles / trees standing on the ground, composited with a z-buffer (painter's
  order by ground distance) so occlusions are consistent.
* :func:`render` turns label maps into RGB images with a domain-specific appearance model:

  - ``"source"`` (synthetic game, daytime): bright saturated class colours, small per-image and per-object
    colour variation, simple textures (building windows, dashed lane markings, paving joints), sharp, little
    noise.
  - ``"target"`` (dusk + fog, real camera): a different, darker, lower-contrast palette with a per-image
    colour cast, different textures (sparsely lit windows, wet asphalt with puddles), distance-dependent fog,
    a global illumination gradient, slight blur and sensor noise.

  Road and sidewalk share one colour/texture distribution in the target, so they are locally
  indistinguishable there and only spatial context (sidewalks flank the road, persons and poles stand on
  sidewalks, cars drive on the road) separates them. This is the situation MIC's masked image consistency
  is designed for. Distant buildings also fade into the hazy sky, a milder second ambiguity.

All generation is vectorised over whole image batches; Python loops only run over object slots, classes
and chunks of images.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "CLASS_NAMES",
    "DOMAINS",
    "IGNORE_INDEX",
    "PALETTE",
    "SPLITS",
    "SyntheticSegDataset",
    "generate_layouts",
    "render",
]

CLASS_NAMES: tuple[str, ...] = (
    "sky",
    "building",
    "vegetation",
    "road",
    "sidewalk",
    "car",
    "person",
    "pole",
)
# Cityscapes colours of the same classes, for colourised label visualisation.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (70, 130, 180),
    (70, 70, 70),
    (107, 142, 35),
    (128, 64, 128),
    (244, 35, 232),
    (0, 0, 142),
    (220, 20, 60),
    (153, 153, 153),
)
IGNORE_INDEX = 255
DOMAINS: tuple[str, ...] = ("source", "target")
SPLITS: tuple[str, ...] = ("train", "val")

SKY, BUILDING, VEGETATION, ROAD, SIDEWALK, CAR, PERSON, POLE = range(8)
NUM_CLASSES = len(CLASS_NAMES)

_FACADE_ID0 = 64  # first instance id of facade segments (objects use 1..63)
_MAX_INST = _FACADE_ID0 + 2 * 96
# Images are produced in chunks so that peak memory stays bounded for large ``num``.
_CHUNK = 128


# ----------------------------------------------------------------------------------------------------------
# Small random helpers (all take an explicit generator so that everything is reproducible).
# ----------------------------------------------------------------------------------------------------------
def _u(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    """Uniform samples in [lo, hi)."""
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


def _bern(gen: torch.Generator, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Boolean Bernoulli(p) samples."""
    return torch.rand(shape, generator=gen) < p


def _lowfreq(gen: torch.Generator, n: int, c: int, cells: int, size: tuple[int, int]) -> torch.Tensor:
    """Smooth random field (n, c, H, W) ~ N(0, ~1): bilinearly upsampled ``cells x cells`` Gaussian noise."""
    z = torch.randn((n, c, cells, cells), generator=gen)
    return F.interpolate(z, size=size, mode="bilinear", align_corners=False)


def _grids(size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in units of image height: ys (1,H,1) in [0,1], xs (1,1,W) in [0,W/H]."""
    h, w = size
    ys = ((torch.arange(h, dtype=torch.float32) + 0.5) / h).view(1, h, 1)
    xs = ((torch.arange(w, dtype=torch.float32) + 0.5) / h).view(1, 1, w)
    return ys, xs


# ----------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------
def _layout_chunk(n: int, size: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` street layouts. Geometry: ground row y has depth d = y - h (h = horizon) and a point at
    lateral world offset u (in camera heights) projects to x = vx + (shift + u) * d; an object of world
    height s (camera heights) standing at depth d spans s * d image heights."""
    hh, ww = size
    ys, xs = _grids(size)
    aspect = ww / hh
    px = 1.0 / hh  # one pixel in coordinate units
    p = (n, 1, 1)

    horizon = _u(gen, p, 0.33, 0.50)
    vx = aspect * _u(gen, p, 0.38, 0.62)
    shift = _u(gen, p, -0.30, 0.30)  # road direction (camera yaw)
    rw = _u(gen, p, 0.45, 0.85)  # road half-width
    sw = _u(gen, (2, *p), 0.25, 0.55)  # sidewalk width, left / right

    labels = torch.full((n, hh, ww), SKY, dtype=torch.int64)
    # Instance ids: 0 = stuff, 1.._N_OBJ = standing objects, _FACADE_ID0 + ... = facade segments.
    inst = torch.zeros((n, hh, ww), dtype=torch.int64)

    # Distant skyline around the vanishing point (blocks and tree lines standing on the horizon).
    for _ in range(7):
        xc = vx + aspect * _u(gen, p, -0.35, 0.35)
        half_w = _u(gen, p, 0.02, 0.08)
        top = _u(gen, p, 0.02, 0.12)
        active = _bern(gen, p, 0.8)
        is_tree = _bern(gen, p, 0.3)
        rect = ((xs - xc).abs() < half_w) & (ys >= horizon - top)
        blob = ((xs - xc) / half_w) ** 2 + ((ys - horizon) / top) ** 2 < 1.0
        labels = torch.where(active & ~is_tree & rect, BUILDING, labels)
        labels = torch.where(active & is_tree & blob, VEGETATION, labels)

    # Facades along both sides of the street: vertical planes on the outer sidewalk edges. For a pixel
    # column x the plane is hit at depth dd; world distance 1/dd picks a building segment with its own
    # height (and type: building, or a hedge / tree row).
    n_seg = 96
    for side_i, side in enumerate((-1.0, 1.0)):
        slope = shift + side * (rw + sw[side_i])
        dd = ((xs - vx) / slope).clamp(min=1e-4)  # (n,1,W); <=1e-4 means the other side of the street
        seg_len = _u(gen, p, 1.5, 4.0)
        offset = _u(gen, p, 0.0, 1.0)
        seg = (1.0 / (dd * seg_len) + offset).floor().clamp(max=n_seg - 1).long()  # (n,1,W)
        is_veg = _bern(gen, (n, n_seg), 0.22)
        height = torch.where(is_veg, _u(gen, (n, n_seg), 1.1, 2.2), _u(gen, (n, n_seg), 1.8, 6.0))
        seg_h = height.gather(1, seg.view(n, ww)).view(n, 1, ww)
        seg_v = is_veg.gather(1, seg.view(n, ww)).view(n, 1, ww)
        facade = (dd > 2e-4) & (ys >= horizon - (seg_h - 1.0) * dd)
        labels = torch.where(facade, torch.where(seg_v, VEGETATION, BUILDING), labels)
        inst = torch.where(facade, _FACADE_ID0 + side_i * n_seg + seg, inst)

    # Ground: road and sidewalks below the horizon.
    d = (ys - horizon).clamp(min=1e-4)  # (n,H,1)
    below = ys > horizon
    u = (xs - vx) / d - shift  # lateral world coordinate (n,H,W)
    road = below & (u.abs() < rw)
    walk = below & (((u < -rw) & (u > -rw - sw[0])) | ((u > rw) & (u < rw + sw[1])))
    labels = torch.where(walk, SIDEWALK, labels)
    labels = torch.where(road, ROAD, labels)

    # Standing objects, composited with a z-buffer on ground depth (larger = closer to the camera).
    zbuf = torch.full((n, hh, ww), -1.0)
    ground = 1.0 - horizon  # depth of the bottom image row

    next_id = 1

    def paint(mask: torch.Tensor, depth: torch.Tensor, cls: int) -> None:
        nonlocal labels, zbuf, inst, next_id
        m = mask & (depth > zbuf)
        labels = torch.where(m, cls, labels)
        inst = torch.where(m, next_id, inst)
        zbuf = torch.where(m, depth, zbuf)
        next_id += 1

    def side_of() -> tuple[torch.Tensor, torch.Tensor]:
        right = _bern(gen, p, 0.5)
        return torch.where(right, 1.0, -1.0), torch.where(right, sw[1], sw[0])

    # Object sizes in camera heights (the camera sits roughly 3 m above the road).
    # Trees: trunk + elliptic crown on the outer part of the sidewalk.
    for _ in range(4):
        s, swk = side_of()
        dep = ground * _u(gen, p, 0.08, 1.0) ** 1.3
        x0 = vx + (shift + s * (rw + swk * _u(gen, p, 0.6, 0.9))) * dep
        y0 = horizon + dep
        trunk_h = _u(gen, p, 0.8, 1.2) * dep
        r = _u(gen, p, 0.35, 0.6) * dep
        trunk = ((xs - x0).abs() < torch.clamp(0.04 * dep, min=0.6 * px)) & (ys <= y0) & (ys >= y0 - trunk_h)
        crown = ((xs - x0) / r) ** 2 + ((ys - (y0 - trunk_h - 0.6 * r)) / (1.15 * r)) ** 2 < 1.0
        paint((trunk | crown) & _bern(gen, p, 0.6), dep, VEGETATION)

    # Poles (street lights / sign posts) near the kerb.
    for _ in range(4):
        s, swk = side_of()
        dep = ground * _u(gen, p, 0.1, 1.0) ** 1.2
        x0 = vx + (shift + s * (rw + swk * _u(gen, p, 0.05, 0.25))) * dep
        y0 = horizon + dep
        top = y0 - _u(gen, p, 1.4, 2.2) * dep
        half = torch.clamp(0.022 * dep, min=0.55 * px)
        pole = ((xs - x0).abs() < half) & (ys <= y0) & (ys >= top)
        # lamp arm reaching over the road, or a sign plate
        arm_len = _u(gen, p, 0.25, 0.5) * dep
        arm_x = (xs - x0) * (-s)
        arm = (arm_x > 0) & (arm_x < arm_len) & ((ys - top).abs() < half * 1.2) & _bern(gen, p, 0.5)
        plate_y = top + _u(gen, p, 0.1, 0.6) * (y0 - top)
        plate = ((xs - x0).abs() < 0.11 * dep) & ((ys - plate_y).abs() < 0.07 * dep) & _bern(gen, p, 0.3)
        paint((pole | arm | plate) & _bern(gen, p, 0.8), dep, POLE)

    # Persons on the sidewalks: legs, torso ellipse, head.
    for _ in range(6):
        s, swk = side_of()
        dep = ground * _u(gen, p, 0.12, 1.0) ** 1.1
        x0 = vx + (shift + s * (rw + swk * _u(gen, p, 0.2, 0.85))) * dep
        y0 = horizon + dep
        ph = _u(gen, p, 0.55, 0.7) * dep
        pw = _u(gen, p, 0.17, 0.22) * dep
        dx = xs - x0
        legs = (dx.abs() < torch.clamp(0.3 * pw, min=0.6 * px)) & (ys <= y0) & (ys >= y0 - 0.48 * ph)
        torso = (dx / (0.5 * pw)) ** 2 + ((ys - (y0 - 0.64 * ph)) / (0.22 * ph)) ** 2 < 1.0
        head = dx**2 + (ys - (y0 - 0.91 * ph)) ** 2 < (0.085 * ph) ** 2 + (0.5 * px) ** 2
        paint((legs | torso | head) & _bern(gen, p, 0.65), dep, PERSON)

    # Cars on the road, seen from behind: body, cabin (trapezoid) and wheels.
    for _ in range(5):
        dep = ground * _u(gen, p, 0.08, 1.0) ** 1.3
        cw = _u(gen, p, 0.55, 0.7)
        lane = (rw - 0.5 * cw).clamp(min=0.05)
        x0 = vx + (shift + lane * _u(gen, p, -1.0, 1.0)) * dep
        y0 = horizon + dep
        w = cw * dep
        ch = _u(gen, p, 0.42, 0.55) * dep
        dx = (xs - x0).abs()
        wheel_top = y0 - 0.18 * ch
        body = (dx < 0.5 * w) & (ys <= wheel_top) & (ys >= y0 - 0.6 * ch)
        wheels = (dx < 0.47 * w) & (dx > 0.25 * w) & (ys <= y0) & (ys > wheel_top)
        t = ((ys - (y0 - ch)) / (0.4 * ch)).clamp(0.0, 1.0)  # 0 at roof, 1 at the cabin bottom
        cabin = (dx < (0.3 + 0.14 * t) * w) & (ys >= y0 - ch) & (ys < y0 - 0.6 * ch)
        paint((body | wheels | cabin) & _bern(gen, p, 0.7), dep, CAR)

    return labels, inst


def _generate(num: int, size: tuple[int, int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Layouts plus instance ids (num,H,W) int64; instances let :func:`render` colour each object
    individually."""
    size = (int(size[0]), int(size[1]))
    if num <= 0:
        empty = torch.empty((0, *size), dtype=torch.int64)
        return empty, empty.clone()
    chunks = [_layout_chunk(min(_CHUNK, num - i), size, generator) for i in range(0, num, _CHUNK)]
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


def generate_layouts(num: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Draw ``num`` street-scene label maps of shape ``size`` = (H, W); returns (num, H, W) int64 class ids.

    Deterministic given the generator state; generated in fixed-size chunks to bound peak memory.
    """
    return _generate(num, size, generator)[0]


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------
def _rgb(*rows: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# Base colours per class (order of CLASS_NAMES).
_SRC_BASE = _rgb(
    (0.42, 0.66, 0.96),  # sky: saturated blue
    (0.80, 0.64, 0.46),  # building: sandstone (hue re-drawn per image)
    (0.24, 0.62, 0.18),  # vegetation: saturated green
    (0.36, 0.36, 0.39),  # road: asphalt grey
    (0.82, 0.66, 0.62),  # sidewalk: light pinkish paving
    (0.80, 0.10, 0.10),  # car (mostly replaced by per-object colours)
    (0.20, 0.30, 0.75),  # person (mostly replaced by per-object colours)
    (0.62, 0.62, 0.66),  # pole: light metal
)
_SRC_BUILDING_HUES = _rgb((0.80, 0.64, 0.46), (0.72, 0.36, 0.28), (0.86, 0.82, 0.74), (0.62, 0.66, 0.72))
_TGT_BASE = _rgb(
    (0.80, 0.66, 0.60),  # sky: hazy dusk glow, still the brightest region
    (0.20, 0.22, 0.30),  # building: dark blue-grey
    (0.17, 0.24, 0.14),  # vegetation: dark olive
    (0.30, 0.29, 0.31),  # road: wet asphalt
    (0.30, 0.29, 0.31),  # sidewalk: *same* as road (the ambiguous pair)
    (0.30, 0.26, 0.28),  # car (mixed with desaturated per-object colours)
    (0.16, 0.15, 0.17),  # person: dark clothing
    (0.11, 0.11, 0.12),  # pole: dark silhouette
)
# How much the per-object colour field replaces the class colour.
_SRC_OBJ_MIX = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.85, 0.75, 0.0])
_TGT_OBJ_MIX = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.6, 0.3, 0.0])
# Amplitude of smooth luminance noise per class.
_SRC_LF_AMP = torch.tensor([0.03, 0.06, 0.12, 0.05, 0.05, 0.04, 0.05, 0.04])
_TGT_LF_AMP = torch.tensor([0.06, 0.10, 0.15, 0.16, 0.16, 0.08, 0.08, 0.05])
# Amplitude of fine (per-pixel, pre-blur) texture per class.
_SRC_HF_AMP = torch.tensor([0.0, 0.02, 0.10, 0.04, 0.03, 0.01, 0.02, 0.01])
_TGT_HF_AMP = torch.tensor([0.01, 0.06, 0.25, 0.12, 0.12, 0.04, 0.05, 0.03])


def _gather_class(table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image class table (n,K,C) -> per-pixel values (n,C,H,W)."""
    n, h, w = labels.shape
    c = table.shape[-1]
    idx = labels.view(n, 1, h * w).expand(n, c, h * w)
    return table.transpose(1, 2).gather(2, idx).view(n, c, h, w)


def _horizon_rows(labels: torch.Tensor) -> torch.Tensor:
    """Estimated horizon (n,1,1) in height units: the first image row that contains ground."""
    n, h, _ = labels.shape
    ground = ((labels == ROAD) | (labels == SIDEWALK)).any(dim=2)  # (n,H)
    first = torch.where(ground.any(dim=1), ground.float().argmax(dim=1), torch.full((n,), h // 2))
    return (first.float() / h).view(n, 1, 1)


def _instance_field(
    instances: torch.Tensor | None, n: int, size: tuple[int, int], channels: int, gen: torch.Generator
) -> torch.Tensor:
    """Uniform [0,1) random values (n,C,H,W) that are constant per object instance, so that each car /
    person / building gets its own colour. Without instance ids a smooth coarse field is used instead."""
    if instances is None:
        z = torch.rand((n, channels, 3, 3), generator=gen)
        return F.interpolate(z, size=size, mode="bilinear", align_corners=False)
    table = torch.rand((n, channels, _MAX_INST), generator=gen)
    idx = instances.clamp(0, _MAX_INST - 1).view(n, 1, -1).expand(n, channels, -1)
    return table.gather(2, idx).view(n, channels, *size)


def _car_parts(
    labels: torch.Tensor, instances: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Masks (n,H,W) of the rear window and of the two rear lights of every car, from per-instance
    bounding boxes (scatter min/max over pixels), or None without instance ids."""
    if instances is None:
        return None
    n, hh, ww = labels.shape
    car = labels == CAR
    ids = torch.where(car, instances, 0).clamp(0, _FACADE_ID0 - 1).view(n, -1)
    ys, xs = _grids((hh, ww))
    yy = ys.expand(1, hh, ww).reshape(1, -1).expand(n, -1)
    xx = xs.expand(1, hh, ww).reshape(1, -1).expand(n, -1)
    big = torch.full((n, _FACADE_ID0), 1e4)
    y0 = big.scatter_reduce(1, ids, torch.where(car.view(n, -1), yy, 1e4), "amin")
    y1 = (-big).scatter_reduce(1, ids, torch.where(car.view(n, -1), yy, -1e4), "amax")
    x0 = big.scatter_reduce(1, ids, torch.where(car.view(n, -1), xx, 1e4), "amin")
    x1 = (-big).scatter_reduce(1, ids, torch.where(car.view(n, -1), xx, -1e4), "amax")

    def per_pixel(v: torch.Tensor) -> torch.Tensor:
        return v.gather(1, ids).view(n, hh, ww)

    y0, y1, x0, x1 = per_pixel(y0), per_pixel(y1), per_pixel(x0), per_pixel(x1)
    hgt, wid = (y1 - y0).clamp(min=1e-6), (x1 - x0).clamp(min=1e-6)
    ry, rx = (ys - y0) / hgt, (xs - x0) / wid  # relative position inside the car's box
    window = car & (ry > 0.08) & (ry < 0.36) & ((rx - 0.5).abs() < 0.22)
    lights = car & (ry > 0.5) & (ry < 0.66) & ((rx - 0.5).abs() > 0.3) & ((rx - 0.5).abs() < 0.46)
    return window, lights


def _saturate(c: torch.Tensor, amount: float) -> torch.Tensor:
    """Push (n,3,...) colours away from (amount>1) or towards (amount<1) their grey value."""
    g = c.mean(dim=1, keepdim=True)
    return (g + (c - g) * amount).clamp(0.0, 1.0)


def _lane_markings(labels: torch.Tensor, horizon: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Dashed centre line (n,H,W bool) on the road. The road centre is a straight image line through the
    vanishing point, so it is fitted per image by least squares on rows where the road is not clipped."""
    n, hh, ww = labels.shape
    ys, xs = _grids((hh, ww))
    road = labels == ROAD
    big = 1e4
    rmin = torch.where(road, xs, big).amin(dim=2)  # (n,H)
    rmax = torch.where(road, xs, -big).amax(dim=2)
    has = road.any(dim=2)
    edge = 1.0 / hh
    valid = (has & (rmin > edge) & (rmax < ww / hh - edge)).float()
    d = ys.view(1, hh) - horizon.view(n, 1)  # (n,H)
    cx = 0.5 * (rmin + rmax)
    # weighted least squares cx = a + b*d
    sw = valid.sum(1).clamp(min=1.0)
    md = (valid * d).sum(1) / sw
    mc = (valid * torch.where(valid > 0, cx, 0.0)).sum(1) / sw
    var = (valid * (d - md[:, None]) ** 2).sum(1).clamp(min=1e-6)
    cov = (valid * (d - md[:, None]) * (torch.where(valid > 0, cx, 0.0) - mc[:, None])).sum(1)
    b = cov / var
    a = mc - b * md
    centre = (a[:, None] + b[:, None] * d).view(n, hh, 1)
    dpos = d.clamp(min=1e-3).view(n, hh, 1)
    dash_len = _u(gen, (n, 1, 1), 2.0, 4.0)
    phase = _u(gen, (n, 1, 1), 0.0, 1.0)
    dash = torch.frac(1.0 / (dpos * dash_len) + phase) < 0.5
    near = (xs - centre).abs() < 0.025 * dpos + 0.45 / hh
    enough = (valid.sum(1) >= 3).view(n, 1, 1)
    return road & dash & near & enough


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (n,3,H,W) with reflect padding (camera optics)."""
    r = max(1, int(math.ceil(2 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(img.dtype)
    c = img.shape[1]
    img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(img, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _render_source(labels: torch.Tensor, instances: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Daytime 'game' look: bright saturated flat colours with simple clean textures."""
    n, hh, ww = labels.shape
    size = (hh, ww)
    ys, xs = _grids(size)
    horizon = _horizon_rows(labels)

    pal = _SRC_BASE.expand(n, -1, -1).clone()
    pal[:, BUILDING] = _SRC_BUILDING_HUES[torch.randint(0, len(_SRC_BUILDING_HUES), (n,), generator=gen)]
    pal = pal * _u(gen, (n, 1, 1), 0.9, 1.08) + 0.035 * torch.randn((n, NUM_CLASSES, 3), generator=gen)
    col = _gather_class(pal.clamp(0, 1), labels)

    # Per-object colour for cars / persons (saturated random colours), per-facade brightness.
    field = _instance_field(instances, n, size, 4, gen)
    obj = 0.1 + 0.85 * _saturate(field[:, :3], 2.0)
    mix = _SRC_OBJ_MIX[labels].unsqueeze(1)
    col = col * (1 - mix) + obj * mix
    facade = ((labels == BUILDING) | (labels == VEGETATION)).unsqueeze(1)
    col = torch.where(facade, col * (0.85 + 0.3 * field[:, 3:]), col)
    parts = _car_parts(labels, instances)
    if parts is not None:  # dark rear window, red rear lights
        col = torch.where(parts[0].unsqueeze(1), _rgb((0.15, 0.2, 0.28)).view(1, 3, 1, 1), col)
        col = torch.where(parts[1].unsqueeze(1), _rgb((0.9, 0.15, 0.1)).view(1, 3, 1, 1), col)

    # Sky gets lighter towards the horizon.
    sky = (labels == SKY).unsqueeze(1)
    toward = (ys / horizon.clamp(min=0.1)).clamp(0, 1).unsqueeze(1)
    col = torch.where(sky, col + 0.35 * toward**2 * (1 - col), col)

    # Building windows on a regular grid.
    pxw = _u(gen, (n, 1, 1), 0.035, 0.07)
    pyw = _u(gen, (n, 1, 1), 0.04, 0.08)
    win = (torch.frac(xs / pxw + _u(gen, (n, 1, 1), 0, 1)) < 0.5) & (
        torch.frac(ys / pyw + _u(gen, (n, 1, 1), 0, 1)) < 0.55
    )
    win_col = (_rgb((0.22, 0.32, 0.48)) + 0.05 * torch.randn((n, 3), generator=gen)).view(n, 3, 1, 1)
    col = torch.where((win & (labels == BUILDING)).unsqueeze(1), win_col, col)

    # Paving joints on sidewalks (transverse lines at regular world distances).
    d = (ys - horizon).clamp(min=1e-3)
    joints = torch.frac(1.0 / (d * _u(gen, (n, 1, 1), 0.6, 1.0))) < 0.12
    col = torch.where((joints & (labels == SIDEWALK)).unsqueeze(1), col * 0.82, col)

    # Smooth luminance variation + fine texture, both class dependent.
    lf = _lowfreq(gen, n, 1, 8, size) * _SRC_LF_AMP[labels].unsqueeze(1)
    hf = (torch.rand((n, 1, hh, ww), generator=gen) - 0.5) * 2 * _SRC_HF_AMP[labels].unsqueeze(1)
    col = col * (1 + lf + hf)

    # Dashed lane markings on top (white or yellow).
    lane = _lane_markings(labels, horizon, gen).unsqueeze(1)
    lane_col = torch.where(
        _bern(gen, (n, 1, 1, 1), 0.75), _rgb((0.95, 0.95, 0.92)).view(1, 3, 1, 1), _rgb((0.95, 0.8, 0.2)).view(1, 3, 1, 1)
    )
    col = torch.where(lane, lane_col, col)

    col = col + 0.01 * torch.randn(col.shape, generator=gen)
    return col.clamp(0.0, 1.0)


def _render_target(labels: torch.Tensor, instances: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Dusk + fog 'real camera' look. Road and sidewalk are drawn from one identical distribution."""
    n, hh, ww = labels.shape
    size = (hh, ww)
    ys, xs = _grids(size)
    horizon = _horizon_rows(labels)

    pal = _TGT_BASE.expand(n, -1, -1).clone()
    pal = pal * _u(gen, (n, 1, 1), 0.85, 1.15) + 0.03 * torch.randn((n, NUM_CLASSES, 3), generator=gen)
    pal[:, SIDEWALK] = pal[:, ROAD]  # same per-image colour for the ambiguous pair
    col = _gather_class(pal.clamp(0, 1), labels)

    # Desaturated, darker per-object colours; per-facade brightness.
    field = _instance_field(instances, n, size, 4, gen)
    obj = 0.5 * _saturate(field[:, :3], 0.5)
    mix = _TGT_OBJ_MIX[labels].unsqueeze(1)
    col = col * (1 - mix) + obj * mix
    facade = ((labels == BUILDING) | (labels == VEGETATION)).unsqueeze(1)
    col = torch.where(facade, col * (0.8 + 0.4 * field[:, 3:]), col)
    parts = _car_parts(labels, instances)
    if parts is not None:  # glowing rear lights at dusk (drawn after fog below, see `glow`)
        glow = parts[1].unsqueeze(1)

    # Sparse lit windows on dark facades (a cell grid with a random on/off table).
    pxw = _u(gen, (n, 1, 1), 0.025, 0.05)
    pyw = _u(gen, (n, 1, 1), 0.03, 0.06)
    gx = xs / pxw + _u(gen, (n, 1, 1), 0, 1)
    gy = ys / pyw + _u(gen, (n, 1, 1), 0, 1)
    cell = (gy.floor().long() % 64) * 64 + (gx.floor().long() % 64)  # (n,H,W)
    lit_table = _bern(gen, (n, 64 * 64), 0.18)
    lit = lit_table.gather(1, cell.view(n, -1)).view(n, hh, ww)
    lit = lit & (torch.frac(gx) < 0.6) & (torch.frac(gy) < 0.6) & (labels == BUILDING)
    lit_col = (_rgb((0.85, 0.68, 0.38)) * _u(gen, (n, 1), 0.6, 1.0)).view(n, 3, 1, 1)
    col = torch.where(lit.unsqueeze(1), lit_col, col)

    # Wet asphalt: puddles reflecting the sky, on road *and* sidewalk alike.
    ground = ((labels == ROAD) | (labels == SIDEWALK)).unsqueeze(1)
    puddle = (_lowfreq(gen, n, 1, 12, size) - 1.1).clamp(min=0.0, max=0.6)
    col = torch.where(ground, col + puddle * (pal[:, SKY].view(n, 3, 1, 1) * 0.9 - col), col)

    # Smooth luminance variation + fine texture.
    lf = _lowfreq(gen, n, 1, 10, size) * _TGT_LF_AMP[labels].unsqueeze(1)
    hf = torch.randn((n, 1, hh, ww), generator=gen) * _TGT_HF_AMP[labels].unsqueeze(1)
    col = col * (1 + lf + hf)

    # Global illumination gradient in a random direction.
    theta = _u(gen, (n, 1, 1), 0, 2 * math.pi)
    proj = (xs - 0.5 * ww / hh) * torch.cos(theta) + (ys - 0.5) * torch.sin(theta)
    col = col * (1.0 + _u(gen, (n, 1, 1), 0.2, 0.5) * proj).unsqueeze(1)

    # Fog: transmission grows with image distance from the horizon (a proxy for scene distance).
    airlight = (_rgb((0.62, 0.56, 0.60)) + 0.05 * torch.randn((n, 3), generator=gen)).view(n, 3, 1, 1)
    t_min = _u(gen, (n, 1, 1), 0.35, 0.55)
    t = t_min + (1 - t_min) * ((ys - horizon).abs() / 0.45).clamp(0, 1) ** 0.8
    t = t.unsqueeze(1)
    col = col * t + airlight * (1 - t)

    # Colour cast (bluish or orange dusk) and lower contrast.
    cast = torch.where(
        _bern(gen, (n, 1), 0.5), _rgb((0.85, 0.95, 1.15)), _rgb((1.15, 0.95, 0.8))
    ) + 0.04 * torch.randn((n, 3), generator=gen)
    col = col * cast.view(n, 3, 1, 1)

    if parts is not None:
        col = torch.where(glow, _rgb((1.0, 0.25, 0.15)).view(1, 3, 1, 1), col)
    col = _blur(col, 0.8)
    col = col + _u(gen, (n, 1, 1, 1), 0.02, 0.045) * torch.randn(col.shape, generator=gen)
    return col.clamp(0.0, 1.0)


def render(
    labels: torch.Tensor,
    domain: str,
    generator: torch.Generator,
    instances: torch.Tensor | None = None,
) -> torch.Tensor:
    """Render label maps (num,H,W) into images (num,3,H,W) float32 in [0,1] with the appearance of
    ``domain`` ("source" or "target"). Deterministic given the generator state.

    ``instances`` (optional, same shape, from the layout generator) gives every object its own colour;
    without it object colours vary smoothly over the image instead.
    """
    _check_choice("domain", domain, DOMAINS)
    fn = _render_source if domain == "source" else _render_target
    labels = labels.long().cpu()
    if instances is not None:
        instances = instances.long().cpu()
        if instances.shape != labels.shape:
            raise ValueError(f"instances shape {tuple(instances.shape)} != labels shape {tuple(labels.shape)}")
    n, hh, ww = labels.shape
    chunks = [
        fn(labels[i : i + _CHUNK], None if instances is None else instances[i : i + _CHUNK], generator)
        for i in range(0, n, _CHUNK)
    ]
    return torch.cat(chunks).contiguous() if chunks else torch.empty((0, 3, hh, ww))


# ----------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------
def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"invalid {name} {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def _derive_seed(seed: int, domain: str, split: str) -> int:
    """Stable (process-independent, unlike hash()) 56-bit seed for a (seed, domain, split) triple, so that
    every domain/split combination is an independent draw."""
    digest = hashlib.sha256(f"mic_uda.synthetic_seg:{seed}:{domain}:{split}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


class SyntheticSegDataset(Dataset):
    """Embedded source/target street-scene segmentation dataset, generated eagerly and deterministically.

    Items are dicts ``{"image": float32 (3,H,W) in [0,1], "label": int64 (H,W), "index": int}``. Images are
    kept as uint8 internally (4x less memory, like real 8-bit camera data) and converted on access.
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        domain: str = "source",
        split: str = "train",
        num_images: int = 400,
        size: int | tuple[int, int] = 128,
        seed: int = 0,
        hflip: bool = False,
    ) -> None:
        _check_choice("domain", domain, DOMAINS)
        _check_choice("split", split, SPLITS)
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        self.domain = domain
        self.split = split
        self.size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.seed = seed
        self.hflip = hflip
        self.class_names: tuple[str, ...] = CLASS_NAMES
        self.palette: tuple[tuple[int, int, int], ...] = PALETTE
        self.num_classes: int = NUM_CLASSES

        gen = torch.Generator().manual_seed(_derive_seed(seed, domain, split))
        self.labels, instances = _generate(num_images, self.size, gen)
        images = render(self.labels, domain, gen, instances=instances)
        self.images: torch.Tensor = (images * 255.0).round_().to(torch.uint8)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        image = self.images[i].float().div_(255.0)
        label = self.labels[i]
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            label = label.flip(-1)
        return {"image": image, "label": label.clone(), "index": i}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(domain={self.domain!r}, split={self.split!r}, "
            f"num_images={len(self)}, size={self.size}, seed={self.seed}, hflip={self.hflip})"
        )
