"""SADA's losses on hand-built discriminator outputs and its gradient scalers, against the official
MIC det code (da_heads/loss.py, da_heads/da_heads.py): D4-D7 of the review."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from mic_uda.uda.sada import (
    ScaleAwareAlignment,
    consistency_loss,
    image_level_loss,
    instance_level_loss,
)


def sp(z: float) -> float:  # softplus: BCE(z, 1) = sp(-z), BCE(z, 0) = sp(z)
    return math.log1p(math.exp(z))


def test_image_loss_upsamples_to_the_finest_level_and_is_one_mean_over_both_domains() -> None:
    source = [torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]]), torch.tensor([[[[0.5]]]])]  # label 1
    target = [torch.zeros(1, 1, 3, 3), torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])]  # label 0
    loss = image_level_loss([source, target], [1.0, 0.0])
    # level 1 of the source: 1x1 -> 2x2 constant; of the target: 2x2 -> 3x3 bilinear (align_corners)
    src = [sp(-z) for z in (0.0, 1.0, 2.0, -1.0)] + [sp(-0.5)] * 4
    tgt = [sp(0.0)] * 9 + [sp(z) for z in (0.0, 1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 5.0, 6.0)]
    assert float(loss) == pytest.approx(sum(src + tgt) / len(src + tgt), rel=1e-6)
    per_domain_sum = sum(src) / len(src) + sum(tgt) / len(tgt)  # what the project used to do (D6)
    assert float(loss) != pytest.approx(per_domain_sum, rel=1e-3)


def test_instance_loss_is_one_bce_mean_over_the_rois_of_both_domains() -> None:
    loss = instance_level_loss([torch.tensor([0.0, 2.0]), torch.tensor([1.0])], [1.0, 0.0])
    assert float(loss) == pytest.approx((sp(0.0) + sp(-2.0) + sp(1.0)) / 3, rel=1e-6)


def test_consistency_is_l1_between_pooled_image_and_instance_probabilities() -> None:
    """D5: L1 (not MSE), one mean over both domains' ROIs (official loss.py:121)."""
    pooled = [torch.tensor([0.2, 0.9]), torch.tensor([0.5])]
    inst = [torch.tensor([0.6, 0.7]), torch.tensor([0.1])]
    assert float(consistency_loss(pooled, inst)) == pytest.approx((0.4 + 0.2 + 0.4) / 3, rel=1e-6)


LEVELS = ["0", "1"]


