"""Rare class sampling on a synthetic label set: the softmax class law, eligible images, crop re-draw,
the automatic statistics cache, determinism, and how a config switches it on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mic_uda.data.datamodule import UDADataModule
from mic_uda.data.rcs import (
    RareClassSampling,
    RCSConfig,
    class_probabilities,
    load_or_compute_stats,
    parse_rcs,
    stats_key,
)
from mic_uda.data.seg_files import FolderSegDataset, PairedSegDataset

H, W = 16, 48


def _label(kind: int) -> np.ndarray:
    """Class 0 background; kind 0: class 1 in the right half; kind 1: + class 2 in a 6-column stripe on
    the left (90 px below the ignored top row); kind 2: + class 3 in a 2-column stripe (30 px, below
    min_pixels=40)."""
    lab = np.zeros((H, W), dtype=np.uint8)
    lab[:, 24:] = 1
    if kind == 1:
        lab[:, :6] = 2
    if kind == 2:
        lab[:, :2] = 3
    lab[0, :] = 255  # an ignored row is never counted
    return lab


def _dataset(root: Path, kinds: list[int], crop: int | None = 16, **kw) -> FolderSegDataset:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i, k in enumerate(kinds):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            root / "images" / f"{i:03d}.png"
        )
        Image.fromarray(_label(k)).save(root / "labels" / f"{i:03d}.png")
    return FolderSegDataset(root, num_classes=4, crop_size=crop, name="synthetic", **kw)


KINDS = [0, 1, 0, 1, 2, 0, 1, 2]


def _cfg(tmp_path: Path, **kw) -> RCSConfig:
    return RCSConfig(**{"enabled": True, "min_pixels": 40, "cache_dir": str(tmp_path / "cache"), **kw})


def test_class_probabilities_follow_the_softmax_formula() -> None:
    pixels = np.array([700, 0, 200, 100])
    classes, p = class_probabilities(pixels, temperature=0.5)
    f = np.array([0.7, 0.2, 0.1])
    expected = np.exp((1 - f) / 0.5) / np.exp((1 - f) / 0.5).sum()
    assert classes.tolist() == [0, 2, 3] and np.allclose(p, expected)
    assert class_probabilities(pixels, 0.01)[1][-1] > 0.99  # T = 0.01: the rarest class nearly always


def test_sampled_classes_and_images_follow_rcs(tmp_path: Path) -> None:
    rcs = RareClassSampling(_dataset(tmp_path / "d", KINDS), _cfg(tmp_path, temperature=0.2))
    counts = rcs.stats.counts
    assert counts[0].tolist() == [15 * 24, 15 * 24, 0, 0] and rcs.stats.sizes[0].tolist() == [H, W]
    # class 3 occurs (32 px per image) but no image reaches min_pixels=40: never sampled, P renormalised
    assert rcs.classes.tolist() == [0, 1, 2]
    _, p_all = class_probabilities(counts.sum(0), 0.2)
    expected = p_all[:3] / p_all[:3].sum()
    torch.manual_seed(0)
    n = 4000
    draws = [rcs.draw() for _ in range(n)]
    observed = np.bincount([c for c, _ in draws], minlength=3)
    chi2 = (((observed - n * expected) ** 2) / (n * expected)).sum()
    assert chi2 < 13.8, (observed, n * expected)  # df = 2, p = 0.001
    for c, i in draws:
        assert counts[i, c] >= 40
    images_of_2 = {i for c, i in draws if c == 2}
    assert images_of_2 == {1, 3, 6}  # uniform over eligible images: all of them are hit


def test_crop_redraw_makes_the_crop_contain_the_class(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "d", [0, 1, 0, 0])  # class 2: a 6-column stripe in image 1 only
    torch.manual_seed(0)

    def share_with_class_2(tries: int) -> float:
        rcs = RareClassSampling(
            ds, _cfg(tmp_path, temperature=0.01, max_crop_tries=tries, min_crop_pixels=32)
        )
        hits = []
        for _ in range(300):
            s = rcs[0]
            if s["index"] == 1:  # class 2 drawn (T = 0.01: almost always the rarest)
                hits.append(int((s["label"] == 2).sum()) >= 30)
        assert len(hits) > 250
        return float(np.mean(hits))

    # a 16-wide crop holds >= 2 stripe columns (30 px) for 5 of 33 offsets: ~15 % per draw, ~80 % in 10
    assert share_with_class_2(1) < 0.3
    assert share_with_class_2(10) > 0.65
    assert share_with_class_2(100) == 1.0


def test_crop_threshold_scales_with_the_resize(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "d", KINDS, crop=8, resize=(24, 8))  # 48x16 -> 24x8: a quarter of the area
    rcs = RareClassSampling(ds, _cfg(tmp_path))
    assert rcs.crop_threshold(0) == pytest.approx(0.5 * 40 / 4)
    assert RareClassSampling(ds, _cfg(tmp_path, min_crop_pixels=7)).crop_threshold(0) == 7
    s = rcs[0]
    assert s["image"].shape == (3, 8, 8) and s["label"].shape == (8, 8)


def test_statistics_are_cached_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _dataset(tmp_path / "d", KINDS)
    first = RareClassSampling(ds, _cfg(tmp_path))
    files = list((tmp_path / "cache").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("synthetic-")
    assert not list((tmp_path / "cache").glob("*.tmp"))  # atomic write leaves no temp file

    def fail(self: PairedSegDataset, path: Path) -> torch.Tensor:
        raise AssertionError(f"label {path} read again although cached")

    monkeypatch.setattr(PairedSegDataset, "read_label", fail)
    again = RareClassSampling(
        FolderSegDataset(tmp_path / "d", num_classes=4, crop_size=16, name="synthetic"), _cfg(tmp_path)
    )
    assert np.array_equal(again.stats.counts, first.stats.counts)
    assert np.array_equal(again.probs, first.probs)


def test_cache_key_follows_files_and_label_mapping(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "d", KINDS)
    key = stats_key(ds)
    assert stats_key(FolderSegDataset(tmp_path / "d", num_classes=4, name="other")) == key  # resize/crop/name
    (tmp_path / "d" / "images" / "007.png").unlink()
    (tmp_path / "d" / "labels" / "007.png").unlink()
    fewer = FolderSegDataset(tmp_path / "d", num_classes=4, name="synthetic")
    assert stats_key(fewer) != key
    mapped = FolderSegDataset(tmp_path / "d", num_classes=4, label_mapping={0: 0, 1: 2, 2: 1, 3: 3})
    assert stats_key(mapped) != stats_key(fewer)
    assert stats_key(FolderSegDataset(tmp_path / "d", num_classes=4, class_subset=[0, 1])) != stats_key(fewer)
    stats = load_or_compute_stats(fewer, tmp_path / "cache")
    assert stats.counts.shape == (7, 4)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


def test_a_fixed_seed_gives_the_same_samples(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "d", KINDS)

    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        rcs = RareClassSampling(ds, _cfg(tmp_path, temperature=0.2))
        return [torch.cat([rcs[0]["label"].flatten(), torch.tensor([rcs[0]["index"]])]) for _ in range(20)]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))

    torch.manual_seed(3)
    rcs = RareClassSampling(ds, _cfg(tmp_path, temperature=0.2))
    rcs.draw()
    state = rcs.state_dict()
    ahead = [rcs.draw() for _ in range(10)]
    rcs.load_state_dict(state)
    assert [rcs.draw() for _ in range(10)] == ahead


def test_clear_errors(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "d", KINDS)
    with pytest.raises(ValueError, match=r"lower data\.rcs\.min_pixels"):
        RareClassSampling(ds, _cfg(tmp_path, min_pixels=10_000))
    unlabelled = FolderSegDataset(tmp_path / "d", num_classes=4, with_labels=False, name="unlabelled")
    with pytest.raises(ValueError, match="unlabelled was built with with_labels=false"):
        RareClassSampling(unlabelled, _cfg(tmp_path))
    with pytest.raises(TypeError, match="file-based source dataset"):
        RareClassSampling(torch.utils.data.TensorDataset(torch.zeros(2)), _cfg(tmp_path))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temprature"):
        parse_rcs({"temprature": 0.01})


def test_datamodule_wraps_the_source_only_when_enabled(tmp_path: Path) -> None:
    _dataset(tmp_path / "d", KINDS)
    source = {
        "_target_": "mic_uda.data.seg_files.FolderSegDataset",
        "root": str(tmp_path / "d"),
        "num_classes": 4,
        "crop_size": 16,
        "name": "synthetic",
    }
    val = {**source, "crop_size": None}
    plain = UDADataModule(source, {**source, "with_labels": False}, val)
    plain.setup("fit")
    assert type(plain.datasets["source"]) is FolderSegDataset
    rcs = {"enabled": True, "min_pixels": 40, "cache_dir": str(tmp_path / "cache")}
    off = UDADataModule(source, {**source, "with_labels": False}, val, rcs={**rcs, "enabled": False})
    off.setup("fit")
    assert type(off.datasets["source"]) is FolderSegDataset
    on = UDADataModule(source, {**source, "with_labels": False}, val, rcs=rcs)
    on.prepare_data()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1  # filled before the ranks set up
    on.setup("fit")
    assert isinstance(on.datasets["source"], RareClassSampling)
    batch = next(iter(on.train_dataloader()))[0]
    assert batch["source"]["label"].shape == (2, 16, 16) and "label" not in batch["target"]


def test_config_switches_rcs(make_cfg) -> None:
    from mic_uda.train import build_datamodule

    dm = build_datamodule(
        make_cfg(["data=gta2cs", "data.rcs.temperature=0.05", "data.rcs.min_pixels=100"], tiny=False)
    )
    assert dm.rcs is not None and dm.rcs.enabled and dm.rcs.temperature == 0.05 and dm.rcs.min_pixels == 100
    assert dm.rcs.cache_dir.endswith(".cache/rcs")
    assert not build_datamodule(make_cfg(["data=gta2cs", "data.rcs.enabled=false"], tiny=False)).rcs_enabled
    assert not build_datamodule(make_cfg(["data=camvid_day2dusk"], tiny=False)).rcs_enabled
