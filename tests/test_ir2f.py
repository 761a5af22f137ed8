"""IR2F (our interpretation): the LIIF 4-neighbour query, relative coordinates and cell, blend weights,
the factored INR equal to LIIF's, and the rectification-aware mixture loss at its limits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mic_uda.uda.ir2f import (
    IR2F,
    RectificationINR,
    make_coord,
    mixture_nll,
    neighbour_query,
    posterior_weight,
)
from mic_uda.utils.hydra_utils import CONFIG_DIR


def test_make_coord_pixel_centres() -> None:
    c = make_coord(2, 4)
    assert c[:, 0].tolist() == [-0.5] * 4 + [0.5] * 4
    assert c[:4, 1].tolist() == [-0.75, -0.25, 0.25, 0.75]


def test_four_neighbours_offsets_and_bilinear_blend_by_hand() -> None:
    # 4x4 grid: cell centres at -0.75, -0.25, 0.25, 0.75 on both axes
    q = torch.tensor([[0.0, -0.5], [-0.125, -0.75]])
    index, rel, blend = neighbour_query(4, 4, q)
    # query 0 sits between rows 1-2 and columns 0-1: cells (1,0), (1,1), (2,0), (2,1)
    assert index[:, 0].tolist() == [4, 5, 8, 9]
    assert rel[:, 0].tolist() == [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]
    torch.testing.assert_close(blend[:, 0], torch.full((4,), 0.25))
    # query 1: a quarter cell below row 1's centre, on column 0's centre: bilinear (0.75, 0, 0.25, 0)
    assert index[:, 1].tolist() == [4, 5, 8, 9]
    assert rel[:, 1].tolist() == [[0.5, 0.0], [0.5, -2.0], [-1.5, 0.0], [-1.5, -2.0]]
    torch.testing.assert_close(blend[:, 1], torch.tensor([0.75, 0.0, 0.25, 0.0]), atol=1e-8, rtol=0)


def test_blend_sums_to_one_and_is_bilinear_sampling_inside() -> None:
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 3, 5, 7, generator=g)
    q = torch.rand(1, 200, 2, generator=g) * 2 - 1
    index, _, blend = neighbour_query(5, 7, q)
    torch.testing.assert_close(blend.sum(0), torch.ones(1, 200))
    flat = feat.flatten(2).transpose(1, 2)  # (1, 35, 3)
    mixed = sum(
        torch.gather(flat, 1, index[k].unsqueeze(-1).expand(-1, -1, 3)) * blend[k].unsqueeze(-1)
        for k in range(4)
    )
    ref = F.grid_sample(
        feat, q.flip(-1).unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=False
    )
    torch.testing.assert_close(mixed, ref[:, :, 0].transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_corner_queries_clamp_to_the_border_cell() -> None:
    index, _, blend = neighbour_query(4, 4, torch.tensor([[-0.99, -0.99]]))
    assert set(index[:, 0].tolist()) == {0}  # left of and above the first centre: both neighbours clamp
    torch.testing.assert_close(blend.sum(0), torch.ones(1))
    index, _, blend = neighbour_query(4, 4, torch.tensor([[0.99, 0.99]]))
    assert set(index[:, 0].tolist()) == {15} and blend.sum().item() == pytest.approx(1.0)
    one, _, w = neighbour_query(4, 4, torch.tensor([[0.1, -0.6]]), local_ensemble=False)
    assert one.tolist() == [[8]] and w.tolist() == [[1.0]]  # nearest centre: row 2 (0.25), column 0


def _liif_reference(
    inr: RectificationINR, feat: torch.Tensor, coord: torch.Tensor, cell: torch.Tensor
) -> torch.Tensor:
    """LIIF's query_rgb (models/liif.py:37-106) with grid_sample, on the unfolded map, with one linear
    first layer built from the factored weights."""
    b, c, h, w = feat.shape
    unf = F.unfold(feat, 3, padding=1).view(b, c * 9, h, w)
    w_first = torch.cat(
        [inr.feature_conv.weight.reshape(inr.feature_conv.out_channels, -1), inr.coord_linear.weight], 1
    )
    feat_coord = make_coord(h, w).view(h, w, 2).permute(2, 0, 1)[None].expand(b, 2, h, w)
    rx, ry = 2 / h / 2, 2 / w / 2
    preds, areas = [], []
    for vx in (-1, 1):
        for vy in (-1, 1):
            c_ = coord.clone()
            c_[:, :, 0] += vx * rx + 1e-6
            c_[:, :, 1] += vy * ry + 1e-6
            c_.clamp_(-1 + 1e-6, 1 - 1e-6)
            grid = c_.flip(-1).unsqueeze(1)
            q_feat = F.grid_sample(unf, grid, mode="nearest", align_corners=False)[:, :, 0].permute(0, 2, 1)
            q_coord = F.grid_sample(feat_coord, grid, mode="nearest", align_corners=False)[:, :, 0].permute(
                0, 2, 1
            )
            rel = coord - q_coord
            rel[:, :, 0] *= h
            rel[:, :, 1] *= w
            rel_cell = cell.clone()
            rel_cell[:, :, 0] *= h
            rel_cell[:, :, 1] *= w
            inp = torch.cat([q_feat, rel, rel_cell], -1)
            preds.append(inr.mlp(inp @ w_first.t() + inr.feature_conv.bias).squeeze(-1))
            areas.append(torch.abs(rel[:, :, 0] * rel[:, :, 1]) + 1e-9)
    tot = torch.stack(areas).sum(0)
    areas = [areas[3], areas[2], areas[1], areas[0]]
    return sum(p * a / tot for p, a in zip(preds, areas))


def test_factored_inr_equals_liif() -> None:
    torch.manual_seed(0)
    inr = RectificationINR(5, hidden=(16, 16))
    feat = torch.randn(2, 5, 6, 8)
    coord = torch.rand(2, 50, 2) * 1.8 - 0.9
    cell = torch.full((2, 50, 2), 2 / 24.0)
    torch.testing.assert_close(
        inr(feat, coord, cell), _liif_reference(inr, feat, coord, cell), atol=1e-5, rtol=1e-4
    )


def test_mixture_loss_limits_and_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 4, generator=g)
    labels = torch.randint(0, 5, (2, 4, 4), generator=g)
    labels[0, 0, 0] = 255
    ce = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    ones, zeros = torch.ones(2, 4, 4), torch.zeros(2, 4, 4)
    torch.testing.assert_close(mixture_nll(logits, labels, ones), ce)  # r = 1: the CE
    noise = torch.full_like(ce, math.log(5))
    noise[0, 0, 0] = 0.0  # ignored pixels count 0
    torch.testing.assert_close(mixture_nll(logits, labels, zeros), noise)  # r = 0: -log(1 / K)
    r = torch.rand(2, 4, 4, generator=g)
    p = torch.softmax(logits, 1).gather(1, labels.clamp_max(4)[:, None])[:, 0]
    ref = -torch.log(r * p + (1 - r) / 5)
    ref[0, 0, 0] = 0.0
    torch.testing.assert_close(mixture_nll(logits, labels, r), ref)


def test_posterior_weighted_ce_has_the_mixture_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (1, 3, 3), generator=g)
    r = torch.rand(1, 3, 3, generator=g, dtype=torch.float64)
    (g_mix,) = torch.autograd.grad(mixture_nll(logits, labels, r).sum(), logits)
    p = torch.softmax(logits, 1).gather(1, labels[:, None])[:, 0].detach()
    gamma = posterior_weight(r, p, 4)
    (g_em,) = torch.autograd.grad((gamma * F.cross_entropy(logits, labels, reduction="none")).sum(), logits)
    torch.testing.assert_close(g_mix, g_em)


def _stages() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, c, s, s, generator=g, requires_grad=True) for c, s in [(4, 8), (6, 4)]]


def test_ir2f_term_dense_r_supervision_and_names() -> None:
    torch.manual_seed(0)
    term = IR2F((4, 6), num_classes=3, stages=(0, 1), embed_dim=8, hidden=(16, 16), num_queries=32)
    stages = _stages()
    r = term.rectification(stages, (32, 32))
    assert r.shape == (2, 32, 32) and not r.requires_grad and ((r > 0) & (r < 1)).all()
    coarse = IR2F((4, 6), 3, stages=(0, 1), embed_dim=8, hidden=(16,), query_stride=4).rectification(
        stages, (30, 30)
    )
    assert coarse.shape == (2, 30, 30)
    labels = torch.randint(0, 3, (2, 32, 32))
    preds = labels.clone()
    preds[:, :16] = (preds[:, :16] + 1) % 3  # the top half wrong
    labels[1] = 255  # an unlabelled image does not break the batch
    loss, logs = term.supervision_loss(stages, preds, labels, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(s.grad is None for s in stages)  # detach_features (ours)
    assert all(p.grad is not None for p in term.parameters())
    assert all("head" in n for n, _ in term.named_parameters())
    assert 0.0 < logs["r_target_mean"].item() < 1.0 and logs["r_images"].item() == 1
    w = IR2F((4, 6), 3, stages=(0, 1), mixture="weight")
    logits = torch.randn(2, 3, 4, 4)
    lbl, rr = torch.randint(0, 3, (2, 4, 4)), torch.rand(2, 4, 4)
    torch.testing.assert_close(
        w.mixture_loss(logits, lbl, rr), (rr * F.cross_entropy(logits, lbl, reduction="none")).mean()
    )
    with pytest.raises(ValueError, match="mixture"):
        IR2F((4, 6), 3, mixture="em")


def test_ir2f_end_to_end_option_gives_r_a_gradient() -> None:
    term = IR2F((4, 6), 3, stages=(0, 1), embed_dim=8, hidden=(16,), mixture_grad_to_inr=True)
    r = term.rectification(_stages(), (8, 8))
    assert r.requires_grad
    term.mixture_loss(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8)), r).backward()
    assert term.inr_head["reduce"].weight.grad is not None


def test_the_method_config_block_builds_the_term() -> None:
    block = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "method" / "dacs_ir2f.yaml").ir2f)
    # mix_classes / mix_include_ignore are the seg adapter's (seg_terms.IR2FTerm pops them)
    adapter_keys = ("mix_classes", "mix_include_ignore")
    term = IR2F((4, 6, 8, 8), 3, **{k: v for k, v in block.items() if k not in adapter_keys})
    assert term.mixture == "rmm" and term.detach_features and not term.mixture_grad_to_inr
