"""PiPa's pixel contrast (anchor sampling, ignore handling, heads) and patch contrast (crop pairs mapped
exactly onto feature cells for both crops and flips, confidence masks, bank, official flags)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from mic_uda.uda.pipa import (
    CropPair,
    PatchContrast,
    PixelContrast,
    crop_images,
    crop_iou,
    overlap_pairs,
    overlap_slices,
    partner_masks,
    sample_anchors,
    sample_crop_pair,
)
from mic_uda.utils.hydra_utils import CONFIG_DIR

# ----------------------------------------------------------------------------- anchor sampling


def _flat(*runs: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels/predictions of one image from runs ``(label, count, n_wrong)``: ``n_wrong`` of the
    ``count`` pixels predicted as another class (label + 1 mod 50)."""
    lab, pred = [], []
    for c, n, wrong in runs:
        lab += [c] * n
        pred += [(c + 1) % 50] * wrong + [c] * (n - wrong)
    return torch.tensor(lab), torch.tensor(pred)


def _batch(*images: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_flat(*runs) for runs in images]
    n = max(p[0].numel() for p in pairs)
    pad = lambda t, v: torch.cat([t, torch.full((n - t.numel(),), v)])  # noqa: E731
    return torch.stack([pad(p[0], 255) for p in pairs]), torch.stack([pad(p[1], 255) for p in pairs])


def test_anchor_counts_hard_easy_split_and_ignore() -> None:
    labels, predict = _batch(
        [(0, 150, 30), (1, 101, 101), (2, 100, 0), (255, 149, 0)],  # class 2: 100 px, not > 100
        [(0, 300, 60), (255, 200, 0)],
    )
    s = sample_anchors(labels, predict, torch.Generator().manual_seed(0))
    assert s is not None
    assert s.image.tolist() == [0, 0, 1] and s.label.tolist() == [0, 1, 0]  # 255 never an anchor
    assert s.n_view == min(1024 // 3, 100) == 100
    # 30 hard < 50: all hard + 70 easy; 101 hard, 0 easy: 100 hard; both plentiful: 50 / 50
    assert s.num_hard.tolist() == [30, 100, 50]
    for g in range(3):
        idx = s.index[g]
        b, c, k = int(s.image[g]), int(s.label[g]), int(s.num_hard[g])
        assert idx.unique().numel() == s.n_view
        assert (labels[b, idx] == c).all()
        assert (predict[b, idx[:k]] != c).all() and (predict[b, idx[k:]] == c).all()  # hard first


def test_n_view_is_shared_by_the_batch_and_capped() -> None:
    many = [(c, 120, 0) for c in range(11)]
    s = sample_anchors(*_batch(many), torch.Generator().manual_seed(0))
    assert s is not None and s.n_view == 1024 // 11 == 93 and s.index.shape == (11, 93)
    assert sample_anchors(*_batch([(0, 100, 0)]), torch.Generator()) is None  # nothing has > 100 px


def test_official_minus_one_makes_void_an_anchor_class() -> None:
    labels, predict = _batch([(0, 150, 0), (255, 150, 0)])
    fixed = sample_anchors(labels, predict, torch.Generator().manual_seed(0), ignore_label=255)
    official = sample_anchors(labels, predict, torch.Generator().manual_seed(0), ignore_label=-1)
    assert fixed is not None and fixed.label.tolist() == [0]
    assert official is not None and official.label.tolist() == [0, 255]


def _stages(b: int = 2, g: torch.Generator | None = None) -> list[torch.Tensor]:
    g = g or torch.Generator().manual_seed(0)
    return [
        torch.randn(b, c, s, s, generator=g, requires_grad=True) for c, s in [(4, 16), (4, 8), (8, 4), (8, 2)]
    ]


def _labels(b: int = 2) -> torch.Tensor:
    lab = torch.zeros(b, 64, 64, dtype=torch.long)
    lab[:, :, 32:] = 1
    lab[:, 48:, :] = 255  # a quarter void: 64 cells of 255 at 16x16
    return lab


def test_pixel_contrast_trains_its_heads_and_never_anchors_void() -> None:
    torch.manual_seed(0)
    term = PixelContrast((4, 4, 8, 8), num_classes=3, proj_dim=8, max_views=20, min_pixels=20)
    stages = _stages()
    lab = _labels()
    lab[:, 32:48, :] = 255  # void now 128 cells per image (> min_pixels)
    loss, logs = term(stages, lab, torch.Generator().manual_seed(1))
    assert logs["anchor_groups"].item() == 4  # classes 0 and 1 in both images, void never
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in stages)
    assert all(p.grad is not None for p in term.parameters())  # proj_head and the trained cls_head
    assert all("head" in n for n, _ in term.named_parameters())  # 10x lr by the recipe's 'head' key
    official = PixelContrast(
        (4, 4, 8, 8),
        num_classes=3,
        proj_dim=8,
        max_views=20,
        min_pixels=20,
        official_ignore_minus_one=True,
        official_untrained_classifier=True,
    )
    _, logs = official(_stages(), lab, torch.Generator().manual_seed(1))
    assert logs["anchor_groups"].item() == 6 and "aux_ce" not in logs  # void anchors, no CE
    assert not any(p.requires_grad for p in official.cls_head.parameters())


