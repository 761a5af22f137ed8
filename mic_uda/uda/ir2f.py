"""IR2F (SPEC 7), **our interpretation of the abstract**: a LIIF-style implicit neural representation
predicts, for any image coordinate, the probability ``r`` that the teacher's pseudo-label is right
there, and a rectification-aware mixture loss uses it per pixel.

The official code is not public; only the abstract is known (Gong, Wang, Danelljan, Dai, Van Gool,
CVPR 2023): a per-pixel rectification value of the pseudo-label, predicted by an implicit neural
representation from an image coordinate and the nearby deep features, rectified pseudo-labels in a
rectification-aware mixture model (RMM) learned end-to-end. Every choice below is ours and a
constructor argument; the defaults are named "ours" in the config.

The INR follows LIIF (yinboc/liif ``models/liif.py:37-106``, ``utils.py:102-117``): the feature map
3x3-unfolded (``unfold``), the 4 nearest feature vectors of a query (``local_ensemble``), the query's
offset to each scaled by the feature size and the query cell scaled likewise (``cell_decode``), one MLP
shared by the 4 neighbours (LIIF's ``imnet``: hidden 256 x 4, ReLU), the 4 outputs blended by the area
of the rectangle between the query and the diagonally opposite neighbour. Here its first linear layer
is factored (an exact rewrite): the part acting on the unfolded features is a 3x3 convolution computed
once per feature cell, so a query costs only the remaining layers.

What the segmentation module passes each step
---------------------------------------------
* ``ir2f.rectification(teacher_stages, size)`` -> ``r`` ``(B, H, W)``: the teacher's stage features of
  the clean target (the pass that made the pseudo-labels: ``teacher.forward_with_features``) and the
  pseudo-label's ``(H, W)``. Differentiable w.r.t. the INR only if ``mixture_grad_to_inr``.
* ``ir2f.supervision_loss(stages, predictions, labels, generator)``: where correctness is known — the
  source. ``stages`` / ``predictions``: features and argmax of the network named by ``supervise_with``
  (ours: the teacher, no grad, on the source image, so ``r`` learns the correctness of exactly the
  predictions that become pseudo-labels); ``labels``: the source ground truth.
* The target loss of the mixed (and masked) image: with ClassMix, the rectification map mixes as the
  label does, ``r_mix = mix(mask, 1, r)`` (pasted source pixels are known to be right). Then
  ``mixture="rmm"``: ``ir2f.mixture_loss(student_logits, mixed_label, r_mix)`` (needs the student's
  logits at label resolution), or ``mixture="weight"``: ``r_mix`` as the per-pixel weight of the
  network's own ``train_loss`` (in place of DACS's per-image confidence scalar, unless
  ``keep_confidence_weight``). :func:`posterior_weight` gives a per-pixel weight whose weighted CE has
  the RMM's gradient, for a network that answers only ``train_loss`` (HRDA).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIXTURES = ("rmm", "weight")
SUPERVISIONS = ("source", "none")
SUPERVISE_WITH = ("teacher", "student")


def make_coord(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """``(H * W, 2)`` pixel-centre coordinates ``(y, x)`` in [-1, 1], row-major (LIIF ``make_coord``)."""
    ys = -1 + (2 * torch.arange(height, device=device, dtype=torch.float32) + 1) / height
    xs = -1 + (2 * torch.arange(width, device=device, dtype=torch.float32) + 1) / width
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def neighbour_query(
    height: int, width: int, coords: Tensor, local_ensemble: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """The feature cells a query reads on an ``height x width`` grid, LIIF's way.

    ``coords``: ``(..., 2)`` queries ``(y, x)`` in [-1, 1]. Returns ``index`` ``(K, ...)`` flat cell
    indices, ``rel`` ``(K, ..., 2)`` the query minus each cell centre times ``(height, width)``, and
    ``blend`` ``(K, ...)`` weights summing to 1. With ``local_ensemble`` ``K = 4``: the cells above-left,
    above-right, below-left, below-right of the query (LIIF's ``vx, vy in (-1, 1)`` order; borders
    clamp, so two may coincide), each weighted by the area ``|rel_y * rel_x|`` of the *opposite* one
    over the total (= bilinear weights inside the grid; LIIF adds 1e-9 to each area). Without it, ``K
    = 1``: the nearest cell, weight 1.
    """
    u = (coords[..., 0] + 1) * height / 2 - 0.5  # continuous cell index, centres at integers
    v = (coords[..., 1] + 1) * width / 2 - 0.5
    if local_ensemble:
        r0, c0 = torch.floor(u).long(), torch.floor(v).long()
        rows = [r0, r0, r0 + 1, r0 + 1]
        cols = [c0, c0 + 1, c0, c0 + 1]
    else:
        rows, cols = [torch.round(u).long()], [torch.round(v).long()]
    rows = [r.clamp(0, height - 1) for r in rows]
    cols = [c.clamp(0, width - 1) for c in cols]
    index = torch.stack([r * width + c for r, c in zip(rows, cols)])
    rel = torch.stack(
        [
            torch.stack(
                [
                    (coords[..., 0] - (-1 + (2 * r.float() + 1) / height)) * height,
                    (coords[..., 1] - (-1 + (2 * c.float() + 1) / width)) * width,
                ],
                dim=-1,
            )
            for r, c in zip(rows, cols)
        ]
    )
    if not local_ensemble:
        return index, rel, torch.ones_like(index, dtype=coords.dtype)
    area = (rel[..., 0] * rel[..., 1]).abs() + 1e-9
    opposite = area.flip(0)  # (tl, tr, bl, br) -> (br, bl, tr, tl): LIIF's swap of areas 0<->3, 1<->2
    return index, rel, opposite / area.sum(0, keepdim=True)


class RectificationINR(nn.Module):
    """LIIF's implicit function on one feature map: ``(features, coords, cells) -> logit of r``.

    Input of the MLP per neighbour: the (3x3-unfolded) feature vector, the scaled offset (2) and, with
    ``cell_decode``, the scaled cell (2); hidden layers ``hidden`` with ReLU; one output. The first
    layer's feature part is ``feature_conv`` (3x3 when ``unfold``, the same maths as a linear layer on
    ``F.unfold(feat, 3, padding=1)``), its offset/cell part ``coord_linear``.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: Sequence[int] = (256, 256, 256, 256),
        unfold: bool = True,
        cell_decode: bool = True,
        local_ensemble: bool = True,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("method.ir2f.hidden needs at least one layer")
        self.unfold, self.cell_decode, self.local_ensemble = (
            bool(unfold),
            bool(cell_decode),
            bool(local_ensemble),
        )
        width0 = int(hidden[0])
        self.feature_conv = nn.Conv2d(in_channels, width0, 3 if unfold else 1, padding=1 if unfold else 0)
        self.coord_linear = nn.Linear(4 if cell_decode else 2, width0, bias=False)
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(hidden):
            layers += [nn.ReLU(inplace=True), nn.Linear(int(a), int(b))]
        layers += [nn.ReLU(inplace=True), nn.Linear(int(hidden[-1]), 1)]
        self.mlp = nn.Sequential(*layers)

    def first_layer(self, features: Tensor) -> Tensor:
        """The feature part of the first layer for every cell, ``(B, h * w, hidden[0])`` (with its bias)."""
        return self.feature_conv(features).flatten(2).transpose(1, 2)

    def query(self, cell_proj: Tensor, size: tuple[int, int], coords: Tensor, cells: Tensor | None) -> Tensor:
        """Logits ``(B, Q)`` of queries ``(B, Q, 2)`` given :meth:`first_layer`'s ``cell_proj``;
        ``cells`` ``(B, Q, 2)``: the query pixel's size in [-1, 1] units (LIIF ``cell``)."""
        h, w = size
        index, rel, blend = neighbour_query(h, w, coords, self.local_ensemble)
        scale = coords.new_tensor([h, w])
        out = 0.0
        for k in range(index.shape[0]):
            feat = torch.gather(cell_proj, 1, index[k].unsqueeze(-1).expand(-1, -1, cell_proj.shape[-1]))
            coord_in = rel[k] if not self.cell_decode else torch.cat([rel[k], cells * scale], dim=-1)
            pred = self.mlp(feat + self.coord_linear(coord_in)).squeeze(-1)
            out = out + pred * blend[k]
        return out

    def forward(self, features: Tensor, coords: Tensor, cells: Tensor | None = None) -> Tensor:
        """Logits ``(B, Q)`` of ``r`` at ``coords`` ``(B, Q, 2)`` on ``features`` ``(B, C, h, w)``."""
        if self.cell_decode and cells is None:
            raise ValueError("RectificationINR: cell_decode needs the query cells")
        return self.query(self.first_layer(features), tuple(features.shape[-2:]), coords, cells)


