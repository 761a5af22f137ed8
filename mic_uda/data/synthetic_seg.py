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
    colour cast, different textures (other window grids, partly lit; wet asphalt with puddles; glowing
    rear lights), distance-dependent fog, a global illumination gradient, slight blur and sensor noise.
    The per-class colour change is not one global linear map (road and sidewalk collapse onto one colour),
    but hue relations partly survive (vegetation stays greenish, sky bluish and brightest), so a
    source-trained model gets a foothold for self-training.

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

# Instance ids (uint8) used to give objects individual colours: 0 = ground/sky, 1..31 standing objects,
# 32..63 distant skyline blocks, 64.. facade segments, and two ids marking car parts.
_SKYLINE_ID0 = 32
_FACADE_ID0 = 64
_N_SEG = 92  # facade segments per side: ids 64..247
_CAR_WINDOW_ID = 254
_CAR_LIGHT_ID = 255
# Images are produced in chunks so that peak memory stays bounded for large ``num``.
_CHUNK = 32


# ----------------------------------------------------------------------------------------------------------
# Small helpers (all randomness goes through an explicit generator so that everything is reproducible).
# ----------------------------------------------------------------------------------------------------------
def _u(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    """Uniform samples in [lo, hi)."""
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


def _bern(gen: torch.Generator, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Boolean Bernoulli(p) samples."""
    return torch.rand(shape, generator=gen) < p


def _lowfreq(gen: torch.Generator, n: int, cells: int, size: tuple[int, int]) -> torch.Tensor:
    """Smooth random field (n,1,H,W), roughly N(0,1): bilinearly upsampled ``cells x cells`` noise."""
    z = torch.randn((n, 1, cells, cells), generator=gen)
    return F.interpolate(z, size=size, mode="bilinear", align_corners=False)


def _grids(size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in units of image height: ys (1,H,1) in [0,1], xs (1,1,W) in [0,W/H]."""
    h, w = size
    ys = ((torch.arange(h, dtype=torch.float32) + 0.5) / h).view(1, h, 1)
    xs = ((torch.arange(w, dtype=torch.float32) + 0.5) / h).view(1, 1, w)
    return ys, xs


def _blend_(dst: torch.Tensor, mask: torch.Tensor, value: torch.Tensor | int) -> None:
    """In place ``dst[mask] = value`` for integer tensors, with broadcasting ``value``.

    Written as integer arithmetic (dst += mask * (value - dst)) because that is ~10x faster than
    torch.where / masked_fill on CPU at these sizes."""
    dst.addcmul_(mask.to(dst.dtype), value - dst)


def _lt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """0/1 integer mask of a < b for int16 fixed-point operands (subtract + clamp: much faster on CPU than
    comparison ops, which produce bool without vectorisation)."""
    return (b - a).clamp_(0, 1)


# ----------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------
def _layout_chunk(n: int, size: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` street layouts; returns labels (n,H,W) uint8 and instance ids (n,H,W) uint8.

    Geometry (pinhole camera over a flat ground): the ground row y has depth proxy d = y - horizon, and a
    point at lateral world offset u (in camera heights) projects to x = vx + (shift + u) * d; an object of
    world height s standing at depth d spans s * d image heights. Every shape is described by per-row
    half-widths (or intervals) around a centre column, so a shape costs a handful of full-image integer
    ops; geometry is compared in int16 fixed point for speed.
    """
    hh, ww = size
    ys, xs = _grids(size)
    aspect = ww / hh
    px = 1.0 / hh  # one pixel in coordinate units
    p = (n, 1, 1)
    fix = hh * max(1, 4096 // max(hh, ww))  # fixed-point units per coordinate unit (|values| < 2**14)

    def q(v: torch.Tensor) -> torch.Tensor:
        return (v.clamp(-2.0, 2.0 + aspect) * fix).round_().to(torch.int16)

    ys_q, xs_q = q(ys), q(xs)

    horizon = _u(gen, p, 0.33, 0.50)
    vx = aspect * _u(gen, p, 0.38, 0.62)
    shift = _u(gen, p, -0.30, 0.30)  # road direction (camera yaw)
    rw = _u(gen, p, 0.45, 0.85)  # road half-width
    sw = _u(gen, (2, *p), 0.25, 0.55)  # sidewalk width, left / right

    labels = torch.full((n, hh, ww), SKY, dtype=torch.int16)
    inst = torch.zeros((n, hh, ww), dtype=torch.int16)

    def rows(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        """(n,H,1) float indicator of top <= y <= bottom."""
        return ((ys >= top) & (ys <= bottom)).float()

    def ellipse_hw(cy: torch.Tensor, rx: torch.Tensor, ry: torch.Tensor) -> torch.Tensor:
        """Per-row half-width of an axis-aligned ellipse (0 outside)."""
        return rx * (1.0 - ((ys - cy) / ry) ** 2).clamp(min=0.0).sqrt()

    def centred(x0: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
        """0/1 mask of |x - x0| < hw(y)."""
        return _lt((xs_q - q(x0)).abs(), q(hw))

    # Distant skyline around the vanishing point: blocks and tree lines standing on the horizon.
    for k in range(7):
        xc = vx + aspect * _u(gen, p, -0.35, 0.35)
        half_w = _u(gen, p, 0.02, 0.08)
        top = _u(gen, p, 0.02, 0.12)
        active = _bern(gen, p, 0.8).float()
        is_tree = _bern(gen, p, 0.3)
        hw_rect = half_w * rows(horizon - top, horizon + 0.02)
        mask = centred(xc, torch.where(is_tree, ellipse_hw(horizon, half_w, top), hw_rect) * active)
        _blend_(labels, mask, torch.where(is_tree, VEGETATION, BUILDING).to(torch.int16))
        _blend_(inst, mask, _SKYLINE_ID0 + k)

    # Facades along both sides of the street: vertical planes on the outer sidewalk edges. Column x hits
    # the plane at depth dd; the world distance 1/dd selects a segment (a building, or a hedge / tree row)
    # with its own height in camera heights.
    for side_i, side in enumerate((-1.0, 1.0)):
        slope = shift + side * (rw + sw[side_i])
        dd = (xs - vx) / slope  # (n,1,W), > 0 on this side of the street
        valid = dd > 2e-4
        dd = dd.clamp(min=2e-4)
        seg_len = _u(gen, p, 1.5, 4.0)
        offset = _u(gen, p, 0.0, 1.0)
        seg = (1.0 / (dd * seg_len) + offset).floor().clamp(0, _N_SEG - 1).long().view(n, ww)
        is_veg = _bern(gen, (n, _N_SEG), 0.22)
        height = torch.where(is_veg, _u(gen, (n, _N_SEG), 1.1, 2.2), _u(gen, (n, _N_SEG), 1.8, 5.5))
        seg_h = height.gather(1, seg).view(n, 1, ww)
        cls = torch.where(is_veg.gather(1, seg), VEGETATION, BUILDING).to(torch.int16).view(n, 1, ww)
        top = torch.where(valid, horizon - (seg_h - 1.0) * dd, 10.0)
        mask = _lt(q(top) - 1, ys_q)  # y >= top
        _blend_(labels, mask, cls)
        _blend_(inst, mask, (_FACADE_ID0 + side_i * _N_SEG + seg).to(torch.int16).view(n, 1, ww))

    # Ground: sidewalks flanking the road below the horizon.
    d = (ys - horizon).clamp(min=0.0)  # (n,H,1)
    dx = xs_q - q(vx + shift * d)  # (n,H,W) offset from the road centre line
    walk = _lt(q(-(rw + sw[0]) * d), dx) * _lt(dx, q((rw + sw[1]) * d))
    road = _lt(dx.abs_(), q(rw * d))
    _blend_(labels, walk, SIDEWALK)
    _blend_(labels, road, ROAD)
    _blend_(inst, walk, 0)

    # Standing objects, composited with a z-buffer on quantised ground depth (larger = closer).
    zbuf = torch.zeros((n, hh, ww), dtype=torch.int16)
    ground = 1.0 - horizon  # depth of the bottom image row
    next_id = 1

    def paint(shape: torch.Tensor, dep: torch.Tensor, cls: int) -> torch.Tensor:
        nonlocal next_id
        dq = (dep * 10000.0).round_().to(torch.int16) + 1
        m = shape.mul_(_lt(zbuf, dq))
        _blend_(labels, m, cls)
        _blend_(inst, m, next_id)
        _blend_(zbuf, m, dq)
        next_id += 1
        return m

    def place(lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random side (+-1), that side's sidewalk width, and a depth (biased to the distance)."""
        right = _bern(gen, p, 0.5)
        dep = ground * _u(gen, p, lo, hi) ** 1.2
        return torch.where(right, 1.0, -1.0), torch.where(right, sw[1], sw[0]), dep

    # Object sizes are in camera heights (the camera sits roughly 3 m above the road).
    # Trees: trunk + elliptic crown on the outer part of the sidewalk.
    for _ in range(4):
        s, swk, dep = place(0.1, 1.0)
        x0 = vx + (shift + s * (rw + swk * _u(gen, p, 0.6, 0.9))) * dep
        y0 = horizon + dep
        trunk_h = _u(gen, p, 0.8, 1.2) * dep
        r = _u(gen, p, 0.35, 0.6) * dep
        trunk = (0.04 * dep).clamp(min=0.6 * px) * rows(y0 - trunk_h, y0)
        crown = ellipse_hw(y0 - trunk_h - 0.6 * r, r, 1.15 * r)
        paint(centred(x0, torch.maximum(trunk, crown) * _bern(gen, p, 0.6).float()), dep, VEGETATION)

    # Poles (street lights / sign posts) near the kerb, with a lamp arm over the road or a sign plate.
    for _ in range(4):
        s, swk, dep = place(0.1, 1.0)
        x0 = vx + (shift + s * (rw + swk * _u(gen, p, 0.05, 0.25))) * dep
        y0 = horizon + dep
        top = y0 - _u(gen, p, 1.4, 2.2) * dep
        half = (0.022 * dep).clamp(min=0.55 * px)
        plate_y = top + _u(gen, p, 0.1, 0.6) * (y0 - top)
        plate = 0.11 * dep * rows(plate_y - 0.07 * dep, plate_y + 0.07 * dep) * _bern(gen, p, 0.3).float()
        mid = torch.maximum(half * rows(top, y0), plate)
        arm = _u(gen, p, 0.25, 0.5) * dep * rows(top - half, top + half) * _bern(gen, p, 0.5).float()
        active = _bern(gen, p, 0.8).float()
        lo = torch.minimum(-mid, torch.where(s > 0, -arm, 0.0)) * active  # the arm points to the road
        hi = torch.maximum(mid, torch.where(s < 0, arm, 0.0)) * active
        dxo = xs_q - q(x0)
        paint(_lt(q(lo), dxo).mul_(_lt(dxo, q(hi))), dep, POLE)

    # Persons on the sidewalks: legs, torso ellipse, head.
    for _ in range(6):
        s, swk, dep = place(0.12, 1.0)
        x0 = vx + (shift + s * (rw + swk * _u(gen, p, 0.2, 0.85))) * dep
        y0 = horizon + dep
        ph = _u(gen, p, 0.55, 0.7) * dep
        pw = _u(gen, p, 0.17, 0.22) * dep
        legs = (0.3 * pw).clamp(min=0.6 * px) * rows(y0 - 0.48 * ph, y0)
        torso = ellipse_hw(y0 - 0.64 * ph, 0.5 * pw, 0.22 * ph)
        head_r = (0.085 * ph).clamp(min=0.6 * px)
        head = ellipse_hw(y0 - 0.91 * ph, head_r, head_r)
        hw = torch.maximum(torch.maximum(legs, torso), head) * _bern(gen, p, 0.65).float()
        paint(centred(x0, hw), dep, PERSON)

    # Cars on the road, seen from behind: body, tapered cabin, wheels; rear window and lights are
    # marked with dedicated instance ids so that the renderer can draw them.
    for _ in range(5):
        dep = ground * _u(gen, p, 0.08, 1.0) ** 1.3
        cw = _u(gen, p, 0.55, 0.7)
        lane = (rw - 0.5 * cw).clamp(min=0.05)
        x0 = vx + (shift + lane * _u(gen, p, -1.0, 1.0)) * dep
        y0 = horizon + dep
        w = cw * dep
        ch = _u(gen, p, 0.42, 0.55) * dep
        wheel_top = y0 - 0.18 * ch
        taper = ((ys - (y0 - ch)) / (0.4 * ch)).clamp(0.0, 1.0)  # 0 at the roof, 1 at the cabin bottom
        cabin = (0.3 + 0.14 * taper) * w * rows(y0 - ch, y0 - 0.6 * ch)
        body = 0.5 * w * rows(y0 - 0.6 * ch, wheel_top)
        wheel_rows = ((ys > wheel_top) & (ys <= y0)).float()
        hw = torch.maximum(torch.maximum(cabin, body), 0.47 * w * wheel_rows) * _bern(gen, p, 0.7).float()
        dxa = (xs_q - q(x0)).abs()
        not_hole = _lt(q(0.25 * w * wheel_rows) - 1, dxa)  # road visible between the wheels
        m = paint(_lt(dxa, q(hw)).mul_(not_hole), dep, CAR)
        window = _lt(dxa, q(0.24 * w * rows(y0 - 0.93 * ch, y0 - 0.68 * ch))).mul_(m)
        lights_rows = rows(y0 - 0.56 * ch, y0 - 0.42 * ch)
        lights = _lt(dxa, q(0.46 * w * lights_rows)).mul_(_lt(q(0.3 * w * lights_rows) - 1, dxa)).mul_(m)
        _blend_(inst, window, _CAR_WINDOW_ID)
        _blend_(inst, lights, _CAR_LIGHT_ID)

    return labels.to(torch.uint8), inst.to(torch.uint8)


def _generate(
    num: int, size: tuple[int, int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (num,H,W) int64 plus instance ids (num,H,W) uint8. Instances let :func:`render` colour each
    object individually and draw car details."""
    size = (int(size[0]), int(size[1]))
    if num <= 0:
        return torch.empty((0, *size), dtype=torch.int64), torch.empty((0, *size), dtype=torch.uint8)
    chunks = [_layout_chunk(min(_CHUNK, num - i), size, generator) for i in range(0, num, _CHUNK)]
    return torch.cat([c[0] for c in chunks]).long(), torch.cat([c[1] for c in chunks])


def generate_layouts(num: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Draw ``num`` street-scene label maps of shape ``size`` = (H, W); returns (num,H,W) int64 class ids.

    Deterministic given the generator state; generated in fixed-size chunks to bound peak memory.
    """
    return _generate(num, size, generator)[0]


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------
# A pixel's appearance comes from one lookup in a per-image table indexed by key = label * 256 + instance
# (or a decoration key >= 2048: windows, lane markings, ...). Each entry holds RGB plus three texture
# amplitudes: smooth noise, fine noise, and a domain-specific channel (sky gradient in the source, wetness
# in the target). One gather per image batch is much cheaper than per-class masking.
_N_KEYS = NUM_CLASSES * 256
_DECO_WINDOW, _DECO_LIT, _DECO_LANE, _DECO_JOINT = _N_KEYS, _N_KEYS + 1, _N_KEYS + 2, _N_KEYS + 3
_N_TABLE = _N_KEYS + 4


def _rgb(*rows: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# Base colours per class (order of CLASS_NAMES).
_SRC_BASE = _rgb(
    (0.42, 0.66, 0.96),  # sky: saturated blue
    (0.80, 0.64, 0.46),  # building: (hue re-drawn per image from _SRC_BUILDING_HUES)
    (0.24, 0.62, 0.18),  # vegetation: saturated green
    (0.36, 0.36, 0.39),  # road: asphalt grey
    (0.82, 0.66, 0.62),  # sidewalk: light pinkish paving
    (0.80, 0.10, 0.10),  # car (mostly replaced by per-object colours)
    (0.20, 0.30, 0.75),  # person (mostly replaced by per-object colours)
    (0.62, 0.62, 0.66),  # pole: light metal
)
_SRC_BUILDING_HUES = _rgb((0.80, 0.64, 0.46), (0.72, 0.36, 0.28), (0.86, 0.82, 0.74), (0.62, 0.66, 0.72))
_TGT_BASE = _rgb(
    (0.52, 0.68, 0.95),  # sky: hazy blue, still the brightest region
    (0.60, 0.46, 0.34),  # building: darker brown brick
    (0.20, 0.42, 0.16),  # vegetation: dark olive
    (0.33, 0.32, 0.35),  # road: wet asphalt
    (0.33, 0.32, 0.35),  # sidewalk: *same* as road (the ambiguous pair)
    (0.35, 0.30, 0.32),  # car (mixed with desaturated per-object colours)
    (0.24, 0.22, 0.24),  # person: dark clothing (mixed with muted per-object colours)
    (0.42, 0.42, 0.46),  # pole: grey metal
)
# Per class: share of the per-object random colour, per-instance brightness jitter, smooth-noise amplitude,
# fine-noise amplitude, and the domain-specific third amplitude.
_SRC_MIX = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.85, 0.75, 0.0])
_SRC_JIT = torch.tensor([0.0, 0.3, 0.25, 0.0, 0.0, 0.1, 0.1, 0.1])
_SRC_AMP = torch.tensor(
    [  # lf, hf, sky gradient
        [0.03, 0.00, 0.35],
        [0.06, 0.02, 0.0],
        [0.12, 0.10, 0.0],
        [0.05, 0.04, 0.0],
        [0.05, 0.03, 0.0],
        [0.04, 0.01, 0.0],
        [0.05, 0.02, 0.0],
        [0.04, 0.01, 0.0],
    ]
)
_TGT_MIX = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.6, 0.6, 0.0])
_TGT_JIT = torch.tensor([0.0, 0.4, 0.3, 0.0, 0.0, 0.2, 0.2, 0.1])
_TGT_AMP = torch.tensor(
    [  # lf, hf, wetness (puddles)
        [0.06, 0.01, 0.0],
        [0.10, 0.06, 0.0],
        [0.15, 0.22, 0.0],
        [0.16, 0.12, 1.0],
        [0.16, 0.12, 1.0],
        [0.08, 0.04, 0.0],
        [0.08, 0.05, 0.0],
        [0.05, 0.03, 0.0],
    ]
)


def _saturate(c: torch.Tensor, amount: float) -> torch.Tensor:
    """Push colours (..., 3) away from (amount > 1) or towards (amount < 1) their grey value."""
    g = c.mean(dim=-1, keepdim=True)
    return (g + (c - g) * amount).clamp(0.0, 1.0)


def _table(
    base: torch.Tensor,
    mix: torch.Tensor,
    jit: torch.Tensor,
    amp: torch.Tensor,
    obj: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Per-image appearance table (n, 6, _N_TABLE): rows = label*256+instance (+ decoration rows, filled in
    by the caller), columns = RGB + 3 texture amplitudes."""
    n = base.shape[0]
    bright = torch.rand((n, 1, 256, 1), generator=gen) - 0.5
    rgb = base[:, :, None, :] * (1 - mix[None, :, None, None]) + obj[:, None, :, :] * mix[None, :, None, None]
    rgb = rgb * (1.0 + jit[None, :, None, None] * bright)  # (n, K, 256, 3)
    amps = amp[None, :, None, :].expand(n, -1, 256, -1)
    table = torch.cat([rgb, amps], dim=-1).reshape(n, _N_KEYS, 6)
    table = torch.cat([table, torch.zeros((n, _N_TABLE - _N_KEYS, 6))], dim=1)
    return table


def _keys(labels: torch.Tensor, instances: torch.Tensor | None) -> torch.Tensor:
    """int16 lookup keys label*256 + instance."""
    key = labels.to(torch.int16) * 256
    if instances is not None:
        key += instances.to(torch.int16)
    return key


def _lookup(table: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(n,_N_TABLE,6) table, (n,H,W) keys -> (n,6,H,W)."""
    n, hh, ww = key.shape
    idx = key.long().view(n, 1, hh * ww).expand(n, 6, hh * ww)
    return table.transpose(1, 2).contiguous().gather(2, idx).view(n, 6, hh, ww)


def _horizon(labels: torch.Tensor) -> torch.Tensor:
    """Estimated horizon (n,1,1) in height units: the first image row that contains ground."""
    n, hh, _ = labels.shape
    ground = ((labels == ROAD) | (labels == SIDEWALK)).any(dim=2)  # (n,H)
    first = torch.where(ground.any(dim=1), ground.to(torch.uint8).argmax(dim=1), hh // 2)
    return (first.float() / hh).view(n, 1, 1)


def _lane_markings(labels: torch.Tensor, horizon: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Dashed centre line (n,H,W bool) on the road. The road centre is a straight image line through the
    vanishing point, fitted per image by least squares to road centroids of rows where the road is not
    clipped by the image border."""
    n, hh, ww = labels.shape
    ys, xs = _grids((hh, ww))
    road = labels == ROAD
    roadf = road.float()
    cnt = roadf.sum(dim=2)  # (n,H)
    cx = (roadf @ xs.view(ww, 1)).view(n, hh) / cnt.clamp(min=1.0)
    valid = ((cnt > 2) & ~road[:, :, 0] & ~road[:, :, -1]).float()
    d = ys.view(1, hh) - horizon.view(n, 1)  # (n,H)
    sw = valid.sum(1).clamp(min=1.0)
    md = (valid * d).sum(1) / sw
    mc = (valid * cx).sum(1) / sw
    var = (valid * (d - md[:, None]) ** 2).sum(1).clamp(min=1e-6)
    b = (valid * (d - md[:, None]) * (cx - mc[:, None])).sum(1) / var
    a = mc - b * md
    centre = (a[:, None] + b[:, None] * d).view(n, hh, 1)
    dpos = d.clamp(min=1e-3).view(n, hh, 1)
    dash = torch.frac(1.0 / (dpos * _u(gen, (n, 1, 1), 2.0, 4.0)) + _u(gen, (n, 1, 1), 0.0, 1.0)) < 0.5
    enough = (valid.sum(1) >= 3).view(n, 1, 1)
    hw = (0.025 * dpos + 0.45 / hh) * (dash & enough & (d.view(n, hh, 1) > 0)).float()
    return ((xs - centre).abs() < hw) & road


def _blur(img: torch.Tensor) -> torch.Tensor:
    """Slight separable [w, 1-2w, w] blur (w = 0.18, sigma ~0.6 px) with edge replication (camera optics);
    in-place slice adds are much faster than a depthwise conv on CPU."""
    w = 0.18
    for dim in (-1, -2):
        size = img.shape[dim]
        out = img * (1.0 - 2.0 * w)
        out.narrow(dim, 1, size - 1).add_(img.narrow(dim, 0, size - 1), alpha=w)
        out.narrow(dim, 0, size - 1).add_(img.narrow(dim, 1, size - 1), alpha=w)
        out.narrow(dim, 0, 1).add_(img.narrow(dim, 0, 1), alpha=w)
        out.narrow(dim, size - 1, 1).add_(img.narrow(dim, size - 1, 1), alpha=w)
        img = out
    return img


def _render_source(
    labels: torch.Tensor, instances: torch.Tensor | None, gen: torch.Generator
) -> torch.Tensor:
    """Daytime 'game' look: bright saturated colours with simple, clean textures; sharp, little noise."""
    n, hh, ww = labels.shape
    size = (hh, ww)
    ys, xs = _grids(size)
    horizon = _horizon(labels)

    base = _SRC_BASE.expand(n, -1, -1).clone()
    base[:, BUILDING] = _SRC_BUILDING_HUES[torch.randint(0, len(_SRC_BUILDING_HUES), (n,), generator=gen)]
    base = base * _u(gen, (n, 1, 1), 0.9, 1.08) + 0.035 * torch.randn((n, NUM_CLASSES, 3), generator=gen)
    obj = 0.1 + 0.85 * _saturate(torch.rand((n, 256, 3), generator=gen), 2.0)  # cars, persons
    table = _table(base.clamp(0, 1), _SRC_MIX, _SRC_JIT, _SRC_AMP, obj, gen)
    table[:, CAR * 256 + _CAR_WINDOW_ID, :3] = _rgb((0.15, 0.2, 0.28))
    table[:, CAR * 256 + _CAR_LIGHT_ID, :3] = _rgb((0.9, 0.15, 0.1))
    table[:, _DECO_WINDOW, :3] = _rgb((0.22, 0.32, 0.48)) + 0.05 * torch.randn((n, 3), generator=gen)
    table[:, _DECO_WINDOW, 3] = 0.05
    lane_yellow = _bern(gen, (n, 1), 0.25).float()
    table[:, _DECO_LANE, :3] = (
        _rgb((0.95, 0.95, 0.92)) * (1 - lane_yellow) + _rgb((0.95, 0.8, 0.2)) * lane_yellow
    )
    table[:, _DECO_JOINT] = table[:, SIDEWALK * 256]
    table[:, _DECO_JOINT, :3] *= 0.82

    key = _keys(labels, instances)
    # Building windows on a regular grid.
    win_x = torch.frac(xs / _u(gen, (n, 1, 1), 0.035, 0.07) + _u(gen, (n, 1, 1), 0, 1)) < 0.5
    win_y = torch.frac(ys / _u(gen, (n, 1, 1), 0.04, 0.08) + _u(gen, (n, 1, 1), 0, 1)) < 0.55
    _blend_(key, win_x & win_y & (labels == BUILDING), _DECO_WINDOW)
    # Paving joints across the sidewalks at regular world distances.
    d = (ys - horizon).clamp(min=1e-3)
    joints = torch.frac(1.0 / (d * _u(gen, (n, 1, 1), 0.6, 1.0))) < 0.12
    _blend_(key, joints & (labels == SIDEWALK), _DECO_JOINT)
    # Dashed lane markings.
    _blend_(key, _lane_markings(labels, horizon, gen), _DECO_LANE)

    px = _lookup(table, key)
    col, a_lf, a_hf, a_sky = px[:, :3], px[:, 3:4], px[:, 4:5], px[:, 5:6]
    sky_grad = (ys / horizon.clamp(min=0.1)).clamp(0, 1).unsqueeze(1) ** 2  # brighter towards the horizon
    lf = _lowfreq(gen, n, 8, size)
    hf = torch.rand((n, 1, hh, ww), generator=gen) * 2 - 1
    lum = 1.0 + a_lf * lf + a_hf * hf + a_sky * sky_grad
    lum += 0.01 * (torch.rand((n, 1, hh, ww), generator=gen) - 0.5)  # a hint of noise
    return (col * lum).clamp_(0.0, 1.0)


def _render_target(
    labels: torch.Tensor, instances: torch.Tensor | None, gen: torch.Generator
) -> torch.Tensor:
    """Dusk + fog 'real camera' look. Road and sidewalk are drawn from one identical distribution."""
    n, hh, ww = labels.shape
    size = (hh, ww)
    ys, xs = _grids(size)
    horizon = _horizon(labels)

    # Colour cast (bluish or orange dusk): applied to the scene and the airlight alike.
    cast = torch.where(_bern(gen, (n, 1), 0.5), _rgb((0.88, 0.96, 1.12)), _rgb((1.12, 0.96, 0.84)))
    cast = cast + 0.03 * torch.randn((n, 3), generator=gen)

    base = _TGT_BASE * _u(gen, (n, 1, 1), 0.85, 1.1) + 0.03 * torch.randn((n, NUM_CLASSES, 3), generator=gen)
    base[:, SIDEWALK] = base[:, ROAD]  # the same per-image colour for the ambiguous pair
    obj = 0.65 * _saturate(torch.rand((n, 256, 3), generator=gen), 0.6)  # desaturated, darker objects
    table = _table(base.clamp(0, 1), _TGT_MIX, _TGT_JIT, _TGT_AMP, obj, gen)
    table[:, CAR * 256 + _CAR_WINDOW_ID, :3] = _rgb((0.1, 0.1, 0.12))
    table[:, CAR * 256 + _CAR_LIGHT_ID, :3] = _rgb((2.2, 0.45, 0.3))  # glowing through the fog
    table[:, _DECO_WINDOW, :3] = _rgb((0.18, 0.22, 0.32))  # dark windows
    table[:, _DECO_LIT, :3] = _rgb((1.3, 1.0, 0.55)) * _u(gen, (n, 1), 0.6, 1.0)  # lit windows
    table[:, :, :3] *= cast[:, None, :]

    key = _keys(labels, instances)
    # Windows on a cell grid (other sizes than in the source); a random subset is lit.
    gx = xs / _u(gen, (n, 1, 1), 0.025, 0.05) + _u(gen, (n, 1, 1), 0, 1)
    gy = ys / _u(gen, (n, 1, 1), 0.03, 0.06) + _u(gen, (n, 1, 1), 0, 1)
    cell = (gy.floor().long() % 64) * 64 + (gx.floor().long() % 64)  # (n,H,W) via broadcasting
    lit = _bern(gen, (n, 64 * 64), 0.18).gather(1, cell.view(n, -1)).view(n, hh, ww)
    window = (torch.frac(gx) < 0.6) & (torch.frac(gy) < 0.6) & (labels == BUILDING)
    _blend_(key, window, _DECO_WINDOW)
    _blend_(key, window & lit, _DECO_LIT)

    px = _lookup(table, key)
    col, a_lf, a_hf, a_wet = px[:, :3], px[:, 3:4], px[:, 4:5], px[:, 5:6]

    # Smooth luminance variation, fine texture and a global illumination gradient in a random direction.
    theta = _u(gen, (n, 1, 1, 1), 0, 2 * math.pi)
    proj = (xs - 0.5 * ww / hh).unsqueeze(1) * torch.cos(theta) + (ys - 0.5).unsqueeze(1) * torch.sin(theta)
    illum = 1.0 + _u(gen, (n, 1, 1, 1), 0.15, 0.35) * proj
    lum = (
        1.0 + a_lf * _lowfreq(gen, n, 10, size) + a_hf * torch.randn((n, 1, hh, ww), generator=gen)
    ) * illum
    # Wet ground: puddles (weight p) reflecting the sky, on road *and* sidewalk alike.
    puddle = (_lowfreq(gen, n, 12, size) - 1.1).clamp(min=0.0, max=0.6) * a_wet
    sky = (base[:, SKY] * cast * 0.9).view(n, 3, 1, 1)
    # Fog: transmission t grows with image distance from the horizon (a proxy for scene distance).
    airlight = ((_rgb((0.74, 0.64, 0.64)) + 0.05 * torch.randn((n, 3), generator=gen)) * cast).view(
        n, 3, 1, 1
    )
    t_min = _u(gen, (n, 1, 1), 0.55, 0.75)
    t = (t_min + (1 - t_min) * ((ys - horizon).abs() / 0.45).clamp(0, 1) ** 0.8).unsqueeze(1)  # (n,1,H,1)
    # ((col * lum) * (1 - p) + p * sky) * t + airlight * (1 - t), arranged to touch 3-channel tensors rarely.
    col = col * (lum * (1 - puddle) * t)
    col += (puddle * t) * sky
    col += airlight * (1 - t)

    col = _blur(col)
    sigma = _u(gen, (n, 1, 1, 1), 0.01, 0.025) * math.sqrt(12.0)  # uniform noise with std sigma
    col += torch.rand(col.shape, generator=gen).sub_(0.5).mul_(sigma)
    return col.clamp_(0.0, 1.0)


def render(
    labels: torch.Tensor,
    domain: str,
    generator: torch.Generator,
    instances: torch.Tensor | None = None,
) -> torch.Tensor:
    """Render label maps (num,H,W) into images (num,3,H,W) float32 in [0,1] with the appearance of
    ``domain`` ("source" or "target"). Deterministic given the generator state.

    ``instances`` (optional, same shape, from the layout generator) gives every object its own colour and
    car details; without it all objects of a class share one colour per image.
    """
    _check_choice("domain", domain, DOMAINS)
    fn = _render_source if domain == "source" else _render_target
    labels = labels.cpu()
    if instances is not None:
        instances = instances.cpu()
        if instances.shape != labels.shape:
            raise ValueError(
                f"instances shape {tuple(instances.shape)} != labels shape {tuple(labels.shape)}"
            )
    n, hh, ww = labels.shape
    chunks = [
        fn(labels[i : i + _CHUNK], None if instances is None else instances[i : i + _CHUNK], generator)
        for i in range(0, n, _CHUNK)
    ]
    return torch.cat(chunks) if chunks else torch.empty((0, 3, hh, ww))


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
