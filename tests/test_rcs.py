"""Rare class sampling on a synthetic label set: the softmax class law, eligible images (strictly more
than min_pixels), the crop re-draw (1 + up to 10 crops, strictly more than the threshold, each crop the
pipeline's cat_max_ratio RandomCrop), the automatic statistics cache, determinism, and the configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mic_uda.data import seg_files
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
    min_pixels=40); kind 3: class 1 only; kind 4: class 0 with class 1 in the last 8 columns."""
    lab = np.zeros((H, W), dtype=np.uint8)
    lab[:, 24:] = 1
    if kind == 1:
        lab[:, :6] = 2
    if kind == 2:
        lab[:, :2] = 3
    if kind == 3:
        lab[:] = 1
    if kind == 4:
        lab[:] = 0
        lab[:, 40:] = 1
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
        assert counts[i, c] > 40
    images_of_2 = {i for c, i in draws if c == 2}
    assert images_of_2 == {1, 3, 6}  # uniform over eligible images: all of them are hit


def test_crop_redraw_makes_the_crop_contain_the_class(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "d", [0, 1, 0, 0])  # class 2: a 6-column stripe in image 1 only
    torch.manual_seed(0)

    def share_with_class_2(tries: int) -> float:
        rcs = RareClassSampling(
            ds, _cfg(tmp_path, temperature=0.01, max_crop_redraws=tries - 1, min_crop_pixels=32)
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


def test_eligibility_needs_strictly_more_than_min_pixels(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "d", KINDS)  # class 2: exactly 90 px in images 1, 3 and 6
    assert 2 not in RareClassSampling(ds, _cfg(tmp_path, min_pixels=90)).classes.tolist()  # official `>`
    rcs = RareClassSampling(ds, _cfg(tmp_path, min_pixels=89))
    assert 2 in rcs.classes.tolist() and rcs.images_with_class[2].tolist() == [1, 3, 6]


def _count_crop_draws(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = seg_files.crop_offsets

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(seg_files, "crop_offsets", counting)
    return calls


def test_crop_tries_are_one_plus_up_to_ten_redraws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16x16 crop of an all-class-1 label (top row ignored) holds exactly 240 px of class 1."""
    ds = _dataset(tmp_path / "d", [3, 3], crop=16)
    calls = _count_crop_draws(monkeypatch)

    def draws(**kw) -> int:
        rcs = RareClassSampling(ds, _cfg(tmp_path, min_pixels=10, **kw))
        calls.clear()
        assert (rcs[0]["label"] == 1).sum() == 240
        return len(calls)

    assert draws(min_crop_pixels=239) == 1  # 240 > 239: the first crop is kept
    assert draws(min_crop_pixels=240) == 11  # never > 240: the first crop and 10 re-draws (official)
    assert draws(min_crop_pixels=240, max_crop_redraws=3) == 4
    assert draws(min_crop_pixels=0) == 1  # a zero threshold turns the re-draw off (official ratio 0)
    assert draws(min_crop_pixels=None, min_crop_ratio=0.0) == 1


def test_every_rcs_crop_is_the_pipelines_cat_max_ratio_crop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one class only: every crop is "dominated", so each RandomCrop draws 1 + 10 times (mmseg)
    ds = _dataset(tmp_path / "d", [3, 3], crop=16, cat_max_ratio=0.75)
    calls = _count_crop_draws(monkeypatch)
    for threshold, expected in [(239, 11), (240, 11 * 11)]:
        rcs = RareClassSampling(ds, _cfg(tmp_path, min_pixels=10, min_crop_pixels=threshold))
        calls.clear()
        rcs[0]
        assert len(calls) == expected, threshold


def test_cat_max_ratio_applies_inside_rcs(tmp_path: Path) -> None:
    """Class 0 everywhere but class 1 in the last 8 columns: of the 33 offsets of a 16-wide crop, 8 hold
    class 1 and only 4 of them (5..8 columns) keep class 0 below 75 %. RCS draws class 1 (T = 0.01)."""
    ds_all = _dataset(tmp_path / "d", [4, 4], crop=16)
    ds_cat = FolderSegDataset(
        tmp_path / "d", num_classes=4, crop_size=16, name="synthetic", cat_max_ratio=0.75
    )

    def dominated_share(ds: FolderSegDataset) -> float:
        torch.manual_seed(0)
        rcs = RareClassSampling(ds, _cfg(tmp_path, min_pixels=10, min_crop_pixels=1))
        shares = []
        for _ in range(300):
            lab = rcs[0]["label"]
            lab = lab[lab != 255]
            shares.append(bool((lab == 0).float().mean() >= 0.75))
        return float(np.mean(shares))

    # without: the accepted crops hold 1..8 columns of class 1 uniformly, half of them dominated, plus the
    # ~5 % where all 11 crops miss class 1 (~0.53); with: a dominated crop survives only when all 11 draws
    # of every RandomCrop miss (~0.04)
    assert dominated_share(ds_all) > 0.4
    assert dominated_share(ds_cat) < 0.12


def test_scaled_crop_threshold_option_follows_the_resize(tmp_path: Path) -> None:
    """``min_crop_pixels: null`` (rcs/default.yaml, not the official rule): scaled by the resize area."""
    ds = _dataset(tmp_path / "d", KINDS, crop=8, resize=(24, 8))  # 48x16 -> 24x8: a quarter of the area
    rcs = RareClassSampling(ds, _cfg(tmp_path))
    assert rcs.crop_threshold(0) == pytest.approx(0.5 * 40 / 4)
    assert RareClassSampling(ds, _cfg(tmp_path, min_crop_pixels=7)).crop_threshold(0) == 7
    s = rcs[0]
    assert s["image"].shape == (3, 8, 8) and s["label"].shape == (8, 8)
    kept = FolderSegDataset(tmp_path / "d", num_classes=4, crop_size=8, resize=(24, 24), keep_ratio=True)
    # keep_ratio: 48x16 -> 24x8 again (s = min(24 / 48, 24 / 16)), not 24x24
    assert RareClassSampling(kept, _cfg(tmp_path)).crop_threshold(0) == pytest.approx(0.5 * 40 / 4)


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
    assert dm.rcs.min_crop_pixels == 1500 and dm.rcs.max_crop_redraws == 10  # official 0.5 * 3000, 1 + 10
    assert not build_datamodule(make_cfg(["data=gta2cs", "data.rcs.enabled=false"], tiny=False)).rcs_enabled
    assert not build_datamodule(make_cfg(["data=camvid_day2dusk"], tiny=False)).rcs_enabled


@pytest.mark.parametrize(
    "data", ["gta2cs", "synthia2cs", "synthia2cs_16", "cs2acdc", "cs2darkzurich", "cs2bdd_night"]
)
def test_benchmark_configs_use_the_official_fixed_crop_threshold(make_cfg, data: str) -> None:
    from mic_uda.train import build_datamodule

    rcs = build_datamodule(make_cfg([f"data={data}"], tiny=False)).rcs
    assert rcs is not None and rcs.enabled and rcs.min_pixels == 3000 and rcs.min_crop_pixels == 1500
    assert rcs.temperature == 0.01 and rcs.max_crop_redraws == 10
    camvid = build_datamodule(make_cfg(["data=camvid_day2dusk"], tiny=False)).rcs
    assert camvid is not None and camvid.min_crop_pixels is None  # the scaled option stays the default