def mixture_nll(logits: Tensor, labels: Tensor, r: Tensor, ignore_index: int = 255) -> Tensor:
    """Per-pixel ``-log(r p(y) + (1 - r) / K)`` ``(B, H, W)``, 0 where ignored: "the pseudo-label is
    right" (probability ``r``, likelihood ``p(y)``) or "it is noise" (uniform over the ``K`` classes).
    ``r = 1`` gives the CE, ``r = 0`` the constant ``log K``. Computed as a log-sum-exp, in float32."""
    k = logits.shape[1]
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    log_p = -F.cross_entropy(logits.float(), safe, reduction="none")
    r = r.float()
    with torch.no_grad():
        r_one, r_zero = r >= 1, r <= 0
    log_r = torch.where(r_zero, torch.full_like(r, -math.inf), torch.log(r.clamp_min(1e-38)))
    log_1mr = torch.where(r_one, torch.full_like(r, -math.inf), torch.log1p(-r.clamp_max(1 - 1e-7)))
    nll = -torch.logaddexp(log_r + log_p, log_1mr - math.log(k))
    return torch.where(valid, nll, torch.zeros_like(nll))


def posterior_weight(r: Tensor, p_label: Tensor, num_classes: int) -> Tensor:
    """``gamma = r p / (r p + (1 - r) / K)``, the posterior that the label is right. A CE weighted by
    the detached ``gamma`` of the student's own current ``p`` has exactly the gradient (w.r.t. the
    logits) of :func:`mixture_nll`: ``d/dz -log(r p + (1-r)/K) = gamma * d/dz -log p``."""
    num = r * p_label
    return num / (num + (1 - r) / num_classes)


