"""RCCR: the box on the 8-px grid, the pasted region, the momentum head as the EMA of the student head,
the bank's FIFO size, the confidence filter, the weight ramp and the official flags."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from mic_uda.uda import rccr
from mic_uda.uda.contrastive import info_nce, masked_mean
from mic_uda.uda.ema import ema_alpha
from mic_uda.uda.rccr import RegionalContrast, paste_box, rccr_weight, sample_box
from mic_uda.utils.hydra_utils import CONFIG_DIR


def test_box_on_the_grid_inside_and_touching_every_border() -> None:
    g = torch.Generator().manual_seed(0)
    seen_bottom = seen_right = seen_top = False
    for _ in range(400):
        top, left, bottom, right = sample_box(64, 96, g, 8)
        assert all(v % 8 == 0 for v in (top, left, bottom, right))
        assert 0 <= top < bottom <= 64 and 0 <= left < right <= 96
        assert bottom - top >= 8 and right - left >= 8
        # the same side ratio for both sides: floor(H sqrt(u)) and floor(W sqrt(u)) on the grid
        seen_bottom |= bottom == 64
        seen_right |= right == 96
        seen_top |= top == 0
    assert seen_bottom and seen_right and seen_top  # the official draw never reaches bottom/right


def test_box_side_is_sqrt_beta_of_the_crop(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([torch.tensor(0.25), torch.tensor(0), torch.tensor(0)])  # u = 0.25 -> sides x 0.5
    monkeypatch.setattr(rccr.torch, "rand", lambda *a, **k: next(draws))
    monkeypatch.setattr(rccr.torch, "randint", lambda *a, **k: next(draws))
    assert sample_box(64, 96, torch.Generator(), 8) == (0, 0, 32, 48)


def test_paste_box_region() -> None:
    src, tgt = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    out = paste_box(src, tgt, (8, 0, 16, 8))
    assert out[:, :, 8:, :8].eq(1).all() and out.sum() == 2 * 3 * 8 * 8
    assert src.sum() == 0  # the source is not modified in place


def test_weight_ramp() -> None:
    assert rccr_weight(0, 100) == pytest.approx(0.01 * math.exp(-5))
    assert rccr_weight(25, 100) == pytest.approx(0.01 * math.exp(-2.5))
    assert rccr_weight(100, 100) == pytest.approx(0.01) == rccr_weight(150, 100)


def _term(**kw) -> RegionalContrast:
    args = dict(in_channels=6, max_steps=100, proj_dim=4, bank_per_iteration=10, feature_stride=8)
    args.update(kw)
    return RegionalContrast(**args)


def test_momentum_head_is_the_ema_of_the_student_head_after_a_step() -> None:
    torch.manual_seed(0)
    term = _term()
    for t, s in zip(term.teacher_head.parameters(), term.proj_head.parameters()):
        assert torch.equal(t, s) and not t.requires_grad and s.requires_grad
    names = [n for n, p in term.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("proj_head.") for n in names)  # the teacher head is not optimised
    opt = torch.optim.SGD(term.proj_head.parameters(), lr=0.5)
    before_t = [p.clone() for p in term.teacher_head.parameters()]
    term.embed(torch.randn(2, 6, 3, 3)).pow(3).sum().backward()
    opt.step()
    step, alpha = 7, 0.99
    a = term.update_teacher(alpha, step)
    assert a == ema_alpha(step, alpha) == min(1 - 1 / 8, 0.99)
    for t, t0, s in zip(term.teacher_head.parameters(), before_t, term.proj_head.parameters()):
        torch.testing.assert_close(t, a * t0 + (1 - a) * s, rtol=0, atol=1e-7)
        assert not torch.equal(t, s)
    before_t = [p.clone() for p in term.teacher_head.parameters()]
    assert term.update_teacher(0.99) == 0.99  # the alpha the network's EMA used, as given
    for t, t0, s in zip(term.teacher_head.parameters(), before_t, term.proj_head.parameters()):
        torch.testing.assert_close(t, 0.99 * t0 + 0.01 * s, rtol=0, atol=1e-7)


class Stage(nn.Module):
    """A stand-in network: one stride-8 'last stage' and logits at image size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 8, stride=8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f = self.conv(x)
        return F.interpolate(f[:, :3], size=x.shape[-2:], mode="nearest"), [f]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    labels = torch.randint(0, 3, (2, 32, 32), generator=g)
    return src, labels, tgt


