"""Tiny synthetic files in the real dataset layouts (SPEC 9, 10), shared by the tests.

Every builder writes a few small frames under ``root`` with the published folder and file names, and
returns ``root``. Labels are street scenes in Cityscapes label ids (sky, building with a pole, road,
sidewalk, a car and a person at seeded positions), so that every split has several classes, the
thing classes of FD and rare class sampling exist, and boxes can be derived from instance masks.
``data_root(root, "gta2cs")`` builds everything a data config reads, named by the config; the
preset and export tests use it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mic_uda.data.seg_files import CITYSCAPES_ID_TO_TRAIN_ID

# Cityscapes label ids used by the scenes
SKY, BUILDING, POLE, ROAD, SIDEWALK, CAR, PERSON = 23, 11, 17, 7, 8, 26, 24
CAMVID_CLASSES = 11


def write_png(path: Path, array: np.ndarray) -> Path:
    """An 8-bit (or 16-bit grey, uint16 2-D) PNG of ``array``, creating the folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_image(path: Path, size: int, value: int | tuple[int, int, int], mode: str = "RGB") -> Path:
    """A solid ``size`` x ``size`` image; ``value`` is a grey level for mode "L"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)
    return path


def random_rgb(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit RGB PNG (what SYNTHIA ships; PIL cannot write it), by hand: IHDR + one IDAT + IEND."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def scene_ids(shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(label ids, instance ids) of a street scene: sky / building with a pole / sidewalk / road, one car
    and one person at seeded positions. Instance ids follow Cityscapes (``class * 1000 + k`` for things,
    the class id for stuff)."""
    h, w = shape
    rng = np.random.default_rng(seed)
    ids = np.full(shape, ROAD, np.uint8)
    ids[: h // 4] = SKY
    ids[h // 4 : h // 2] = BUILDING
    ids[h // 2 : 5 * h // 8] = SIDEWALK
    pole = int(rng.integers(0, w - 2))
    ids[h // 8 : 5 * h // 8, pole : pole + 2] = POLE
    inst = ids.astype(np.int32)
    for k, (cls, bh, bw) in enumerate([(CAR, h // 4, w // 4), (PERSON, h // 3, max(w // 10, 2))]):
        top = int(rng.integers(h // 3, h - bh + 1))
        left = int(rng.integers(0, w - bw + 1))
        ids[top : top + bh, left : left + bw] = cls
        inst[top : top + bh, left : left + bw] = cls * 1000 + k
    return ids, inst


def train_ids(ids: np.ndarray) -> np.ndarray:
    lut = np.full(256, 255, np.uint8)
    for k, v in CITYSCAPES_ID_TO_TRAIN_ID.items():
        lut[k] = v
    return lut[ids]


# --- segmentation layouts ------------------------------------------------------------------------


def gta5(root: Path, n: int = 2, shape: tuple[int, int] = (40, 72)) -> Path:
    """GTA5: ``images/*.png``, ``labels/*.png`` (Cityscapes label ids)."""
    for i in range(n):
        write_png(root / "images" / f"{i:05d}.png", random_rgb(shape, i))
        write_png(root / "labels" / f"{i:05d}.png", scene_ids(shape, i)[0])
    return root


def cityscapes(
    root: Path,
    splits: Sequence[str] = ("train", "val"),
    n: int = 2,
    shape: tuple[int, int] = (64, 128),
    kind: str = "labelIds",
    instances: bool = False,
    foggy_betas: Sequence[float] = (),
    cities: Sequence[str] = ("aachen", "ulm"),
) -> Path:
    """Cityscapes: ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/..._gtFine_<kind>.png`` (``labelIds`` or ``labelTrainIds``), optionally
    ``_gtFine_instanceIds.png`` (16-bit) and Foggy Cityscapes' ``leftImg8bit_foggy/.../
    ..._leftImg8bit_foggy_beta_<beta>.png``. ``n`` frames per split, cities in turn."""
    for split in splits:
        for i in range(n):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            seed = 100 * len(split) + i
            rgb = random_rgb(shape, seed)
            write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb)
            for beta in foggy_betas:
                foggy = (0.5 * rgb + 0.5 * 200).astype(np.uint8)
                name = f"{stem}_leftImg8bit_foggy_beta_{beta}.png"
                write_png(root / "leftImg8bit_foggy" / split / city / name, foggy)
            ids, inst = scene_ids(shape, seed)
            gt = root / "gtFine" / split / city
            write_png(gt / f"{stem}_gtFine_{kind}.png", ids if kind == "labelIds" else train_ids(ids))
            if instances:
                write_png(gt / f"{stem}_gtFine_instanceIds.png", inst.astype(np.uint16))
    return root


def synthia(root: Path, n: int = 2, shape: tuple[int, int] = (38, 64)) -> Path:
    """SYNTHIA-RAND-CITYSCAPES: ``RGB/*.png``, ``GT/LABELS/*.png`` (16-bit, class id in channel 0)."""
    to_synthia = {SKY: 1, BUILDING: 2, ROAD: 3, SIDEWALK: 4, POLE: 7, CAR: 8, PERSON: 10}
    for i in range(n):
        ids = scene_ids(shape, i)[0]
        label = np.zeros((*shape, 3), np.uint16)
        for cs_id, s_id in to_synthia.items():
            label[..., 0][ids == cs_id] = s_id
        label[..., 1] = 1000 + i  # instance ids in channel 1 must not leak into the class
        write_png(root / "RGB" / f"{i:07d}.png", random_rgb(shape, i))
        write_png16(root / "GT" / "LABELS" / f"{i:07d}.png", label)
    return root


def acdc(
    root: Path,
    conditions: Sequence[str] = ("fog", "night", "rain", "snow"),
    splits: Sequence[str] = ("train", "val"),
    shape: tuple[int, int] = (54, 96),
    labelled: Sequence[str] = ("train", "val"),
) -> Path:
    """ACDC: ``rgb_anon/<cond>/<split>/<seq>/<seq>_frame_<n>_rgb_anon.png`` with
    ``gt/<cond>/<split>/<seq>/..._gt_labelTrainIds.png`` for the ``labelled`` splits (the published
    test split has none)."""
    for ci, cond in enumerate(conditions):
        for split in splits:
            seq = f"GOPR04{ci}5"
            stem = f"{seq}_frame_{len(split):06d}"
            seed = 10 * ci + len(split)
            write_png(
                root / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png", random_rgb(shape, seed)
            )
            if split in labelled:
                gt = root / "gt" / cond / split / seq / f"{stem}_gt_labelTrainIds.png"
                write_png(gt, train_ids(scene_ids(shape, seed)[0]))
    return root


def dark_zurich(root: Path, n: int = 2, shape: tuple[int, int] = (54, 96)) -> Path:
    """Dark Zurich: ``rgb_anon/train/{night,day}/<seq>/*_rgb_anon.png`` (unlabelled) and
    ``rgb_anon/val/night`` with ``gt/val/night/<seq>/*_gt_labelTrainIds.png``."""
    for i in range(n):
        for tod in ("night", "day"):
            name = f"GOPR0348_frame_{i:06d}_rgb_anon.png"
            write_png(root / "rgb_anon" / "train" / tod / "GOPR0348" / name, random_rgb(shape, i))
        stem = f"GOPR0356_frame_{i:06d}"
        write_png(
            root / "rgb_anon" / "val" / "night" / "GOPR0356" / f"{stem}_rgb_anon.png",
            random_rgb(shape, 9 + i),
        )
        gt = root / "gt" / "val" / "night" / "GOPR0356" / f"{stem}_gt_labelTrainIds.png"
        write_png(gt, train_ids(scene_ids(shape, 9 + i)[0]))
    return root


def camvid(root: Path, n: int = 2, shape: tuple[int, int] = (48, 64)) -> Path:
    """CamVid as in SPEC 10: ``images/<stem>.jpg``, ``labels/<stem>.png`` (11 train ids, 255 void),
    ``splits/{day_all,dusk_train,dusk_val}.txt``; car (8), pedestrian (9), bicyclist (10) included."""
    to_camvid = {SKY: 0, BUILDING: 1, POLE: 2, ROAD: 3, SIDEWALK: 4, CAR: 8, PERSON: 9}
    splits: dict[str, list[str]] = {}
    for s, split in enumerate(("day_all", "dusk_train", "dusk_val")):
        for i in range(n):
            stem = f"{'0006R0' if s == 0 else 'Seq05VD'}_f{s:02d}{i:03d}"
            seed = 10 * s + i
            ids = scene_ids(shape, seed)[0]
            label = np.full(shape, 255, np.uint8)
            for cs_id, c in to_camvid.items():
                label[ids == cs_id] = c
            label[-2:, :4] = 10  # a small bicyclist
            root.joinpath("images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(random_rgb(shape, seed)).save(root / "images" / f"{stem}.jpg", quality=95)
            write_png(root / "labels" / f"{stem}.png", label)
            splits.setdefault(split, []).append(stem)
    for split, stems in splits.items():
        (root / "splits").mkdir(parents=True, exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


# --- classification layouts ----------------------------------------------------------------------


def class_tree(
    root: Path, classes: Sequence[str], per_class: int = 2, size: int = 20, suffix: str = ".jpg"
) -> Path:
    """``root/<class>/<i><suffix>``, class k solid grey 40 + 60 k (recognisable after any crop)."""
    for k, cls in enumerate(classes):
        for i in range(per_class):
            write_image(root / cls / f"{i:03d}{suffix}", size, ((40 + 60 * k) % 256,) * 3)
    return root


def visda(root: Path, classes: Sequence[str], per_class: int = 1, size: int = 20) -> Path:
    """VisDA-2017: ``train/<class>/*.jpg`` (synthetic) and ``validation/<class>/*.jpg`` (real)."""
    class_tree(root / "train", classes, per_class, size)
    class_tree(root / "validation", classes, per_class, size)
    return root


def officehome(
    root: Path,
    classes: Sequence[str],
    domains: Sequence[str] = ("Art", "Clipart", "Product", "Real_World"),
    per_class: int = 1,
    size: int = 20,
) -> Path:
    """Office-Home: ``<domain>/<class>/*.jpg``."""
    for domain in domains:
        class_tree(root / domain, classes, per_class, size)
    return root


def digits(root: Path, classes: int = 10, per_class: int = 1) -> Path:
    """USPS (16 px grey PNG) and MNIST-M (32 px colour JPEG): ``{usps,mnist_m}/{train,test}/<digit>/*``."""
    for split in ("train", "test"):
        for d in range(classes):
            for i in range(per_class):
                grey = (30 + 20 * d) % 256
                write_image(root / "usps" / split / str(d) / f"usps{i:05d}.png", 16, grey, mode="L")
                write_image(root / "mnist_m" / split / str(d) / f"mnistm{i:05d}.jpg", 32, (200, 20 * d, 10))
    return root


# --- what each data config reads, and its overrides for these files ---------------------------


def _cityscapes_target(root: Path) -> None:
    cityscapes(root / "cityscapes")


DATA_ROOTS: dict[str, Callable[[Path], None]] = {
    # data option -> the folders under paths.data_dir that it reads
    "gta2cs": lambda r: (gta5(r / "gta"), _cityscapes_target(r)),
    "synthia2cs": lambda r: (synthia(r / "synthia"), _cityscapes_target(r)),
    "synthia2cs_16": lambda r: (synthia(r / "synthia"), _cityscapes_target(r)),
    "synthia2cs_13": lambda r: (synthia(r / "synthia"), _cityscapes_target(r)),
    "cs2acdc": lambda r: (_cityscapes_target(r), acdc(r / "acdc")),
    "cs2darkzurich": lambda r: (_cityscapes_target(r), dark_zurich(r / "dark_zurich")),
    "cs2foggy": lambda r: cityscapes(r / "cityscapes", instances=True, foggy_betas=(0.02,)),
    "camvid_day2dusk": lambda r: camvid(r / "camvid"),
    "camvid_det_day2dusk": lambda r: camvid(r / "camvid"),
    "synthetic_seg": lambda r: None,
    "synthetic_cls": lambda r: None,
    "synthetic_det": lambda r: None,
}


def data_root(root: Path, data: str, class_names: Sequence[str] = ()) -> Path:
    """Build what ``data=<data>`` reads under ``root`` (its ``paths.data_dir``); the class-folder sets
    take the config's ``class_names``. A data option without a builder is an error naming it."""
    cls_builders: dict[str, Callable[[Path], object]] = {
        "visda": lambda r: visda(r / "visda2017", class_names),
        # 2 per class: 130 images, so no batch of 4 holds a single image (a BatchNorm1d bottleneck
        # cannot normalise one sample in train mode, e.g. in the handover's BN re-estimation)
        "officehome": lambda r: officehome(r / "office_home", class_names, ("Art", "Clipart"), per_class=2),
        "usps2mnistm": lambda r: digits(r / "digits", len(class_names)),
    }
    builder = DATA_ROOTS.get(data) or cls_builders.get(data)
    if builder is None:
        known = sorted([*DATA_ROOTS, *cls_builders])
        raise KeyError(f"no fixture builder for data={data} in tests/data_layouts.py (known: {known})")
    root.mkdir(parents=True, exist_ok=True)
    builder(root)
    return root


def tiny_data(data: str, scale: int = 1) -> list[str]:
    """Overrides of ``data=<data>`` sized for the files above: 32 px crops (``scale`` 2: 64 px, for HRDA,
    whose half-resolution context must still feed MiT's 8x8 reduction at stride 4), batches of 2 (4 for
    classification), small RCS thresholds. A data option without an entry is an error naming it."""
    s = int(scale)

    def size(w: int, h: int) -> str:
        return f"[{w * s},{h * s}]"

    seg = [
        "data.datamodule.batch_size=2",
        "data.datamodule.target_batch_size=2",
        f"data.datamodule.source.crop_size={32 * s}",
        f"data.datamodule.target.crop_size={32 * s}",
        "data.rcs.min_pixels=20",
        "data.rcs.min_crop_pixels=20",
        f"++data.mask_block_size={8 * s}",
    ]
    # Cityscapes 128x64 -> 64x32, GTA 72x40 -> 64x36 (keeping the ratio), SYNTHIA 64x38, ACDC / Dark
    # Zurich 96x54 -> 64x36 (x scale)
    cs_src = [f"data.datamodule.source.resize={size(64, 32)}"]
    cs_tgt = [f"data.datamodule.{k}.resize={size(64, 32)}" for k in ("target", "val")]
    adverse = [f"data.datamodule.{k}.resize={size(64, 36)}" for k in ("target", "val")]
    camvid = [f"data.resize={size(48, 32)}", f"data.crop_size={32 * s}", f"data.mask_block_size={8 * s}"]
    cls = [
        "data.image_size=16",
        "data.mask_block_size=4",
        "data.datamodule.batch_size=4",
        "data.datamodule.target_batch_size=4",
        "data.datamodule.val_batch_size=8",
    ]
    table = {
        "gta2cs": [*seg, f"data.datamodule.source.resize={size(64, 36)}", *cs_tgt],
        "synthia2cs": [*seg, f"data.datamodule.source.resize={size(64, 38)}", *cs_tgt],
        "cs2acdc": [*seg, *cs_src, *adverse],
        "cs2darkzurich": [*seg, *cs_src, *adverse],
        "camvid_day2dusk": camvid,
        "camvid_det_day2dusk": [*camvid, "data.min_area=4"],
        "cs2foggy": [f"data.datamodule.{k}.resize=[128,64]" for k in ("source", "target", "val")],
        "visda": [*cls, "data.pre_crop_size=18"],
        "officehome": [*cls, "data.pre_crop_size=18"],
        "usps2mnistm": cls,
        "synthetic_seg": [
            "data.size=32",
            "data.datamodule.source.num_images=4",
            "data.datamodule.target.num_images=4",
            "data.datamodule.val.num_images=2",
        ],
    }
    for variant in ("synthia2cs_16", "synthia2cs_13"):
        table[variant] = table["synthia2cs"]
    if data not in table:
        raise KeyError(f"no tiny overrides for data={data} in tests/data_layouts.py tiny_data")
    return table[data]
