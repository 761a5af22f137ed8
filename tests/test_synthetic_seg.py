"""Tests for the embedded procedural street-scene UDA dataset (mic_uda.data.synthetic_seg).

They guard the properties the rest of the project relies on: determinism, independent splits and domains,
the item format, and the designed domain shift (road vs sidewalk separable by colour in the source only).
Datasets are tiny so that the whole file runs in a few seconds on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from mic_uda.data.synthetic_seg import (
    CLASS_NAMES,
    PALETTE,
    SyntheticSegDataset,
    generate_layouts,
    render,
)

ROAD = CLASS_NAMES.index("road")
SIDEWALK = CLASS_NAMES.index("sidewalk")
SIZE = 64


@pytest.fixture(scope="module")
def source() -> SyntheticSegDataset:
    return SyntheticSegDataset("source", "train", num_images=24, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def target() -> SyntheticSegDataset:
    return SyntheticSegDataset("target", "train", num_images=24, size=SIZE, seed=0)


def _stack(ds: SyntheticSegDataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])


def test_metadata_consistent() -> None:
    ds = SyntheticSegDataset("source", "val", num_images=2, size=32)
    assert ds.class_names == CLASS_NAMES
    assert ds.num_classes == len(CLASS_NAMES) == len(PALETTE)
    assert ds.ignore_index == 255
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ds.palette)


def test_item_shapes_dtypes_ranges(source: SyntheticSegDataset, target: SyntheticSegDataset) -> None:
    for ds in (source, target):
        assert len(ds) == 24
        item = ds[3]
        assert set(item) == {"image", "label", "index"}
        assert item["index"] == 3
        img, lab = item["image"], item["label"]
        assert img.shape == (3, SIZE, SIZE) and img.dtype == torch.float32
        assert lab.shape == (SIZE, SIZE) and lab.dtype == torch.int64
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert lab.min() >= 0 and lab.max() < len(CLASS_NAMES)


def test_non_square_size_and_functional_api() -> None:
    gen = torch.Generator().manual_seed(1)
    labels = generate_layouts(3, (40, 72), gen)
    assert labels.shape == (3, 40, 72) and labels.dtype == torch.int64
    for domain in ("source", "target"):
        img = render(labels, domain, gen)
        assert img.shape == (3, 3, 40, 72) and img.dtype == torch.float32
        assert img.min() >= 0.0 and img.max() <= 1.0
    ds = SyntheticSegDataset("target", "train", num_images=2, size=(40, 72))
    assert ds[0]["image"].shape == (3, 40, 72) and ds[1]["label"].shape == (40, 72)


def test_deterministic_given_seed() -> None:
    a = SyntheticSegDataset("target", "train", num_images=4, size=32, seed=7)
    b = SyntheticSegDataset("target", "train", num_images=4, size=32, seed=7)
    c = SyntheticSegDataset("target", "train", num_images=4, size=32, seed=8)
    for i in range(4):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert torch.equal(a[i]["label"], b[i]["label"])
    assert not torch.equal(_stack(a)[0], _stack(c)[0])
    assert not torch.equal(_stack(a)[1], _stack(c)[1])


def test_splits_and_domains_are_independent_draws() -> None:
    train = _stack(SyntheticSegDataset("source", "train", num_images=16, size=32, seed=0))[1]
    val = _stack(SyntheticSegDataset("source", "val", num_images=16, size=32, seed=0))[1]
    tgt = _stack(SyntheticSegDataset("target", "train", num_images=16, size=32, seed=0))[1]
    # no label map of one set re-appears in the other
    flat_train = train.flatten(1)
    for other in (val, tgt):
        same = (flat_train[:, None, :] == other.flatten(1)[None, :, :]).all(-1)
        assert not same.any()


def test_all_classes_present(source: SyntheticSegDataset, target: SyntheticSegDataset) -> None:
    for ds in (source, target):
        freq = torch.bincount(ds.labels.flatten(), minlength=len(CLASS_NAMES)).float() / ds.labels.numel()
        assert (freq > 0.005).all(), dict(zip(CLASS_NAMES, freq.tolist()))


def _class_mean(images: torch.Tensor, labels: torch.Tensor, cls: int) -> torch.Tensor:
    mask = (labels == cls).unsqueeze(1).float()
    return (images * mask).sum((0, 2, 3)) / mask.sum()


def test_road_sidewalk_colour_shift(source: SyntheticSegDataset, target: SyntheticSegDataset) -> None:
    """The designed ambiguity: distinct colours in the source, the same distribution in the target."""
    src_img, src_lab = _stack(source)
    tgt_img, tgt_lab = _stack(target)
    src_gap = (_class_mean(src_img, src_lab, ROAD) - _class_mean(src_img, src_lab, SIDEWALK)).norm()
    tgt_gap = (_class_mean(tgt_img, tgt_lab, ROAD) - _class_mean(tgt_img, tgt_lab, SIDEWALK)).norm()
    assert src_gap > 0.25, src_gap
    assert tgt_gap < 0.05, tgt_gap
    # and the domains really look different: the mean colour of the road moves
    assert (_class_mean(src_img, src_lab, ROAD) - _class_mean(tgt_img, tgt_lab, ROAD)).abs().max() > 0.03


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [({"domain": "sourse"}, "sourse"), ({"split": "test"}, "test")],
)
def test_invalid_domain_or_split_raises(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad) as info:
        SyntheticSegDataset(num_images=1, size=16, **kwargs)
    name = next(iter(kwargs))
    assert name in str(info.value)
    allowed = ("source", "target") if name == "domain" else ("train", "val")
    assert all(a in str(info.value) for a in allowed)


def test_render_rejects_bad_domain() -> None:
    labels = generate_layouts(1, (16, 16), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="night"):
        render(labels, "night", torch.Generator().manual_seed(0))


def test_hflip_flips_image_and_label_consistently() -> None:
    plain = SyntheticSegDataset("source", "train", num_images=3, size=32, seed=3)
    flip = SyntheticSegDataset("source", "train", num_images=3, size=32, seed=3, hflip=True)
    torch.manual_seed(0)
    n_flipped = 0
    for k in range(20):
        i = k % 3
        a, b = plain[i], flip[i]
        if torch.equal(b["label"], a["label"]):
            assert torch.equal(b["image"], a["image"])
        else:
            n_flipped += 1
            assert torch.equal(b["label"], a["label"].flip(-1))
            assert torch.equal(b["image"], a["image"].flip(-1))
        assert b["index"] == i
    assert 0 < n_flipped < 20
