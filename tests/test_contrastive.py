"""Exact values of the shared contrastive maths (InfoNCE, PiPa's pixel contrast) and the FIFO queue."""

from __future__ import annotations

import math

import pytest
import torch

from mic_uda.uda.contrastive import (
    FeatureQueue,
    info_nce,
    masked_mean,
    nearest_labels,
    pixel_contrast_loss,
    probabilities_on_grid,
    random_subset,
)


def unit(*v: float) -> torch.Tensor:
    t = torch.tensor(v, dtype=torch.float64)  # float64: exact comparisons with the hand values
    return t / t.norm()


def test_info_nce_hand_value_and_label_masking() -> None:
    a = unit(1, 0)[None]
    p = unit(1, 0)[None]
    negs = torch.stack([unit(0, 1), unit(-1, 0), unit(1, 1)])  # sims 0, -1, 1/sqrt(2)
    t = 0.5
    s = [0.0, -1.0, 1 / math.sqrt(2)]
    expected = math.log(math.exp(1 / t) + sum(math.exp(x / t) for x in s)) - 1 / t
    assert info_nce(a, p, negs, t).item() == pytest.approx(expected, rel=1e-6)
    # label-aware: the negatives of the anchor's own class (0) are left out
    got = info_nce(a, p, negs, t, torch.tensor([0]), torch.tensor([0, 1, 0])).item()
    assert got == pytest.approx(math.log(math.exp(1 / t) + math.exp(-1 / t)) - 1 / t, rel=1e-6)
    # every negative masked: log(exp(pos) / exp(pos)) = 0, finite gradient
    a2 = a.clone().requires_grad_(True)
    loss = info_nce(a2, p, negs, t, torch.tensor([3]), torch.tensor([3, 3, 3]))
    assert loss.item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(a2.grad).all()


def test_info_nce_is_a_cross_entropy_with_the_positive_first() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    p = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    n = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    logits = torch.cat([(a * p).sum(1, keepdim=True), a @ n.t()], 1) / 0.1
    ref = torch.nn.functional.cross_entropy(logits, torch.zeros(5, dtype=torch.long), reduction="none")
    torch.testing.assert_close(info_nce(a, p, n, 0.1), ref)


def test_masked_mean_empty_is_a_connected_zero() -> None:
    v = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    assert masked_mean(v, torch.tensor([True, False, True])).item() == 2.5
    z = masked_mean(v, torch.zeros(3, dtype=torch.bool))
    assert z.item() == 0.0 and z.requires_grad


def test_pixel_contrast_official_value_and_scale() -> None:
    # two groups of class 0 (two images) and one of class 1, 2 views each; the views of a class are
    # equal (s_pos = 1), the classes at cosine 0.6 (s_neg = 0.6)
    e0, e1 = unit(1, 0), unit(0.6, 0.8)
    feats = torch.stack([torch.stack([e0, e0]), torch.stack([e0, e0]), torch.stack([e1, e1])])
    labels = torch.tensor([0, 0, 1])
    t, tb = 0.1, 0.07
    sp, sn = 1 / t, 0.6 / t
    # class-0 anchor: 3 positives, 2 negatives; class-1 anchor: 1 positive, 4 negatives
    a0 = -(sp - math.log(math.exp(sp) + 2 * math.exp(sn)))
    a1 = -(sp - math.log(math.exp(sp) + 4 * math.exp(sn)))
    expected = (t / tb) * (4 * a0 + 2 * a1) / 6
    assert pixel_contrast_loss(feats, labels, t, tb).item() == pytest.approx(expected, rel=1e-6)
    # SupCon's denominator sums over every other anchor (positives included)
    s0 = -(sp - math.log(3 * math.exp(sp) + 2 * math.exp(sn)))
    s1 = -(sp - math.log(math.exp(sp) + 4 * math.exp(sn)))
    supcon = (t / tb) * (4 * s0 + 2 * s1) / 6
    assert pixel_contrast_loss(feats, labels, t, tb, "supcon").item() == pytest.approx(supcon, rel=1e-6)
    # the 0.1 / 0.07 scale: base_temperature = temperature removes it
    plain = pixel_contrast_loss(feats, labels, t, t).item()
    assert plain * t / tb == pytest.approx(expected, rel=1e-6)