def domain(seed: int, size: int, boxes: list[list[float]]) -> SimpleNamespace:
    """Hand-built inputs of one domain: 2 FPN levels (strides 4 and 8), one image, ROIs + features
    (float64, so gradients compare to rounding)."""
    g = torch.Generator().manual_seed(seed)
    rois = [torch.tensor(boxes, dtype=torch.float64)]
    pool = MultiScaleRoIAlign(LEVELS, 7, 2)
    feats = {
        "0": torch.randn(1, 4, size // 4, size // 4, generator=g, dtype=torch.float64),
        "1": torch.randn(1, 4, size // 8, size // 8, generator=g, dtype=torch.float64),
    }
    pool(feats, rois, [(size, size)])
    return SimpleNamespace(
        features={k: v.requires_grad_() for k, v in feats.items()},
        roi_features=torch.randn(len(boxes), 6, generator=g, dtype=torch.float64).requires_grad_(),
        rois=rois,
        roi_levels=pool.map_levels(rois),
        image_sizes=[(size, size)],
    )


BOXES_S = [[0.0, 0, 20, 20], [4, 4, 60, 60], [10, 2, 200, 220]]  # level 0, 0, 1 (224 px canonical)
BOXES_T = [[2.0, 2, 30, 26], [0, 0, 250, 250]]


def alignment(**kwargs) -> ScaleAwareAlignment:
    torch.manual_seed(0)
    align = ScaleAwareAlignment(feature_channels=4, instance_dim=6, levels=LEVELS, roi_levels=2, **kwargs)
    for m in align.modules():  # larger than the official init, so every term has a visible gradient
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=1.5 / m.weight[0].numel() ** 0.5)
            torch.nn.init.normal_(m.bias, std=0.1)
    return align.double().eval()  # no dropout: the two passes of the instance heads agree


def test_module_losses_use_source_label_one_and_the_pooled_probabilities() -> None:
    align = alignment()
    s, t = domain(1, 256, BOXES_S), domain(2, 256, BOXES_T)
    assert s.roi_levels.tolist() == [0, 0, 1]
    pool = MultiScaleRoIAlign(LEVELS, 7, 2)
    parts = align(s, t, pool)
    logits = [[align.image[lv](d.features[lv]) for lv in LEVELS] for d in (s, t)]
    torch.testing.assert_close(parts["img"], image_level_loss(logits, [1.0, 0.0]))
    ins = [align.instance_logits(d.roi_features, d.roi_levels) for d in (s, t)]
    torch.testing.assert_close(parts["ins"], instance_level_loss(ins, [1.0, 0.0]))
    pooled = [
        pool(
            {lv: torch.sigmoid(align.image[lv](d.features[lv])) for lv in LEVELS}, d.rois, d.image_sizes
        ).mean((1, 2, 3))
        for d in (s, t)
    ]
    torch.testing.assert_close(parts["cst"], consistency_loss(pooled, [torch.sigmoid(x) for x in ins]))
    torch.testing.assert_close(parts["total"], parts["img"] + parts["ins"] + parts["cst"])
    # per_level: ROI k uses the head of its level
    torch.testing.assert_close(ins[0][2], align.instance[1](s.roi_features[2]).view(()))
    torch.testing.assert_close(ins[0][0], align.instance[0](s.roi_features[0]).view(()))


def test_gradient_scalers_match_the_official_heads() -> None:
    """Features get -grl * w * dL for the adversarial terms and +cos * grl * w * dL for the consistency
    (official GradientScalarLayer(-grl) and (+cos * grl), da_heads.py:215-218); the discriminators get
    the plain weighted gradient of every term."""
    w_img, w_ins, w_cst, g_img, g_ins, cos = 0.5, 2.0, 3.0, 0.025, 0.1, 0.1
    align = alignment(
        image_weight=w_img,
        instance_weight=w_ins,
        consistency_weight=w_cst,
        image_grl=g_img,
        instance_grl=g_ins,
        consistency_grl=cos,
    )
    s, t = domain(1, 256, BOXES_S), domain(2, 256, BOXES_T)
    pool = MultiScaleRoIAlign(LEVELS, 7, 2)
    inputs = [*s.features.values(), s.roi_features, *t.features.values(), t.roi_features]
    params = list(align.parameters())
    align(s, t, pool)["total"].backward()
    got_in = [x.grad.clone() for x in inputs]
    got_params = [p.grad.clone() for p in params]

    # the same three losses with no scaler at all
    logits = [[align.image[lv](d.features[lv]) for lv in LEVELS] for d in (s, t)]
    ins = [align.instance_logits(d.roi_features, d.roi_levels) for d in (s, t)]
    pooled = [
        pool(
            {lv: torch.sigmoid(align.image[lv](d.features[lv])) for lv in LEVELS}, d.rois, d.image_sizes
        ).mean((1, 2, 3))
        for d in (s, t)
    ]
    l_img = image_level_loss(logits, [1.0, 0.0])
    l_ins = instance_level_loss(ins, [1.0, 0.0])
    l_cst = consistency_loss(pooled, [torch.sigmoid(x) for x in ins])
    d_img = torch.autograd.grad(l_img, inputs + params, allow_unused=True, retain_graph=True)
    d_ins = torch.autograd.grad(l_ins, inputs + params, allow_unused=True, retain_graph=True)
    d_cst = torch.autograd.grad(l_cst, inputs + params, allow_unused=True)

    def z(x, like):
        return torch.zeros_like(like) if x is None else x

    for i, x in enumerate(inputs):
        is_map = x.dim() == 4
        grl = g_img if is_map else g_ins
        adv = w_img * z(d_img[i], x) if is_map else w_ins * z(d_ins[i], x)
        expected = -grl * adv + cos * grl * w_cst * z(d_cst[i], x)
        torch.testing.assert_close(got_in[i], expected, rtol=1e-10, atol=1e-14)
        assert float(z(d_cst[i], x).abs().sum()) > 0  # the consistency reaches every feature
    k = len(inputs)
    for j, p in enumerate(params):
        expected = w_img * z(d_img[k + j], p) + w_ins * z(d_ins[k + j], p) + w_cst * z(d_cst[k + j], p)
        torch.testing.assert_close(got_params[j], expected, rtol=1e-10, atol=1e-14)


def test_grl_scale_multiplies_only_what_reaches_the_features() -> None:
    """The warm start scales the features' gradients (reversed and consistency), not the discriminators'."""
    grads = []
    for scale in (1.0, 0.25):
        align = alignment()
        s, t = domain(1, 256, BOXES_S), domain(2, 256, BOXES_T)
        align(s, t, MultiScaleRoIAlign(LEVELS, 7, 2), grl_scale=scale)["total"].backward()
        inputs = [s.features["0"], s.roi_features, t.features["1"], t.roi_features]
        grads.append(([x.grad for x in inputs], [p.grad.clone() for p in align.parameters()]))
    for full, quarter in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(quarter, 0.25 * full)
        assert full.abs().sum() > 0
    for full, same in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(same, full)


def test_instance_head_layouts() -> None:
    x = torch.randn(4, 6)
    levels = torch.tensor([0, 1, 1, 0])
    shared = ScaleAwareAlignment(4, 6, LEVELS, roi_levels=2, instance_heads="shared").eval()
    assert len(shared.instance) == 1
    torch.testing.assert_close(shared.instance_logits(x, levels), shared.instance[0](x).view(-1))
    official = ScaleAwareAlignment(4, 6, LEVELS, roi_levels=2, instance_heads="official_first_level").eval()
    assert len(official.instance) == 1
    xr = x.clone().requires_grad_()
    out = official.instance_logits(xr, levels)  # da_heads.py:191 returns after level 0
    torch.testing.assert_close(out[[0, 3]], official.instance[0](x[[0, 3]]).view(-1))
    assert out[1] == 0 and out[2] == 0
    out.sum().backward()
    assert xr.grad[[1, 2]].abs().sum() == 0 and xr.grad[[0, 3]].abs().sum() > 0
    per_level = ScaleAwareAlignment(4, 6, LEVELS, roi_levels=2).eval()
    out = per_level.instance_logits(x, torch.tensor([0, 0, 0, 0]))
    out.sum().backward()  # a head with no ROI this step still has a (zero) gradient: DDP sees it used
    assert all(p.grad is not None for p in per_level.instance.parameters())
    with pytest.raises(ValueError, match=r"method\.sada\.instance_heads='all'"):
        ScaleAwareAlignment(4, 6, LEVELS, instance_heads="all")


def test_official_initialisation() -> None:
    torch.manual_seed(0)
    align = ScaleAwareAlignment(256, 1024, ["0", "1", "2", "3", "pool"], roi_levels=4)
    align.requires_grad_(False)
    convs = [m for m in align.image.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in align.instance.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) == 10 and len(linears) == 12  # 5 image heads, 4 x 3-layer instance heads
    assert all(float(m.bias.abs().max()) == 0 for m in convs + linears)
    assert float(torch.cat([m.weight.flatten() for m in convs]).std()) == pytest.approx(0.001, rel=0.05)
    assert float(torch.cat([m.weight.flatten() for m in linears]).std()) == pytest.approx(0.01, rel=0.05)