def test_bank_fifo_size_start_and_state_round_trip() -> None:
    torch.manual_seed(0)
    student, teacher = Stage(), Stage().requires_grad_(False)
    term = _term(start_step=2)
    src, labels, tgt = _inputs()
    t_logits, t_stages = teacher(tgt)
    g = torch.Generator().manual_seed(0)
    loss, logs = term(src, labels, tgt, t_logits, t_stages, student, 1, g)
    assert not loss.requires_grad and len(term.queue) == 0
    for k, step in enumerate(range(2, 7)):
        loss, logs = term(src, labels, tgt, t_logits, t_stages, student, step, g)
        assert len(term.queue) == min(k + 1, 3) * 20  # 10 student + 10 teacher cells per iteration
    assert logs["weight"].item() == pytest.approx(rccr_weight(6, 100))
    other = _term()
    other.load_state_dict(term.state_dict())
    for a, b in zip(term.queue.contents(), other.queue.contents()):
        assert torch.equal(a, b)
    assert all(
        torch.equal(a, b) for a, b in zip(term.teacher_head.parameters(), other.teacher_head.parameters())
    )


def test_confidence_filter_and_the_exact_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    monkeypatch.setattr(rccr, "sample_box", lambda h, w, g, grid: (8, 0, 24, 16))  # cells rows 1-2, cols 0-1
    student, teacher = Stage(), Stage().requires_grad_(False)
    term = _term(ramp=False, weight=1.0)
    src, labels, tgt = _inputs()
    _, t_stages = teacher(tgt)
    t_logits = torch.zeros(2, 3, 32, 32)
    t_logits[:, 1, 8:16] = 5.0  # confident (> 0.75) class 1 only in the box's first cell row
    loss, logs = term(src, labels, tgt, t_logits, t_stages, student, 50, torch.Generator().manual_seed(0))
    assert logs["anchors"].item() == 2 * 2 * 2 and logs["counted"].item() == 0.5
    # recompute by hand: anchors = box cells of the mixed image's embedding, keys = the teacher's
    mixed = paste_box(src, tgt, (8, 0, 24, 16))
    q = term.embed(student(mixed)[1][0])[:, :, 1:3, 0:2]
    k = term.embed(t_stages[0], teacher=True)[:, :, 1:3, 0:2]
    probs = torch.softmax(t_logits, 1)
    conf, pl = F.avg_pool2d(probs, 8).max(1)
    bank, bank_labels = term.queue.contents()
    per = info_nce(
        q.permute(0, 2, 3, 1).reshape(-1, 4),
        k.permute(0, 2, 3, 1).reshape(-1, 4),
        bank,
        0.1,
        pl[:, 1:3, 0:2].reshape(-1),
        bank_labels,
    )
    expected = masked_mean(per, conf[:, 1:3, 0:2].reshape(-1) > 0.75)
    torch.testing.assert_close(loss, expected)
    # nothing confident: an exact zero that still has a graph
    loss0, _ = term(src, labels, tgt, torch.zeros(2, 3, 32, 32), t_stages, student, 50, torch.Generator())
    assert loss0.item() == 0.0 and loss0.requires_grad


def test_bank_labels_skip_void_unless_official() -> None:
    student, teacher = Stage(), Stage().requires_grad_(False)
    src, labels, tgt = _inputs()
    labels[:] = 255
    t_logits, t_stages = teacher(tgt)
    for official in (False, True):
        term = _term(official_ignore_negatives=official, bank_per_iteration=16)
        term(src, labels, tgt, t_logits, t_stages, student, 10, torch.Generator().manual_seed(0))
        _, bank_labels = term.queue.contents()
        assert bool((bank_labels == 255).any()) is official


def test_official_flags() -> None:
    term = _term(official_untrained_head=True, official_start_iter=True)
    assert not any(p.requires_grad for p in term.parameters())  # the head never reaches the optimiser
    assert not term.active(100) and term.start == 120  # 300k of 250k: never within the run
    student, teacher = Stage(), Stage().requires_grad_(False)
    src, labels, tgt = _inputs()
    t_logits, t_stages = teacher(tgt)
    fixed_head = _term(official_untrained_head=True)
    loss, _ = fixed_head(src, labels, tgt, t_logits * 20, t_stages, student, 50, torch.Generator())
    loss.backward()  # the random head still passes a gradient to the network
    assert student.conv.weight.grad is not None and student.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="grid"):
        _term(feature_stride=4)(src, labels, tgt, t_logits, t_stages, student, 50, torch.Generator())


def test_the_method_config_block_builds_the_term() -> None:
    block = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "method" / "dacs_rccr.yaml").rccr)
    assert block["feature_stride"] is None  # read from the features by seg_terms.RegionalContrastTerm
    term = RegionalContrast(in_channels=6, **{**block, "max_steps": 250000, "feature_stride": 8})
    assert term.start == 0 and term.bank_per_iteration == 4000 and term.queue.slot_size == 8000
    assert not term.official_untrained_head and term.confidence == 0.75