def test_pixel_contrast_matches_a_loop_reference() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.nn.functional.normalize(torch.randn(4, 3, 5, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([2, 0, 2, 1])
    t, tb = 0.1, 0.07
    x = torch.cat(torch.unbind(feats, 1))
    y = labels.repeat(3).tolist()
    total, n = 0.0, 0
    for i in range(len(y)):
        negs = sum(math.exp(float(x[i] @ x[k]) / t) for k in range(len(y)) if y[k] != y[i])
        terms = [
            float(x[i] @ x[j]) / t - math.log(math.exp(float(x[i] @ x[j]) / t) + negs)
            for j in range(len(y))
            if j != i and y[j] == y[i]
        ]
        if terms:
            total += -(t / tb) * sum(terms) / len(terms)
            n += 1
    assert pixel_contrast_loss(feats, labels, t, tb).item() == pytest.approx(total / n, rel=1e-9)


def test_pixel_contrast_without_positives_is_a_connected_zero() -> None:
    feats = torch.stack([unit(1, 0)[None], unit(0, 1)[None]]).requires_grad_(True)  # (2, 1, 2)
    loss = pixel_contrast_loss(feats, torch.tensor([0, 1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(feats.grad).all()


def test_queue_fifo_order_size_and_partial_slots() -> None:
    q = FeatureQueue(dim=1, slots=3, slot_size=2)
    assert len(q) == 0 and q.contents()[0].shape == (0, 1)
    for k in range(1, 5):  # pushes 1..4; slot k holds features [k, k + 0.5]
        q.push(torch.tensor([[k], [k + 0.5]]), torch.tensor([10 * k, 10 * k + 1]))
    feats, labels = q.contents()
    assert feats.flatten().tolist() == [2, 2.5, 3, 3.5, 4, 4.5]  # the oldest (1) dropped, oldest first
    assert labels.tolist() == [20, 21, 30, 31, 40, 41]
    q.push(torch.tensor([[5.0]]), torch.tensor([50]))  # a partial slot replaces the oldest (2)
    feats, labels = q.contents()
    assert feats.flatten().tolist() == [3, 3.5, 4, 4.5, 5] and len(q) == 5
    with pytest.raises(ValueError, match="do not fit"):
        q.push(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))


def test_queue_detaches_and_survives_a_state_dict_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    q = FeatureQueue(dim=4, slots=3, slot_size=5)
    x = torch.randn(5, 4, generator=g, requires_grad=True)
    q.push(x * 2, torch.arange(5))
    q.push(torch.randn(3, 4, generator=g), torch.arange(3))
    assert not q.features.requires_grad
    assert set(q.state_dict()) == {"features", "labels", "valid", "ptr"}
    r = FeatureQueue(dim=4, slots=3, slot_size=5)
    r.load_state_dict(q.state_dict())
    for a, b in zip(q.contents(), r.contents()):
        assert torch.equal(a, b)
    nxt = torch.randn(5, 4, generator=g)
    q.push(nxt, torch.arange(5))
    r.push(nxt, torch.arange(5))
    assert int(q.ptr) == int(r.ptr) == 0
    for a, b in zip(q.contents(), r.contents()):
        assert torch.equal(a, b)
    assert r.double().features.dtype == torch.float64  # buffers follow the module


def test_nearest_labels_and_cell_probabilities() -> None:
    labels = torch.arange(16).view(1, 4, 4)
    assert nearest_labels(labels, (2, 2)).tolist() == [[[0, 2], [8, 10]]]  # top-left pixel of each cell
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 0, :2, :2] = 10.0  # one cell confidently class 0, the others uniform
    probs = probabilities_on_grid(logits, (2, 2))
    p0 = 1 / (1 + math.exp(-10))
    torch.testing.assert_close(probs[0, 0], torch.tensor([[p0, 0.5], [0.5, 0.5]]))
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 2, 2))


def test_random_subset_distinct_and_capped() -> None:
    g = torch.Generator().manual_seed(0)
    idx = random_subset(10, 4, g, "cpu")
    assert idx.numel() == 4 and idx.unique().numel() == 4 and int(idx.max()) < 10
    assert random_subset(3, 8, g, "cpu").sort().values.tolist() == [0, 1, 2]
