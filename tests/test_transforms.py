"""The train-time transform hook of the class-folder reader and the digits intensity augmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from mic_uda.data.cls_files import ClassFolderDataset
from mic_uda.data.transforms import IntensityAugment


def test_flip_only_is_exactly_one_minus_x() -> None:
    x = torch.rand(3, 5, 5)
    assert torch.equal(IntensityAugment(flip_p=1.0)(x), 1.0 - x)
    assert torch.equal(IntensityAugment(flip_p=0.0)(x), x)


def test_gain_and_offset_map_each_channel_to_a_sub_range_of_unit_interval() -> None:
    torch.manual_seed(0)
    aug = IntensityAugment(flip_p=0.0, gain=(0.25, 0.5), per_channel=True)
    x = torch.zeros(3, 2, 2)
    x[:, 0, 0] = 1.0  # every channel spans [0, 1]: the output spans [o, o + g] exactly
    for _ in range(200):
        y = aug(x)
        low, high = y.amin((1, 2)), y.amax((1, 2))
        gain = high - low
        assert (low >= 0).all() and (high <= 1 + 1e-6).all()
        assert ((gain >= 0.25 - 1e-6) & (gain <= 0.5 + 1e-6)).all()
        # affine per channel: every pixel equals low + gain * x
        assert torch.allclose(y, low[:, None, None] + gain[:, None, None] * x, atol=1e-6)


def test_per_channel_false_keeps_grey_images_grey() -> None:
    torch.manual_seed(1)
    x = torch.rand(1, 6, 6).expand(3, 6, 6).clone()
    y = IntensityAugment(flip_p=0.5, gain=(0.2, 1.0), per_channel=False)(x)
    assert torch.equal(y[0], y[1]) and torch.equal(y[1], y[2])
    z = IntensityAugment(flip_p=0.0, gain=(0.2, 0.3), per_channel=True)(x)
    assert not torch.equal(z[0], z[1])  # per channel: grey strokes become colour


def test_flip_probability_is_respected_over_many_draws() -> None:
    torch.manual_seed(2)
    aug = IntensityAugment(flip_p=0.3)
    x = torch.zeros(1, 1, 1)
    flips = sum(float(aug(x)) == 1.0 for _ in range(4000)) / 4000
    assert abs(flips - 0.3) < 0.03


@pytest.mark.parametrize(
    "kwargs, message",
    [({"flip_p": 1.5}, "flip_p"), ({"gain": (0.5, 0.2)}, "gain"), ({"gain": (0.5, 1.5)}, "gain")],
)
def test_bad_arguments_name_the_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IntensityAugment(**kwargs)


def test_integer_images_are_rejected() -> None:
    with pytest.raises(TypeError, match="float"):
        IntensityAugment()(torch.zeros(3, 2, 2, dtype=torch.uint8))


def _tree(root: Path) -> Path:
    for d in range(2):
        (root / "train" / str(d)).mkdir(parents=True)
        Image.new("L", (8, 8), 40 + 100 * d).save(root / "train" / str(d) / "a.png")
    return root


def test_transform_runs_on_training_items_only(tmp_path: Path) -> None:
    root = _tree(tmp_path / "digits")
    flip = IntensityAugment(flip_p=1.0)
    train = ClassFolderDataset(root, "train", image_size=8, train=True, hflip=False, transform=flip)
    evaluation = ClassFolderDataset(root, "train", image_size=8, train=False, transform=flip)
    plain = ClassFolderDataset(root, "train", image_size=8, train=False)
    assert torch.allclose(train[0]["image"], 1.0 - plain[0]["image"])
    assert torch.equal(evaluation[0]["image"], plain[0]["image"])


def test_non_callable_transform_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="transform must be callable"):
        ClassFolderDataset(_tree(tmp_path / "d"), "train", image_size=8, transform="flip")


def test_usps2mnistm_config_augments_the_source_only(make_cfg) -> None:
    cfg = make_cfg(["data=usps2mnistm"], tiny=False)
    dm = cfg.data.datamodule
    source_tf = instantiate(dm.source.transform)
    kinds = [type(t).__name__ for t in source_tf.transforms]
    assert kinds == ["RandomAffine", "IntensityAugment"]
    assert "transform" not in dm.target and "transform" not in dm.val  # target images as they are
    torch.manual_seed(0)
    out = source_tf(torch.rand(3, 32, 32))
    assert out.shape == (3, 32, 32) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