class IR2F(nn.Module):
    """The IR2F term (ours): a feature adapter + :class:`RectificationINR`, the supervision of ``r`` and
    the mixture loss (see the module docstring for the calls).

    Choices (all "ours"): ``stages``: which stages feed the INR, resized (bilinear) to the finest of
    them and concatenated, reduced by a 1x1 conv to ``embed_dim`` (``inr_head.reduce``); ``detach_
    features``: the INR does not change the segmentation features; ``mixture``: ``rmm`` or ``weight``
    (r as a plain per-pixel CE weight); ``mixture_grad_to_inr``: whether the target mixture loss trains
    the INR too (off: alone it drives ``r`` to 0 wherever the student disagrees with the pseudo-label,
    a degenerate optimum the abstract gives no regulariser against, so ``r`` is learnt from the
    supervision and used as given); ``supervision`` ``source``: BCE of ``r`` against "the prediction is
    right" on ``num_queries`` random labelled source pixels per image, weight ``supervision_weight``;
    ``query_stride``: dense queries for the pseudo-labels on every ``query_stride``-th pixel centre,
    bilinearly upsampled (1 = every pixel, the abstract's point; the MLP cost is per query).
    ``keep_confidence_weight``: also multiply DACS's per-image confidence weight (read by the seg
    module). Parameter names contain ``head`` (``inr_head``) for the 10x lr of new modules.
    """

    def __init__(
        self,
        stage_channels: Sequence[int],
        num_classes: int,
        stages: Sequence[int] = (0, 1, 2, 3),
        embed_dim: int = 64,
        hidden: Sequence[int] = (256, 256, 256, 256),
        unfold: bool = True,
        cell_decode: bool = True,
        local_ensemble: bool = True,
        detach_features: bool = True,
        mixture: str = "rmm",
        mixture_grad_to_inr: bool = False,
        supervision: str = "source",
        supervise_with: str = "teacher",
        supervision_weight: float = 1.0,
        num_queries: int = 4096,
        query_stride: int = 1,
        query_chunk: int = 65536,
        weight: float = 1.0,
        keep_confidence_weight: bool = False,
        ignore_index: int = 255,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        for key, value, allowed in (
            ("mixture", mixture, MIXTURES),
            ("supervision", supervision, SUPERVISIONS),
            ("supervise_with", supervise_with, SUPERVISE_WITH),
        ):
            if value not in allowed:
                raise ValueError(f"method.ir2f.{key}={value!r} is not one of {list(allowed)}")
        if query_stride < 1 or num_queries < 1:
            raise ValueError(
                f"method.ir2f: query_stride and num_queries must be >= 1, got {query_stride}, {num_queries}"
            )
        self.num_classes, self.stages = int(num_classes), tuple(int(s) for s in stages)
        self.detach_features, self.mixture = bool(detach_features), mixture
        self.mixture_grad_to_inr, self.supervision, self.supervise_with = (
            bool(mixture_grad_to_inr),
            supervision,
            supervise_with,
        )
        self.supervision_weight, self.num_queries = float(supervision_weight), int(num_queries)
        self.query_stride, self.query_chunk, self.weight = int(query_stride), int(query_chunk), float(weight)
        self.keep_confidence_weight, self.ignore_index = bool(keep_confidence_weight), int(ignore_index)
        self.align_corners = bool(align_corners)
        c = int(sum(stage_channels[i] for i in self.stages))
        self.inr_head = nn.ModuleDict(
            {
                "reduce": nn.Conv2d(c, embed_dim, 1),
                "inr": RectificationINR(embed_dim, hidden, unfold, cell_decode, local_ensemble),
            }
        )

    def features(self, stages: Sequence[Tensor]) -> Tensor:
        """The INR's feature map ``(B, embed_dim, h, w)`` from the chosen stages."""
        chosen = [stages[i] for i in self.stages]
        if self.detach_features:
            chosen = [s.detach() for s in chosen]
        size = max((s.shape[-2:] for s in chosen), key=lambda hw: hw[0] * hw[1])
        x = torch.cat(
            [
                s
                if s.shape[-2:] == size
                else F.interpolate(s, size=size, mode="bilinear", align_corners=self.align_corners)
                for s in chosen
            ],
            dim=1,
        )
        return self.inr_head["reduce"](x)

    def _query(self, feats: Tensor, coords: Tensor, cells: Tensor) -> Tensor:
        inr: RectificationINR = self.inr_head["inr"]  # type: ignore[assignment]
        proj = inr.first_layer(feats)
        size = (feats.shape[-2], feats.shape[-1])
        chunks = [
            inr.query(proj, size, coords[:, i : i + self.query_chunk], cells[:, i : i + self.query_chunk])
            for i in range(0, coords.shape[1], self.query_chunk)
        ]
        return torch.cat(chunks, dim=1)

    def rectification_logits(self, stages: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """Dense logits of ``r`` ``(B, H, W)`` at the pixel centres of an ``H x W`` label (every
        ``query_stride``-th, then bilinear)."""
        feats = self.features(stages)
        b = feats.shape[0]
        h, w = math.ceil(size[0] / self.query_stride), math.ceil(size[1] / self.query_stride)
        coords = make_coord(h, w, feats.device).unsqueeze(0).expand(b, -1, -1)
        cells = coords.new_tensor([2.0 / h, 2.0 / w]).expand_as(coords)
        logits = self._query(feats, coords, cells).view(b, 1, h, w)
        if (h, w) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits[:, 0]

    def rectification(self, stages: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """``r`` ``(B, H, W)`` in (0, 1); without gradient unless ``mixture_grad_to_inr``."""
        if self.mixture_grad_to_inr:
            return torch.sigmoid(self.rectification_logits(stages, size))
        with torch.no_grad():
            return torch.sigmoid(self.rectification_logits(stages, size))

    def supervision_loss(
        self, stages: Sequence[Tensor], predictions: Tensor, labels: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``supervision_weight * BCE(r, prediction == label)`` on ``num_queries`` random labelled pixels
        of each image (pixel centres of the label grid); a graph-connected 0 if none is labelled."""
        feats = self.features(stages)
        if self.supervision == "none":
            return feats.sum() * 0.0, {}
        b, height, width = labels.shape
        grid = make_coord(height, width, feats.device)
        images, coords, targets = [], [], []
        for i in range(b):
            valid = torch.nonzero(labels[i].reshape(-1) != self.ignore_index).flatten()
            if valid.numel() == 0:  # an unlabelled image has nothing to teach
                continue
            pick = torch.randperm(valid.numel(), generator=generator, device=generator.device)
            pick = valid[pick.to(valid.device)[: self.num_queries]]
            if pick.numel() < self.num_queries:  # pad by repeating (a fixed Q per image for batching)
                pick = pick[torch.arange(self.num_queries, device=pick.device) % pick.numel()]
            images.append(i)
            coords.append(grid[pick])
            targets.append((predictions[i].reshape(-1)[pick] == labels[i].reshape(-1)[pick]).float())
        if not images:
            return feats.sum() * 0.0, {"r_images": feats.new_zeros(())}
        coords_t, targets_t = torch.stack(coords), torch.stack(targets)
        cells = coords_t.new_tensor([2.0 / height, 2.0 / width]).expand_as(coords_t)
        logits = self._query(feats[images], coords_t, cells)
        bce = F.binary_cross_entropy_with_logits(logits.float(), targets_t)
        logs = {
            "r_bce": bce.detach(),
            "r_target_mean": targets_t.mean(),
            "r_mean": torch.sigmoid(logits).mean().detach(),
            "r_images": feats.new_tensor(float(len(images))),
        }
        return self.supervision_weight * bce, logs

    def mixture_loss(self, logits: Tensor, labels: Tensor, r: Tensor) -> Tensor:
        """``weight * mean over all pixels`` of the target loss (ignored pixels count 0, as the project's
        weighted CE): :func:`mixture_nll` (``rmm``) or ``r * CE`` (``weight``)."""
        if self.mixture == "rmm":
            per_pixel = mixture_nll(logits, labels, r, self.ignore_index)
        else:
            per_pixel = r.float() * F.cross_entropy(
                logits.float(), labels, ignore_index=self.ignore_index, reduction="none"
            )
        return self.weight * per_pixel.mean()
