"""Exact tests of the task-agnostic UDA maths: masks, ClassMix, EMA, pseudo-label weights, BN policy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mic_uda.uda.augment import StrongAugment, blur_kernel_size
from mic_uda.uda.bn import frozen_bn_statistics, reestimate_bn_statistics, set_teacher_mode
from mic_uda.uda.ema import copy_weights, ema_alpha, ema_update
from mic_uda.uda.losses import weighted_cross_entropy
from mic_uda.uda.masking import apply_mask, block_mask
from mic_uda.uda.mixing import classmix_masks, mix
from mic_uda.uda.pseudo_label import confidence_weight, pseudo_label_from_logits


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ MIC block mask
def test_block_mask_is_constant_on_blocks_and_binary() -> None:
    keep = block_mask(3, 64, 96, block_size=16, ratio=0.7, generator=gen())
    assert keep.shape == (3, 1, 64, 96)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    blocks = keep.view(3, 1, 4, 16, 6, 16)
    # every 16x16 block is one value: max == min inside each block
    assert torch.equal(blocks.amax(dim=(3, 5)), blocks.amin(dim=(3, 5)))


def test_block_mask_equals_nearest_upsampled_uniform_draw() -> None:
    g1, g2 = gen(3), gen(3)
    keep = block_mask(2, 32, 32, block_size=8, ratio=0.5, generator=g1)
    u = torch.rand((2, 1, 4, 4), generator=g2)
    expected = (u > 0.5).float().repeat_interleave(8, 2).repeat_interleave(8, 3)
    assert torch.equal(keep, expected)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_block_mask_kept_fraction_is_one_minus_ratio(ratio: float) -> None:
    keep = block_mask(256, 64, 64, block_size=8, ratio=ratio, generator=gen(1))
    # 256 * 64 blocks: the standard error of the kept fraction is < 0.004
    assert keep.mean().item() == pytest.approx(1 - ratio, abs=0.015)


def test_block_mask_rejects_bad_ratio_and_block() -> None:
    with pytest.raises(ValueError, match="ratio"):
        block_mask(1, 8, 8, 4, 1.0, gen())
    with pytest.raises(ValueError, match="block_size"):
        block_mask(1, 8, 8, 0, 0.5, gen())


def test_apply_mask_fills_with_mean_colour() -> None:
    x = torch.rand(1, 3, 4, 4)
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1
    fill = torch.tensor([0.1, 0.2, 0.3])
    out = apply_mask(x, keep, fill)
    assert torch.equal(out[..., :2], x[..., :2])
    assert torch.allclose(out[0, :, :, 2:], fill.view(3, 1, 1).expand(3, 4, 2))


# ------------------------------------------------------------------ ClassMix
def test_classmix_pastes_half_of_present_classes() -> None:
    labels = torch.zeros(4, 8, 8, dtype=torch.long)
    labels[:, :, 2:4] = 1
    labels[:, :, 4:6] = 2
    labels[:, :, 6:7] = 5
    labels[:, :, 7:] = 255  # ignore is never a class to paste
    masks = classmix_masks(labels, gen(0))
    assert masks.shape == (4, 1, 8, 8)
    for lbl, m in zip(labels, masks[:, 0].bool()):
        pasted = set(lbl[m].unique().tolist())
        kept = set(lbl[~m].unique().tolist()) - {255}
        assert len(pasted) == 2  # ceil(4 / 2)
        assert pasted.isdisjoint(kept) and pasted | kept == {0, 1, 2, 5}
        assert torch.equal(m, torch.isin(lbl, torch.tensor(sorted(pasted)))), "whole classes are pasted"


def test_classmix_odd_number_of_classes_rounds_up() -> None:
    labels = torch.tensor([[[0, 1, 2]]])
    masks = classmix_masks(labels, gen(5))
    assert int(masks.sum()) == 2


def test_mix_takes_source_labels_and_weight_one_where_pasted() -> None:
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    xs, xt = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    ys, pl = torch.full((1, 2, 2), 7), torch.full((1, 2, 2), 3)
    w = torch.full((1, 2, 2), 0.25)
    assert torch.equal(mix(mask, xs, xt)[0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(mix(mask, ys, pl)[0], torch.tensor([[7, 3], [3, 7]]))
    assert torch.equal(mix(mask, torch.ones_like(w), w)[0], torch.tensor([[1.0, 0.25], [0.25, 1.0]]))


# ------------------------------------------------------------------ EMA
def test_ema_alpha_schedule() -> None:
    assert ema_alpha(0, 0.999) == 0.0
    assert ema_alpha(1, 0.999) == 0.5
    assert ema_alpha(9, 0.999) == pytest.approx(0.9)
    assert ema_alpha(100_000, 0.999) == 0.999
    assert ema_alpha(5, 0.5) == 0.5


def test_ema_update_formula_exact() -> None:
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.clone() for p in teacher.parameters()]
    a = ema_update(teacher, student, step=0, alpha=0.999)
    assert a == 0.0
    for tp, sp in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(tp, sp)  # t = 0 copies the student
    teacher.load_state_dict({k: v for k, v in zip(teacher.state_dict(), t0)})
    a = ema_update(teacher, student, step=3, alpha=0.999)
    assert a == 0.75
    for tp, t_old, sp in zip(teacher.parameters(), t0, student.parameters()):
        assert torch.allclose(tp, 0.75 * t_old + 0.25 * sp, atol=1e-7)
    a = ema_update(teacher, student, step=10**6, alpha=0.999)
    assert a == 0.999


def test_ema_buffers_only_when_asked() -> None:
    student, teacher = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    student.running_mean.fill_(4.0)
    student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, step=1, alpha=0.999)
    assert torch.equal(teacher.running_mean, torch.zeros(2))
    ema_update(teacher, student, step=1, alpha=0.999, average_buffers=True)
    assert torch.equal(teacher.running_mean, torch.full((2,), 2.0))
    assert int(teacher.num_batches_tracked) == 7


def test_copy_weights_copies_everything() -> None:
    student, teacher = (
        nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
        nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
    )
    student[1].running_var.fill_(3.0)
    copy_weights(teacher, student)
    for (k, a), b in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------ pseudo-labels
def test_pseudo_label_argmax_and_confidence() -> None:
    logits = torch.tensor([[[[2.0]], [[0.0]]]])  # (1, 2, 1, 1)
    pl, conf = pseudo_label_from_logits(logits)
    assert pl.item() == 0
    assert conf.item() == pytest.approx(math.exp(2) / (math.exp(2) + 1))


def test_confidence_weight_is_confident_fraction_per_image() -> None:
    conf = torch.tensor([[[0.99, 0.5], [0.97, 0.1]], [[0.99, 0.99], [0.99, 0.99]]])
    w = confidence_weight(conf, 0.968, scope="image")
    assert torch.equal(w[0], torch.full((2, 2), 0.5))
    assert torch.equal(w[1], torch.ones(2, 2))
    wb = confidence_weight(conf, 0.968, scope="batch")
    assert torch.equal(wb, torch.full((2, 2, 2), 0.75))


def test_confidence_weight_margins_zero_rows_after_fraction() -> None:
    conf = torch.full((1, 6, 3), 0.99)
    conf[0, 2] = 0.0  # one of 6 rows unconfident -> 5/6
    w = confidence_weight(conf, 0.968, ignore_top=1, ignore_bottom=2)
    assert torch.equal(w[0, 0], torch.zeros(3)) and torch.equal(w[0, 4:], torch.zeros(2, 3))
    assert torch.allclose(w[0, 1:4], torch.full((3, 3), 5 / 6))
    with pytest.raises(ValueError, match="weight_scope"):
        confidence_weight(conf, 0.9, scope="pixel")  # type: ignore[arg-type]


def test_weighted_cross_entropy_means_over_all_pixels() -> None:
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[0, 255]]])
    w = torch.tensor([[[0.5, 1.0]]])
    # CE of uniform 2-class = log 2; ignored pixel contributes 0 but counts in the mean
    assert weighted_cross_entropy(logits, target, w).item() == pytest.approx(0.5 * math.log(2) / 2)


# ------------------------------------------------------------------ augmentation
def test_strong_augment_deterministic_given_generator_and_in_range() -> None:
    x = torch.rand(2, 3, 32, 32)
    aug = StrongAugment(color_jitter_p=1.0, blur_p=1.0)
    a, b = aug(x, gen(7)), aug(x, gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, gen(8)))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_strong_augment_identity_when_disabled() -> None:
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(StrongAugment(color_jitter_p=0.0, blur_p=0.0)(x, gen()), x)


def test_blur_kernel_size_matches_official_formula() -> None:
    assert [blur_kernel_size(s) for s in (64, 128, 192, 512, 1024)] == [7, 13, 19, 51, 103]


# ------------------------------------------------------------------ BatchNorm policies
def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5))


def test_frozen_bn_statistics_keeps_running_stats_but_uses_batch_stats() -> None:
    net = _bn_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    with frozen_bn_statistics(net):
        out = net[1](net[0](x))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed inside frozen_bn_statistics"
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # batch statistics were used
    net(x)  # outside: a normal train pass updates them
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])
    assert net[1].track_running_stats


def test_teacher_mode_batch_vs_running() -> None:
    net = _bn_net()
    set_teacher_mode(net, "batch")
    assert not net[2].training and net[1].training and not net[1].track_running_stats
    before = net[1].running_mean.clone()
    net(torch.randn(2, 3, 4, 4) + 5)
    assert torch.equal(net[1].running_mean, before)
    set_teacher_mode(_bn_net(), "running")
    net2 = _bn_net()
    set_teacher_mode(net2, "running")
    assert not any(m.training for m in net2.modules())
    with pytest.raises(ValueError, match="teacher_bn"):
        set_teacher_mode(net2, "frozen")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# AdaBN: evaluation-time BN statistics from unlabelled target images
# ---------------------------------------------------------------------------------------------------
def test_reestimated_bn_statistics_are_the_plain_average_over_batches() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.1), nn.ReLU(), nn.BatchNorm2d(4))
    net[1].running_mean.fill_(5.0)  # stale source statistics
    batches = [torch.randn(2, 3, 5, 5) * (k + 1) + k for k in range(3)]
    assert reestimate_bn_statistics(net, batches) == 2
    with torch.no_grad():
        feats = [net[0](x) for x in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(net[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(net[1].running_var, var, atol=1e-4)
    assert net[1].momentum == 0.1 and not net.training and not net[1].training  # restored, eval mode


def test_reestimation_leaves_batch_statistics_layers_alone_and_needs_batches() -> None:
    teacher = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    set_teacher_mode(teacher, "batch")  # a batch-statistics teacher has nothing to re-estimate
    before = teacher[1].running_mean.clone()
    assert reestimate_bn_statistics(teacher, [torch.randn(2, 3, 4, 4)]) == 0
    assert torch.equal(teacher[1].running_mean, before)
    with pytest.raises(ValueError, match="no batches"):
        reestimate_bn_statistics(nn.Sequential(nn.BatchNorm2d(3)), [])


def _changed(before: torch.Tensor, after: torch.Tensor) -> list[bool]:
    return [not torch.equal(b, a) for b, a in zip(before, after)]


def test_strong_augment_draw_image_throws_one_coin_per_image() -> None:
    """p = 0.5 jitter only: over 64 images both outcomes occur within one call."""
    x = torch.rand(64, 3, 8, 8)
    out = StrongAugment(color_jitter_p=0.5, blur_p=0.0, draw="image")(x, gen())
    changed = _changed(x, out)
    assert any(changed) and not all(changed)


def test_strong_augment_draw_batch_shares_the_coin_but_not_the_factors() -> None:
    x = torch.rand(16, 3, 8, 8).expand(16, 3, 8, 8).clone()
    x[:] = x[0]  # identical images: only the drawn factors can make them differ
    aug = StrongAugment(color_jitter_p=0.5, blur_p=0.0, draw="batch")
    g = gen()
    outcomes = set()
    for _ in range(12):
        out = aug(x, g)
        changed = _changed(x, out)
        assert all(changed) or not any(changed)  # one coin for the whole batch
        outcomes.add(all(changed))
        if all(changed):
            assert not torch.equal(out[0], out[1])  # factors still per image
    assert outcomes == {True, False}


def test_strong_augment_draw_run_fixes_the_coins_from_the_seed() -> None:
    x = torch.rand(4, 3, 8, 8)
    coins = {s: StrongAugment(draw="run", seed=s).run_coins() for s in range(40)}
    assert coins[3] == StrongAugment(draw="run", seed=3).run_coins()  # a function of the seed alone
    for s, (cj, _blur) in coins.items():
        aug = StrongAugment(color_jitter_p=0.8, blur_p=0.0, draw="run", seed=s)
        g = gen()
        per_step = {tuple(_changed(x, aug(x, g))) for _ in range(3)}
        assert per_step == {(cj < 0.8,) * 4}  # on (or off) for every image of every step
    on = sum(cj < 0.8 for cj, _ in coins.values())
    assert 20 <= on <= 39  # ~80 % of seeds jitter; some do not


def test_strong_augment_rejects_an_unknown_draw() -> None:
    with pytest.raises(ValueError, match=r"method.augment.draw='step' is not one of"):
        StrongAugment(draw="step")


def _replayed_union_masks(labels: torch.Tensor, union: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    out = []
    for lbl in labels:
        chosen = union[torch.randperm(union.numel(), generator=g)[: (union.numel() + 1) // 2]]
        out.append(torch.isin(lbl, chosen))
    return torch.stack(out).unsqueeze(1).float()


def test_classmix_batch_union_draws_half_of_the_batch_classes_per_image() -> None:
    """Official get_class_masks: candidates = classes of the whole batch, one draw per image."""
    labels = torch.zeros(2, 4, 6, dtype=torch.long)
    labels[0, :, 3:] = 1  # image 0: {0, 1}
    labels[1] = torch.tensor([2, 3, 4, 5, 5, 255])  # image 1: {2, 3, 4, 5} + void
    masks = classmix_masks(labels, gen(3), classes="batch_union")
    expected = _replayed_union_masks(labels, torch.tensor([0, 1, 2, 3, 4, 5]), gen(3))
    assert torch.equal(masks, expected)
    assert not masks[:, 0][labels == 255].any()  # void is not a candidate unless asked
    per_image = classmix_masks(labels, gen(3))  # the default draws from each image's own classes
    assert int(per_image[0].sum()) == 12  # ceil(2/2) = 1 of image 0's two equal halves


def test_classmix_include_ignore_makes_void_a_candidate() -> None:
    labels = torch.tensor([[[0, 1, 255, 255]]])
    masks = classmix_masks(labels, gen(1), classes="batch_union", include_ignore=True)
    assert torch.equal(masks, _replayed_union_masks(labels, torch.tensor([0, 1, 255]), gen(1)))
    pasted_void = [
        bool(classmix_masks(labels, gen(s), classes="batch_union", include_ignore=True)[0, 0, 0, 2])
        for s in range(20)
    ]
    assert any(pasted_void) and not all(pasted_void)
    with pytest.raises(ValueError, match=r"method.mix.classes='union' is not one of"):
        classmix_masks(labels, gen(1), classes="union")


def test_confidence_at_the_threshold_counts_as_confident() -> None:
    """Official ``pseudo_prob.ge(threshold)``."""
    conf = torch.tensor([[[0.968, 0.5], [0.9, 0.97]]])
    w = confidence_weight(conf, 0.968, "image")
    assert torch.allclose(w, torch.full_like(conf, 0.5))


def test_kornia05_jitter_maths_on_a_hand_made_image() -> None:
    """The official code's kornia 0.5 ColorJitter ops (v0.5.10 kornia/enhance/adjust.py)."""
    import colorsys

    from mic_uda.uda.augment import kornia05_brightness, kornia05_contrast, kornia05_saturation

    img = torch.tensor([[[0.2, 0.9]], [[0.5, 0.9]], [[0.8, 0.3]]])  # (3, 1, 2): two pixels
    torch.testing.assert_close(kornia05_brightness(img, 1.2), (img + 0.2).clamp(0, 1))  # additive
    assert float(kornia05_brightness(img, 1.2)[0, 0, 1]) == 1.0  # clamped
    torch.testing.assert_close(kornia05_contrast(img, 0.8), img * 0.8)  # no mean blend
    for f in (0.5, 1.7):
        out = kornia05_saturation(img, f)
        for px in range(2):
            h, s, v = colorsys.rgb_to_hsv(*img[:, 0, px].tolist())
            expected = colorsys.hsv_to_rgb(h, min(max(s * f, 0.0), 1.0), v)
            torch.testing.assert_close(out[:, 0, px], torch.tensor(expected), atol=1e-6, rtol=0)
    grey = torch.full((3, 1, 1), 0.4)
    assert torch.equal(kornia05_saturation(grey, 1.5), grey)


def test_strong_augment_semantics_switch_changes_only_the_maths() -> None:
    x = torch.rand(2, 3, 8, 8)
    a = StrongAugment(color_jitter_p=1.0, blur_p=0.0, semantics="torchvision")(x, gen(4))
    b = StrongAugment(color_jitter_p=1.0, blur_p=0.0, semantics="kornia05")(x, gen(4))
    assert not torch.allclose(a, b) and b.min() >= 0 and b.max() <= 1
    with pytest.raises(ValueError, match=r"method.augment.semantics='pil' is not one of"):
        StrongAugment(semantics="pil")


def test_adabn_skips_a_trailing_one_image_batch() -> None:
    """A target set of 1 mod the batch size: the last single image would crash a BatchNorm1d."""
    from mic_uda.uda.bn import reestimate_bn_statistics

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    x = torch.randn(4, 3)
    assert reestimate_bn_statistics(net, [x, torch.randn(1, 3)]) == 1
    expected = net[0](x).detach()
    assert torch.allclose(net[1].running_mean, expected.mean(0), atol=1e-6)
    assert torch.allclose(net[1].running_var, expected.var(0, unbiased=True), atol=1e-5)
