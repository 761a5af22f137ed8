"""Exact tests of the classification UDA maths: CDAN, gradient reversal, MCC, SAM, schedule, weights."""

from __future__ import annotations

import math

import pytest
import torch

from mic_uda.uda import sam
from mic_uda.uda.adversarial import (
    ConditionalDomainAdversarial,
    cdan_features,
    domain_adversarial_loss,
    entropy,
    entropy_weights,
    grad_reverse,
    grl_coefficient,
)
from mic_uda.uda.mcc import mcc_loss
from mic_uda.uda.pseudo_label import confidence_weight
from mic_uda.utils.optim import inv_factor, inv_iteration_factor, inv_iteration_scheduler


def test_cdan_outer_product_layout() -> None:
    f = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    p = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    h = cdan_features(f, p)
    assert h.shape == (2, 6)
    for b in range(2):
        for c in range(2):
            for j in range(3):
                assert h[b, c * 3 + j] == pytest.approx(float(p[b, c] * f[b, j]))


def test_cdan_randomized_map_is_elementwise_product_of_projections() -> None:
    g = torch.Generator().manual_seed(0)
    f, p = torch.randn(4, 5, generator=g), torch.softmax(torch.randn(4, 3, generator=g), 1)
    rf, rp = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    expected = (f @ rf) * (p @ rp) / math.sqrt(7)
    torch.testing.assert_close(cdan_features(f, p, (rf, rp)), expected)


def test_gradient_reversal_flips_and_scales() -> None:
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_reverse(x, 0.3)
    torch.testing.assert_close(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.3, -0.6, -0.9]))


def test_grl_coefficient_warm_start() -> None:
    assert grl_coefficient(0) == 0.0
    assert grl_coefficient(1000, max_iters=1000) == pytest.approx(2 / (1 + math.exp(-1)) - 1)
    assert grl_coefficient(10**6) == pytest.approx(1.0)


def test_entropy_weights_mean_one_and_favour_confident() -> None:
    p = torch.tensor([[0.5, 0.5], [0.99, 0.01], [0.8, 0.2]])
    w = entropy_weights(p)
    assert float(w.mean()) == pytest.approx(1.0)
    assert w[1] > w[2] > w[0]
    h = entropy(p)
    raw = 1 + torch.exp(-h)
    torch.testing.assert_close(w, raw / raw.sum() * 3)


def test_domain_loss_is_mean_of_source_and_target_bce() -> None:
    ds, dt = torch.tensor([2.0, -1.0]), torch.tensor([0.5])
    expected = 0.5 * (
        (-math.log(torch.sigmoid(torch.tensor(2.0))) - math.log(torch.sigmoid(torch.tensor(-1.0)))) / 2
        + (-math.log(1 - torch.sigmoid(torch.tensor(0.5))))
    )
    assert float(domain_adversarial_loss(ds, dt)) == pytest.approx(expected, rel=1e-6)


def test_cdan_reverses_feature_gradient_only() -> None:
    torch.manual_seed(0)
    cdan = ConditionalDomainAdversarial(feature_dim=4, num_classes=3, hidden_dim=8)
    fs, ft = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    ls, lt = torch.randn(4, 3), torch.randn(4, 3)

    def grads(coeff: float) -> tuple[torch.Tensor, torch.Tensor]:
        cdan.zero_grad()
        fs.grad = None
        cdan(fs, ls, ft, lt, coeff).backward()
        return fs.grad.clone(), cdan.discriminator[0].weight.grad.clone()

    g1, d1 = grads(1.0)
    g2, _ = grads(2.0)
    g0, d0 = grads(0.0)
    torch.testing.assert_close(g2, 2 * g1)  # reversal coefficient scales the feature gradient
    assert float(g0.abs().max()) == 0.0  # coefficient 0: features untouched
    torch.testing.assert_close(d0, d1)  # the discriminator itself always descends its loss
    assert float(d1.abs().sum()) > 0


def test_mcc_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    p = [[0.5, 0.5], [0.75, 0.25]]
    h = [-sum(q * math.log(q + 1e-5) for q in row) for row in p]
    w = [1 + math.exp(-x) for x in h]
    w = [2 * x / sum(w) for x in w]
    c = [[sum(w[i] * p[i][r] * p[i][k] for i in range(2)) for k in range(2)] for r in range(2)]
    row = [sum(c[r]) for r in range(2)]
    cn = [[c[r][k] / row[k] for k in range(2)] for r in range(2)]  # tllib's broadcast over the last dim
    expected = (sum(map(sum, cn)) - cn[0][0] - cn[1][1]) / 2
    assert float(mcc_loss(logits, temperature=1.0)) == pytest.approx(expected, rel=1e-6)


def test_mcc_zero_for_confident_distinct_predictions() -> None:
    logits = torch.tensor([[50.0, 0.0, 0.0], [0.0, 50.0, 0.0], [0.0, 0.0, 50.0]])
    assert float(mcc_loss(logits, temperature=1.0)) == pytest.approx(0.0, abs=1e-6)


def test_sam_two_step_update_on_a_quadratic() -> None:
    a = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    rho = 0.05

    def loss() -> torch.Tensor:
        return 0.5 * w @ a @ w

    loss().backward()
    g = a @ torch.tensor([1.0, 1.0])
    offsets = sam.perturb([w], rho)
    w_adv = torch.tensor([1.0, 1.0]) + rho * g / g.norm()
    torch.testing.assert_close(w.detach(), w_adv)
    w.grad = None
    loss().backward()  # gradient at w + e
    sam.restore(offsets)
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, 1.0]))
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, 1.0]) - 0.1 * (a @ w_adv))


def test_sam_skips_parameters_without_gradient() -> None:
    p1, p2 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    p1.grad = torch.tensor([3.0, 4.0])
    offsets = sam.perturb([p1, p2], rho=1.0)
    torch.testing.assert_close(p1.detach(), torch.tensor([1.6, 1.8]))
    torch.testing.assert_close(p2.detach(), torch.ones(2))
    assert len(offsets) == 1


def test_inv_schedule() -> None:
    assert inv_factor(0, 100) == 1.0
    assert inv_factor(100, 100) == pytest.approx(11**-0.75)
    assert inv_factor(50, 100) == pytest.approx(6**-0.75)
    assert inv_factor(500, 100) == pytest.approx(11**-0.75)  # clamped past the end


def test_classification_pseudo_label_weights() -> None:
    conf = torch.tensor([0.99, 0.5, 0.97])
    torch.testing.assert_close(confidence_weight(conf, 0.968, weight_type="probability"), conf)
    torch.testing.assert_close(confidence_weight(conf, 0.968, scope="image"), torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(confidence_weight(conf, 0.968, scope="batch"), torch.full((3,), 2 / 3))


def test_inv_iteration_schedule_is_the_official_per_iteration_decay() -> None:
    """lr0 (1 + 0.001 t)^-0.75 whatever the run length; equals the run-length form only at T = 10k."""
    assert inv_iteration_factor(0) == 1.0
    assert inv_iteration_factor(15000) == pytest.approx(16**-0.75)  # VisDA's end: 0.125, not 0.166
    assert inv_iteration_factor(30000) == pytest.approx(31**-0.75)  # Office-Home's end: 0.076
    assert inv_iteration_factor(7000) == pytest.approx(inv_factor(7000, 10000, gamma=10.0))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
    sched = inv_iteration_scheduler(opt, max_steps=5, gamma=0.001, power=0.75)
    for _ in range(1000):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002 * 2**-0.75)  # not clamped at max_steps
