"""Classification data: the class-folder reader on tiny generated trees in the real layouts (VisDA,
Office-Home, digits), its clear errors, the procedural shape domains, and batches from the configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_layouts import class_tree, write_image
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from mic_uda.data.cls_files import ClassFolderDataset
from mic_uda.data.synthetic_cls import SHAPES, SyntheticClsDataset

DIGITS = Path(__file__).parents[1] / ".." / "shared" / "data" / "digits"


@pytest.fixture
def visda(tmp_path: Path) -> Path:
    root = tmp_path / "visda2017"
    class_tree(root / "train", ["bus", "aeroplane", "car"], per_class=3)
    class_tree(root / "validation", ["bus", "aeroplane", "car"], per_class=2)
    (root / "train" / "image_list.txt").write_text("aeroplane/000.jpg 0\n")  # as shipped: ignored
    return root


@pytest.fixture
def officehome(tmp_path: Path) -> Path:
    root = tmp_path / "office_home"
    for domain in ("Art", "Clipart", "Product", "Real_World"):
        class_tree(root / domain, ["Alarm_Clock", "Backpack", "TV", "Table"], per_class=2)
    return root


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    root = tmp_path / "digits"
    for split in ("train", "test"):
        for d in range(3):
            for i in range(2):
                write_image(root / "usps" / split / str(d) / f"usps{i:05d}.png", 16, 30 + 100 * d, mode="L")
                write_image(root / "mnist_m" / split / str(d) / f"mnistm{i:05d}.jpg", 32, (200, 20 * d, 10))
    return root


# ---------------------------------------------------------------------------------------------------
# Class-folder reader
# ---------------------------------------------------------------------------------------------------
def test_visda_layout_sorted_classes_labels_and_items(visda: Path) -> None:
    ds = ClassFolderDataset(visda, "train", image_size=16, pre_crop_size=18, train=True, train_crop="center")
    assert ds.class_names == ["aeroplane", "bus", "car"] and ds.num_classes == 3 and len(ds) == 9
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    item = ds[4]
    assert set(item) == {"image", "label"}
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].shape == () and int(item["label"]) == 1
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    val = ClassFolderDataset(visda, "validation", image_size=16)
    assert len(val) == 6 and val.class_names == ds.class_names


def test_given_class_names_define_the_label_order(officehome: Path) -> None:
    names = ["Table", "TV", "Backpack", "Alarm_Clock"]  # not sorted: labels follow this list
    ds = ClassFolderDataset(officehome, "Clipart", class_names=names, image_size=8)
    for i in range(len(ds)):
        item = ds[i]
        grey = 40 + 60 * sorted(names).index(names[int(item["label"])])  # class_tree colours sorted names
        assert item["image"].mean().item() == pytest.approx(grey / 255, abs=0.02)
    assert ClassFolderDataset(officehome, "Art", image_size=8).class_names == sorted(
        names
    )  # ASCII: TV < Table


def test_grey_usps_png_becomes_three_equal_channels_resized(digits: Path) -> None:
    ds = ClassFolderDataset(digits, "usps/train", image_size=32, train=True, train_crop="none", hflip=False)
    item = ds[2]  # digit 1: grey 130
    assert item["image"].shape == (3, 32, 32)
    assert torch.equal(item["image"][0], item["image"][1]) and torch.equal(item["image"][1], item["image"][2])
    assert item["image"].mean().item() == pytest.approx(130 / 255, abs=1e-3)
    colour = ClassFolderDataset(digits, "mnist_m/test", image_size=32)[5]["image"]  # digit 2
    assert colour.shape == (3, 32, 32) and colour[0].mean() > colour[2].mean() + 0.5  # stays colour


def test_default_collate_gives_int64_label_vector(digits: Path) -> None:
    ds = ClassFolderDataset(digits, "mnist_m/train", image_size=32)
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == [0, 0, 1, 1]


def _asymmetric(root: Path) -> Path:
    """One 40x40 image whose left half is black and right half white."""
    arr = np.zeros((40, 40, 3), dtype=np.uint8)
    arr[:, 20:] = 255
    (root / "a").mkdir(parents=True)
    Image.fromarray(arr).save(root / "a" / "x.png")
    return root


def test_training_crops_and_flip_evaluation_deterministic(tmp_path: Path) -> None:
    root = _asymmetric(tmp_path / "asym")
    torch.manual_seed(0)
    flipped = ClassFolderDataset(root, image_size=32, pre_crop_size=40, train=True, train_crop="center")
    lefts = {round(flipped[0]["image"][:, :, :8].mean().item()) for _ in range(30)}
    assert lefts == {0, 1}  # both orientations occur
    no_flip = ClassFolderDataset(
        root, image_size=32, pre_crop_size=40, train=True, hflip=False, train_crop="random"
    )
    assert all(no_flip[0]["image"][:, :, 0].max() == 0 for _ in range(10))
    rrc = ClassFolderDataset(root, image_size=24, pre_crop_size=40, train=True, train_crop="random_resized")
    assert {rrc[0]["image"].shape for _ in range(5)} == {(3, 24, 24)}
    ev = ClassFolderDataset(root, image_size=32, pre_crop_size=40, train=False)
    assert torch.equal(ev[0]["image"], ev[0]["image"]) and ev[0]["image"][:, :, 0].max() == 0  # centre crop


def test_cache_in_memory_matches_reading_from_disk(visda: Path) -> None:
    disk = ClassFolderDataset(visda, "validation", image_size=16, pre_crop_size=18)
    cached = ClassFolderDataset(visda, "validation", image_size=16, pre_crop_size=18, cache_in_memory=True)
    assert cached.cache is not None and cached.cache.dtype == torch.uint8
    for i in range(len(disk)):
        assert torch.equal(disk[i]["image"], cached[i]["image"]) and disk[i]["label"] == cached[i]["label"]


def test_max_per_class_is_a_deterministic_subset(tmp_path: Path) -> None:
    root = class_tree(tmp_path / "many", ["a", "b"], per_class=12, size=4, suffix=".png")
    one = ClassFolderDataset(root, image_size=4, max_per_class=5)
    two = ClassFolderDataset(root, image_size=4, max_per_class=5)
    other = ClassFolderDataset(root, image_size=4, max_per_class=5, subset_seed=1)
    assert len(one) == 10 and torch.bincount(one.targets).tolist() == [5, 5]
    assert one.samples == two.samples and one.samples != other.samples
    assert len(ClassFolderDataset(root, image_size=4, max_per_class=100)) == 24


def test_unlabelled_target_reads_flat_or_class_folders(tmp_path: Path, visda: Path) -> None:
    flat = tmp_path / "flat"
    for i in range(3):
        write_image(flat / f"{i}.JPG", 10, (i, i, i))  # upper-case suffixes count too
    ds = ClassFolderDataset(flat, image_size=8, with_labels=False)
    assert len(ds) == 3 and set(ds[0]) == {"image"}
    assert len(ClassFolderDataset(visda, "validation", image_size=8, with_labels=False)) == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images .* below '.*empty'"):
        ClassFolderDataset(tmp_path / "empty", image_size=8, with_labels=False)


# Clear errors --------------------------------------------------------------------------------------
def test_missing_root_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        ClassFolderDataset(tmp_path / "nowhere", "train", image_size=8)
    assert str(tmp_path / "nowhere") in str(err.value) and "<root>/train/<class>/*" in str(err.value)


def test_missing_split_lists_the_folders_that_exist(digits: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        ClassFolderDataset(digits, "usps/val", image_size=8)
    msg = str(err.value)
    assert str(digits / "usps" / "val") in msg and "'test', 'train'" in msg


def test_missing_and_unexpected_class_folders_list_both_sets(visda: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        ClassFolderDataset(visda, "train", class_names=["aeroplane", "bus", "horse"], image_size=8)
    msg = str(err.value)
    assert "Missing folders: ['horse']" in msg and "unexpected folders: ['car']" in msg
    assert str(visda / "train") in msg and "['aeroplane', 'bus', 'horse']" in msg
    with pytest.raises(FileNotFoundError, match=r"Missing folders: none; unexpected folders: \['car'\]"):
        ClassFolderDataset(visda, "train", class_names=["aeroplane", "bus"], image_size=8)
    with pytest.raises(ValueError, match="more than once"):
        ClassFolderDataset(visda, "train", class_names=["bus", "bus", "car", "aeroplane"], image_size=8)


def test_empty_class_folder_and_empty_split_are_errors(tmp_path: Path, visda: Path) -> None:
    (visda / "train" / "horse").mkdir()
    (visda / "train" / "horse" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"class folder '.*train/horse' holds no images"):
        ClassFolderDataset(visda, "train", image_size=8)
    (tmp_path / "bare" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no class folders in '.*bare/train'"):
        ClassFolderDataset(tmp_path / "bare", "train", image_size=8)


def test_corrupt_image_names_the_file(visda: Path) -> None:
    bad = visda / "validation" / "car" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = ClassFolderDataset(visda, "validation", image_size=8)
    idx = next(i for i, (p, _) in enumerate(ds.samples) if p == bad)
    with pytest.raises(OSError, match=r"broken\.jpg: cannot read image"):
        ds[idx]
    with pytest.raises(OSError, match=r"broken\.jpg: cannot read image"):  # at start-up when caching
        ClassFolderDataset(visda, "validation", image_size=8, cache_in_memory=True)


def test_bad_options_are_clear_errors(visda: Path) -> None:
    with pytest.raises(ValueError, match=r"train_crop='centre'.*random_resized, random, center, none"):
        ClassFolderDataset(visda, "train", image_size=8, train_crop="centre")
    with pytest.raises(ValueError, match="pre_crop_size >= image_size"):
        ClassFolderDataset(visda, "train", image_size=32, pre_crop_size=16)
    with pytest.raises(ValueError, match="max_per_class"):
        ClassFolderDataset(visda, "train", image_size=8, max_per_class=0)


@pytest.mark.skipif(not DIGITS.is_dir(), reason=f"real digits data not found at {DIGITS.resolve()}")
def test_real_usps_and_mnistm_folders() -> None:
    usps = ClassFolderDataset(DIGITS, "usps/train", image_size=32, max_per_class=2, train_crop="none")
    mnistm = ClassFolderDataset(DIGITS, "mnist_m/test", image_size=32, max_per_class=2)
    assert usps.class_names == mnistm.class_names == [str(d) for d in range(10)]
    assert len(usps) == len(mnistm) == 20
    grey, colour = usps[0]["image"], mnistm[0]["image"]
    assert grey.shape == colour.shape == (3, 32, 32)
    assert torch.equal(grey[0], grey[2]) and not torch.equal(colour[0], colour[2])


# ---------------------------------------------------------------------------------------------------
# Procedural shapes
# ---------------------------------------------------------------------------------------------------
def _images(ds: SyntheticClsDataset, n: int) -> torch.Tensor:
    return torch.stack([ds[i]["image"] for i in range(n)])


def test_synthetic_items_shapes_dtypes_and_balanced_labels() -> None:
    ds = SyntheticClsDataset("target", "train", num_images=12, size=24, seed=0, num_classes=4)
    item = ds[5]
    assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 1
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    assert ds.class_names == list(SHAPES[:4]) and len(ds) == 12
    labels = next(iter(DataLoader(ds, batch_size=12)))["label"]
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [3, 3, 3, 3]


def test_synthetic_is_deterministic_from_the_seed() -> None:
    a = SyntheticClsDataset("source", "train", num_images=8, size=16, seed=3, num_classes=10)
    b = SyntheticClsDataset("source", "train", num_images=8, size=16, seed=3, num_classes=10)
    assert torch.equal(_images(a, 8), _images(b, 8))
    assert torch.equal(a[5]["image"], _images(a, 8)[5])  # independent of access order
    for other in (
        SyntheticClsDataset("source", "train", num_images=8, size=16, seed=4, num_classes=10),
        SyntheticClsDataset("source", "val", num_images=8, size=16, seed=3, num_classes=10),
    ):
        assert not torch.equal(_images(a, 8), _images(other, 8))


def test_every_shape_renders_in_both_domains() -> None:
    for domain in ("source", "target"):
        ds = SyntheticClsDataset(domain, "val", num_images=len(SHAPES), size=32, num_classes=len(SHAPES))
        imgs = _images(ds, len(SHAPES))
        assert torch.isfinite(imgs).all() and (imgs.std(dim=(1, 2, 3)) > 0.03).all()  # a visible shape


def test_synthetic_domains_differ_measurably() -> None:
    """Texture/noise (median |Laplacian|: zero on the flat source, never on the target) and contrast."""
    src = _images(SyntheticClsDataset("source", "train", num_images=48, size=32), 48)
    tgt = _images(SyntheticClsDataset("target", "train", num_images=48, size=32), 48)

    def texture(x: torch.Tensor) -> torch.Tensor:
        lap = (
            4 * x[..., 1:-1, 1:-1]
            - x[..., :-2, 1:-1]
            - x[..., 2:, 1:-1]
            - x[..., 1:-1, :-2]
            - x[..., 1:-1, 2:]
        )
        return lap.abs().flatten(1).median(dim=1).values

    assert texture(src).max() < 0.005 < 0.02 < texture(tgt).min()  # a perfect one-number domain classifier
    assert src.std(dim=(1, 2, 3)).mean() > tgt.std(dim=(1, 2, 3)).mean() + 0.05  # low-contrast target


def test_synthetic_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="invalid domain 'tgt'"):
        SyntheticClsDataset("tgt")
    with pytest.raises(ValueError, match="invalid split"):
        SyntheticClsDataset("source", "training")
    with pytest.raises(ValueError, match=r"num_classes must be in 2\.\.10"):
        SyntheticClsDataset("source", num_classes=11)
    with pytest.raises(IndexError):
        SyntheticClsDataset("source", num_images=2)[2]


# ---------------------------------------------------------------------------------------------------
# The data configs through UDADataModule
# ---------------------------------------------------------------------------------------------------
def _first_batches(cfg) -> tuple[dict, dict, dict]:
    dm = instantiate(cfg.data.datamodule, _recursive_=False)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))[0]
    return train["source"], train["target"], next(iter(dm.val_dataloader()))


def test_synthetic_cls_config_batches(make_cfg) -> None:
    cfg = make_cfg(
        [
            "data=synthetic_cls",
            "data.image_size=16",
            "data.datamodule.source.num_images=8",
            "data.datamodule.target.num_images=8",
            "data.datamodule.val.num_images=6",
            "data.datamodule.batch_size=4",
            "data.datamodule.target_batch_size=2",
            "data.datamodule.val_batch_size=6",
        ],
        tiny=False,
    )
    assert cfg.data.num_classes == len(cfg.data.class_names) and cfg.data.mask_block_size == 8
    src, tgt, val = _first_batches(cfg)
    assert src["image"].shape == (4, 3, 16, 16) and src["label"].shape == (4,)
    assert src["label"].dtype == torch.int64
    assert set(tgt) == {"image"} and tgt["image"].shape == (2, 3, 16, 16)  # target labels hidden
    assert val["image"].shape == (6, 3, 16, 16) and sorted(val["label"].tolist()) == [0, 1, 2, 3, 4, 5]


def _tree_for(cfg, root: Path) -> None:
    """The smallest tree in the layout a real-data config reads: one image per class and split."""
    names = list(cfg.data.class_names)
    splits = {cfg.data.datamodule[k].split for k in ("source", "target", "val")}
    for split in splits:
        class_tree(root / split, names, per_class=1, size=12, suffix=".png")


@pytest.mark.parametrize("name", ["usps2mnistm", "visda", "officehome", "folder_cls"])
def test_real_data_configs_read_their_layout(name: str, make_cfg, tmp_path: Path) -> None:
    root = tmp_path / name
    common = [
        "data.datamodule.num_workers=0",
        "data.datamodule.batch_size=2",
        "data.datamodule.target_batch_size=2",
    ]
    if name == "folder_cls":
        roots = [f"data.datamodule.{k}.root={root}" for k in ("source", "target", "val")]
        splits = ["data.datamodule.source.split=synthetic", "data.datamodule.target.split=real"]
        overrides = [*roots, *splits, "data.datamodule.val.split=real"]
    else:
        overrides = [f"data.root={root}"]
    if name != "usps2mnistm":
        overrides += ["data.image_size=8", "data.pre_crop_size=10"]
    cfg = make_cfg([f"data={name}", *common, *overrides], tiny=False)
    _tree_for(cfg, root)
    src, tgt, val = _first_batches(cfg)
    size = cfg.data.image_size
    assert src["image"].shape == (2, 3, size, size) and src["label"].dtype == torch.int64
    assert "label" not in tgt and tgt["image"].shape == (2, 3, size, size)
    assert val["label"].max() < cfg.data.num_classes == len(cfg.data.class_names)


def test_config_with_missing_root_fails_at_setup_naming_the_path(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(["data=usps2mnistm", f"paths.data_dir={tmp_path / 'nowhere'}"], tiny=False)
    dm = instantiate(cfg.data.datamodule, _recursive_=False)
    with pytest.raises(FileNotFoundError) as err:  # the dataset's own error, not Hydra's wrapper
        dm.setup("fit")
    assert str(tmp_path / "nowhere" / "digits") in str(err.value) and "usps/train/<class>" in str(err.value)


def test_config_class_lists_match_the_benchmarks(make_cfg) -> None:
    visda = make_cfg(["data=visda"], tiny=False).data
    assert visda.num_classes == len(visda.class_names) == 12 and visda.primary_metric == "mean_class_acc"
    office = make_cfg(["data=officehome", "data.source=Product", "data.target=Real_World"], tiny=False).data
    assert office.num_classes == len(set(office.class_names)) == 65
    assert list(office.class_names) == sorted(office.class_names)  # the folders' sorted (ASCII) order
    assert office.name == "officehome_Product2Real_World" and office.datamodule.val.split == "Real_World"
    digits = make_cfg(["data=usps2mnistm"], tiny=False).data
    assert OmegaConf.to_container(digits.class_names) == [str(d) for d in range(10)]
    assert digits.datamodule.source.split == "usps/train" and digits.datamodule.val.split == "mnist_m/test"


def test_evaluation_batches_mix_classes_in_a_fixed_order(make_cfg, tmp_path: Path) -> None:
    """Class-folder sets list images class by class; a batch-statistics teacher must not see
    class-pure evaluation batches, and the order must not change between epochs or runs."""
    root = tmp_path / "digits"
    cfg = make_cfg(["data=usps2mnistm", f"data.root={root}", "data.datamodule.val_batch_size=4"], tiny=False)
    _tree_for(cfg, root)
    dm = instantiate(cfg.data.datamodule, _recursive_=False)
    dm.setup("fit")
    orders = [torch.cat([b["label"] for b in dm.val_dataloader()]).tolist() for _ in range(2)]
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(10))
    assert orders[0] != list(range(10))
    target = torch.cat([b["image"] for b in dm.target_eval_dataloader()])
    assert target.shape == (10, 3, 32, 32)  # every unlabelled target image, once