def test_pixel_contrast_aux_detach_keeps_the_ce_off_the_features() -> None:
    term = PixelContrast((4, 4, 8, 8), num_classes=3, proj_dim=8, max_views=20, min_pixels=20, weight=0.0)
    stages = _stages()
    loss, _ = term(stages, _labels(), torch.Generator().manual_seed(1))
    loss.backward()  # only the aux CE (weight 0 on the contrast), detached from the features
    assert all(s.grad is None or s.grad.abs().sum() == 0 for s in stages)
    assert term.cls_head[0].weight.grad.abs().sum() > 0


def test_pixel_contrast_all_void_is_finite() -> None:
    term = PixelContrast((4, 4, 8, 8), num_classes=3, proj_dim=8, max_views=20, min_pixels=20)
    loss, logs = term(_stages(), torch.full((2, 64, 64), 255), torch.Generator())
    assert loss.item() == 0.0 and logs["anchor_groups"].item() == 0
    loss.backward()


# ----------------------------------------------------------------------------- crop pairs


def test_crop_pairs_offsets_on_the_stride_and_iou_in_range() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        p = sample_crop_pair(64, 96, 40, 56, 8, (0.1, 1.0), g)
        assert 0 <= p.top1 <= 24 and 0 <= p.top2 <= 24 and 0 <= p.left1 <= 40 and 0 <= p.left2 <= 40
        assert (p.top2 - p.top1) % 8 == 0 and (p.left2 - p.left1) % 8 == 0
        assert 0.1 <= crop_iou(p.top2 - p.top1, p.left2 - p.left1, 40, 56) <= 1.0
    narrow = [sample_crop_pair(64, 96, 40, 56, 8, (0.9, 0.95), g) for _ in range(50)]
    for p in narrow:  # rarely satisfiable: either in range or the identical fallback
        iou = crop_iou(p.top2 - p.top1, p.left2 - p.left1, 40, 56)
        assert 0.9 <= iou <= 0.95 or (p.top1, p.left1) == (p.top2, p.left2)


def test_overlap_slices_hand_case() -> None:
    p = CropPair(top1=8, left1=0, top2=0, left2=16)  # crop 2 is 8 px up, 16 px right of crop 1
    r1, c1, r2, c2 = overlap_slices(p, 32, 32, 8)
    assert (r1, c1, r2, c2) == (slice(0, 3), slice(2, 4), slice(1, 4), slice(0, 2))


def _coordinate_image(h: int, w: int) -> torch.Tensor:
    """Channels: row, column, and a pattern -- integers, so pooled sums are exact in any order."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([ys, xs, (ys * 7 + xs * 13) % 17]).float()


def _pairs_aligned(pool: int, divisor: int, seed: int = 0) -> bool:
    img = _coordinate_image(64, 96)[None].repeat(3, 1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    ch, cw = 32, 48
    pairs = [sample_crop_pair(64, 96, ch, cw, 8, (0.1, 1.0), g, flip_p=0.5) for _ in range(3)]
    c1, c2 = crop_images(img, pairs, ch, cw)
    f1, f2 = F.avg_pool2d(c1, pool), F.avg_pool2d(c2, pool)  # a network's features on a stride-`pool` grid
    v1, v2 = overlap_pairs(f1, f2, pairs, ch, cw, divisor)
    return v1.shape[0] > 0 and torch.equal(v1, v2)


@pytest.mark.parametrize("stride", [2, 4, 8])
def test_shared_region_maps_to_the_same_image_cells_for_both_crops_and_flips(stride: int) -> None:
    for seed in range(8):  # flips of either crop, all offsets
        assert _pairs_aligned(pool=stride, divisor=stride, seed=seed)


def test_the_official_stride_mismatch_misaligns_the_pairs() -> None:
    # HRDA PiPa: features on a stride-2 grid (logits at image size, avg-pooled by 2), boxes // 8
    assert not any(_pairs_aligned(pool=2, divisor=8, seed=s) for s in range(8))


def test_partner_masks() -> None:
    c1 = torch.tensor([0.95, 0.50, 0.92, 0.99])
    c2 = torch.tensor([0.97, 0.95, 0.91, 0.50])
    m1, m2 = partner_masks(c1, c2, 0.9)
    assert m1.tolist() == [True, True, False, False]  # partner above 0.9 and more confident
    assert m2.tolist() == [False, False, True, True]


# ----------------------------------------------------------------------------- the patch term


class TinyNet(nn.Module):
    """Stages at strides 4 and 8, logits at image size: a stand-in for ``forward_with_features``."""

    def __init__(self) -> None:
        super().__init__()
        self.s1 = nn.Conv2d(3, 4, 4, stride=4)
        self.s2 = nn.Conv2d(4, 6, 2, stride=2)
        self.cls = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        a = torch.relu(self.s1(x))
        b = torch.relu(self.s2(a))
        return F.interpolate(self.cls(b), size=x.shape[-2:], mode="bilinear", align_corners=False), [a, b]


def _patch(**kw) -> PatchContrast:
    args = dict(
        stage_channels=(4, 6),
        num_classes=3,
        stages=(0, 1),
        proj_dim=8,
        bank_per_crop=16,
        start_step=2,
        confidence=0.0,
    )
    args.update(kw)
    return PatchContrast(**args)


def test_patch_term_starts_late_then_trains_the_student_through_the_bank() -> None:
    torch.manual_seed(0)
    student = TinyNet()
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        teacher.cls.weight.mul_(50)  # a teacher that predicts more than one class: negatives exist
    term = _patch()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)

    def noise(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:  # the crops' photometric aug
        return img + 0.1 * torch.randn(img.shape, generator=gen)

    loss, logs = term(x, student, teacher, step=1, generator=g, augment=noise)
    assert not loss.requires_grad and logs["active"].item() == 0 and len(term.queue) == 0
    for step in range(2, 6):
        loss, logs = term(x, student, teacher, step=step, generator=g, augment=noise)
        assert len(term.queue) == min(step - 1, 3) * 32  # 16 cells of each crop per iteration, 3 kept
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert student.s1.weight.grad.abs().sum() > 0 and term.proj_head[0].weight.grad is not None
    assert not any(p.grad is not None for p in teacher.parameters())
    assert all("head" in n for n, _ in term.named_parameters())


def test_official_patch_on_teacher_reaches_only_the_projection() -> None:
    torch.manual_seed(0)
    student, teacher = TinyNet(), TinyNet().requires_grad_(False)
    term = _patch(official_patch_on_teacher=True, official_patch_classifier=True, start_step=0)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    loss, _ = term(x, student, teacher, step=0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in student.parameters())
    assert term.proj_head[0].weight.grad is not None
    assert term.patch_classifier is not None and not term.patch_classifier.weight.requires_grad


def test_patch_confidence_gate_can_switch_every_pair_off() -> None:
    student, teacher = TinyNet(), TinyNet().requires_grad_(False)
    term = _patch(confidence=1.0, start_step=0)  # no probability is above 1
    loss, logs = term(torch.rand(2, 3, 64, 64), student, teacher, step=0, generator=torch.Generator())
    assert loss.item() == 0.0 and logs["counted"].item() == 0.0


def test_patch_start_scales_with_the_schedule_and_the_queue_is_checkpointed() -> None:
    assert _patch(start_step=10000).start == 10000
    assert _patch(start_fraction=1 / 6, max_steps=60000).start == 10000
    assert _patch(start_fraction=1 / 6, max_steps=3000).start == 500
    with pytest.raises(ValueError, match="max_steps"):
        _patch(start_fraction=0.5)
    student, teacher = TinyNet(), TinyNet().requires_grad_(False)
    term = _patch(start_step=0)
    term(torch.rand(2, 3, 64, 64), student, teacher, step=0, generator=torch.Generator())
    other = _patch(start_step=0)
    other.load_state_dict(term.state_dict())
    for a, b in zip(term.queue.contents(), other.queue.contents()):
        assert torch.equal(a, b) and a.numel() > 0
    assert term.crop_size(64, 64) == (48, 48) and _patch(official_box_divisor=8, feature_stride=2).crop_size(
        64, 64
    ) == (
        48,
        48,
    )


def test_the_method_config_block_builds_both_terms() -> None:
    block = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "method" / "dacs_pipa.yaml").pipa)
    pixel = PixelContrast((4, 4, 8, 8), 3, **block["pixel"])
    patch = PatchContrast((4, 4, 8, 8), 3, **{**block["patch"], "max_steps": 60000})
    assert pixel.weight == 0.1 and not pixel.official_untrained_classifier
    assert patch.start == 10000 and patch.divisor == 8 and not patch.official_patch_on_teacher
    mic = OmegaConf.load(CONFIG_DIR / "method" / "mic_pipa.yaml")
    assert list(mic.defaults) == ["dacs_pipa", "mic", "_self_"]
