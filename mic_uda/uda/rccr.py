"""RCCR (SPEC 6): regional contrastive consistency between a target box pasted into a source image and
the same box of the clean target, with a momentum (EMA) projection head and a memory bank.

Facts from the official code (qianyuzqy/RCCR at 07a282e): ``train_spasr_gtav.py`` (GTA) and
``train_spasr_syn.py`` (SYNTHIA), ``model/deeplabv2.py``; "official" below is what that code does.

What the segmentation module passes each step
---------------------------------------------
``term(source_images, source_labels, target_images, teacher_logits, teacher_stages, student_fn, step,
generator, augment) -> (loss, logs)``:

* ``source_images`` ``(B, 3, H, W)`` in [0, 1] and ``source_labels`` ``(B, H, W)`` of the source batch;
* ``target_images`` ``(B, 3, H, W)``: the clean target batch;
* ``teacher_logits`` ``(B, K, h', w')`` and ``teacher_stages``: the EMA teacher's logits and stage
  features of the clean target, **the same teacher pass as the pseudo-labels** (official
  ``train_spasr_gtav.py:487``): ``teacher.forward_with_features(x_t)`` under ``no_grad``;
* ``student_fn``: ``images -> (logits, stages)`` of the student with gradient
  (``student.forward_with_features``), called here on the mixed image;
* ``step``: the global step (the weight ramp and the start); ``generator``: box, flip and bank draws;
  ``augment``: the seg module's photometric augmentation ``(images, generator) -> images`` (official:
  colour jitter + Gaussian blur of the mixed image, ``train_spasr_gtav.py:565-574``).

Stage ``stage`` (default the last) must be on the ``feature_stride`` grid (8 for DeepLabV2's layer4;
32 for a MiT last stage). After the optimiser step and the network EMA, call
:meth:`RegionalContrast.update_teacher` with the alpha that EMA used: ``teacher_head`` is the EMA of
``proj_head`` (the paper's momentum projection head; official: the EMA over all of the network's
parameters, alpha 0.99, ``train_spasr_gtav.py:115-125,729``). ``teacher_head`` has no gradient and is
left out of the optimiser; ``proj_head``'s name contains ``head`` for the 10x lr (official: its
``get_10x_lr_params`` means to, ``model/deeplabv2.py:223-236``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mic_uda.uda.contrastive import (
    FeatureQueue,
    info_nce,
    masked_mean,
    nearest_labels,
    probabilities_on_grid,
    random_subset,
)
from mic_uda.uda.ema import copy_weights, ema_alpha

ForwardFn = Callable[[Tensor], tuple[Tensor, Sequence[Tensor]]]
AugmentFn = Callable[[Tensor, torch.Generator], Tensor]

#: the official GTA script's start (``train_spasr_gtav.py:432``) as a share of its 250k iterations
OFFICIAL_START_SHARE = 300_000 / 250_000

Box = tuple[int, int, int, int]  # top, left, bottom, right (pixels; bottom/right exclusive)


def sample_box(height: int, width: int, generator: torch.Generator, grid: int = 8) -> Box:
    """A box on the ``grid``-px lattice: side ratio ``sqrt(u)``, ``u ~ Beta(1, 1)`` (= U(0, 1)), the same
    ratio for both sides, each side floored to the grid and at least one cell (official
    ``train_spasr_gtav.py:546-561``), its corner uniform over **every** lattice position that keeps it
    inside the image.

    Official differences: ``np.random.randint(w // 8 - cut_w // 8)`` excludes the last position (the box
    never touches the bottom/right border) and raises for a full-size box; the side computed from
    ``shape[2]`` (height) is applied to the width and vice versa (harmless for its square 512 crops).
    """
    if height < grid or width < grid:
        raise ValueError(f"sample_box: a {height}x{width} image is smaller than the {grid}-px grid")
    ratio = math.sqrt(float(torch.rand((), generator=generator, device=generator.device)))
    cut_h = max(grid, int(height * ratio) // grid * grid)
    cut_w = max(grid, int(width * ratio) // grid * grid)
    n_rows, n_cols = (height - cut_h) // grid, (width - cut_w) // grid
    top = grid * int(torch.randint(n_rows + 1, (), generator=generator, device=generator.device))
    left = grid * int(torch.randint(n_cols + 1, (), generator=generator, device=generator.device))
    return top, left, top + cut_h, left + cut_w


def paste_box(source: Tensor, target: Tensor, box: Box) -> Tensor:
    """``source`` with the ``box`` region (all images, last two dims) replaced by ``target``'s."""
    top, left, bottom, right = box
    out = source.clone()
    out[..., top:bottom, left:right] = target[..., top:bottom, left:right]
    return out


def rccr_weight(step: int, max_steps: int, weight: float = 0.01) -> float:
    """The official ramp ``weight * exp(-5 (1 - (i / T) ** 0.5))`` (``train_spasr_gtav.py:697``), from
    ``weight * e^-5`` (~6.7e-5 for 0.01) at step 0 to ``weight`` at ``T``; constant after ``T``."""
    frac = min(max(step / max_steps, 0.0), 1.0)
    return weight * math.exp(-5.0 * (1.0 - math.sqrt(frac)))


class RegionalContrast(nn.Module):
    """RCCR's region-wise contrastive loss with a momentum projection head and a memory bank (SPEC 6).

    ``proj_head``: 1x1 conv C->C, ReLU, 1x1 conv -> ``proj_dim`` (128), L2-normalised, no BN
    (``model/deeplabv2.py:123-133``; C = 2048 on DeepLabV2's layer4, given here as ``in_channels``),
    weights N(0, 0.01) as the official ResNet init (``deeplabv2.py:155-158``). Per step: a box of the
    target is pasted into the source (one box for the batch, as officially), the mixed image is
    augmented (and flipped with ``flip_p``; official config ``flip: false``); student embedding ``q``
    of the mixed image, teacher embedding ``k`` (``teacher_head`` on the teacher's features) of the
    clean target. Anchors: the cells inside the box whose teacher confidence is above ``confidence``
    (0.75); positive ``q . sg(k) / T`` at the same cell (T = 0.1); negatives: the bank of
    ``bank_per_iteration`` (4000) random student cells + as many teacher cells per iteration, over the
    current and ``bank_iterations - 1`` (2) previous iterations, detached, minus those of the anchor's
    teacher pseudo-class. Student cells are labelled with the mixed label (source label outside the
    box, teacher pseudo-label inside), teacher cells with the pseudo-label. Loss
    ``rccr_weight(step, max_steps, weight) * mean InfoNCE``.

    Official defects as flags:

    * ``official_untrained_head``: ``self.proj_head.parameters(())`` (``deeplabv2.py:231``) is
      ``parameters(recurse=False)`` of a module whose parameters all sit in a child, so the head never
      reaches the optimiser and stays at its random init (and its EMA equals it). Default: trained.
    * ``official_start_iter``: the GTA script starts the loss at 300k of 250k iterations
      (``train_spasr_gtav.py:432``; SYNTHIA's at 0, ``train_spasr_syn.py:434``), so the released GTA run
      is plain DACS; the flag starts it at 1.2 x ``max_steps`` (never). Default: ``start_step`` (0).
    * ``official_ignore_negatives``: source cells labelled ``ignore_index`` (255) enter the bank and,
      their label differing from every anchor's, are negatives for all of them (``train_spasr_gtav.py:
      634,659``). Default (ours): the bank is drawn from cells with a known class only.
    """

    def __init__(
        self,
        in_channels: int,
        max_steps: int,
        proj_dim: int = 128,
        stage: int = -1,
        feature_stride: int = 8,
        temperature: float = 0.1,
        confidence: float = 0.75,
        bank_per_iteration: int = 4000,
        bank_iterations: int = 3,
        weight: float = 0.01,
        ramp: bool = True,
        start_step: int = 0,
        flip_p: float = 0.0,
        ignore_index: int = 255,
        init_std: float | None = 0.01,
        official_untrained_head: bool = False,
        official_start_iter: bool = False,
        official_ignore_negatives: bool = False,
    ) -> None:
        super().__init__()
        if max_steps <= 0:
            raise ValueError(f"method.rccr.max_steps must be > 0 (the ramp's T), got {max_steps}")
        c = int(in_channels)
        self.max_steps, self.stage, self.feature_stride = int(max_steps), int(stage), int(feature_stride)
        self.temperature, self.confidence = float(temperature), float(confidence)
        self.bank_per_iteration, self.weight, self.ramp = int(bank_per_iteration), float(weight), bool(ramp)
        self.start = math.ceil(OFFICIAL_START_SHARE * max_steps) if official_start_iter else int(start_step)
        self.flip_p, self.ignore_index = float(flip_p), int(ignore_index)
        self.official_untrained_head = bool(official_untrained_head)
        self.official_ignore_negatives = bool(official_ignore_negatives)
        self.proj_head = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(inplace=True), nn.Conv2d(c, proj_dim, 1))
        if init_std is not None:
            for m in self.proj_head:
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0.0, init_std)
        self.teacher_head = copy.deepcopy(self.proj_head).requires_grad_(False)
        if self.official_untrained_head:
            self.proj_head.requires_grad_(False)
        self.queue = FeatureQueue(proj_dim, bank_iterations, 2 * self.bank_per_iteration)

    def active(self, step: int) -> bool:
        """Whether the term runs at ``step`` (the seg module may skip the call, and its passes, before)."""
        return step >= self.start and self.weight > 0

    def weight_at(self, step: int) -> float:
        return rccr_weight(step, self.max_steps, self.weight) if self.ramp else self.weight

    @torch.no_grad()
    def update_teacher(self, alpha: float, step: int | None = None) -> float:
        """``teacher_head <- a * teacher_head + (1 - a) * proj_head``; returns ``a``. ``a = alpha`` as
        given (the alpha the network's EMA just used), or, with ``step``, the EMA ramp
        ``min(1 - 1/(step+1), alpha)`` of :func:`mic_uda.uda.ema.ema_alpha`."""
        a = ema_alpha(step, alpha) if step is not None else float(alpha)
        t_params = list(self.teacher_head.parameters())
        s_params = [p.detach() for p in self.proj_head.parameters()]
        torch._foreach_lerp_(t_params, s_params, 1.0 - a)
        return a

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Make ``teacher_head`` an exact copy of ``proj_head`` (e.g. after loading student weights)."""
        copy_weights(self.teacher_head, self.proj_head)

    def embed(self, features: Tensor, teacher: bool = False) -> Tensor:
        head = self.teacher_head if teacher else self.proj_head
        return F.normalize(head(features), p=2, dim=1)

    def forward(
        self,
        source_images: Tensor,
        source_labels: Tensor,
        target_images: Tensor,
        teacher_logits: Tensor,
        teacher_stages: Sequence[Tensor],
        student_fn: ForwardFn,
        step: int,
        generator: torch.Generator,
        augment: AugmentFn | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, logs)``; before ``start`` a zero without graph (``loss.requires_grad`` is False)."""
        if not self.active(step):
            return source_images.new_zeros(()), {"active": source_images.new_zeros(())}
        _, _, height, width = source_images.shape
        s = self.feature_stride
        box = sample_box(height, width, generator, s)
        mixed = paste_box(source_images, target_images, box)
        if augment is not None:
            mixed = augment(mixed, generator)
        flip = float(torch.rand((), generator=generator, device=generator.device)) < self.flip_p
        if flip:
            mixed = mixed.flip(-1)
        _, student_stages = student_fn(mixed)
        s_feat = student_stages[self.stage]
        t_feat = teacher_stages[self.stage].detach()
        grid = (height // s, width // s)
        if height % s or width % s or tuple(s_feat.shape[-2:]) != grid or tuple(t_feat.shape[-2:]) != grid:
            raise ValueError(
                f"method.rccr: stage {self.stage} must be on the {s}-px grid of the {height}x{width} images "
                f"({grid}), got student {tuple(s_feat.shape[-2:])} / teacher {tuple(t_feat.shape[-2:])}; "
                "set method.rccr.feature_stride / stage"
            )
        q = self.embed(s_feat)
        if flip:
            q = q.flip(-1)
        with torch.no_grad():
            k = self.embed(t_feat, teacher=True)
            conf, pl = probabilities_on_grid(teacher_logits.detach(), grid).max(1)
        top, left, bottom, right = (v // s for v in box)
        mixed_label = nearest_labels(source_labels, grid).clone()
        mixed_label[:, top:bottom, left:right] = pl[:, top:bottom, left:right]

        # the bank: random student cells (mixed labels) + teacher cells (pseudo-labels), detached
        d = q.shape[1]
        flat_q, flat_k = q.detach().permute(0, 2, 3, 1).reshape(-1, d), k.permute(0, 2, 3, 1).reshape(-1, d)
        flat_ml, flat_pl = mixed_label.reshape(-1), pl.reshape(-1)
        known = torch.ones_like(flat_ml, dtype=torch.bool)
        if not self.official_ignore_negatives:
            known = flat_ml != self.ignore_index
        cand = torch.nonzero(known).flatten()
        pick_q = cand[random_subset(cand.numel(), self.bank_per_iteration, generator, cand.device)]
        pick_k = random_subset(flat_k.shape[0], self.bank_per_iteration, generator, flat_k.device)
        self.queue.push(
            torch.cat([flat_q[pick_q], flat_k[pick_k]]), torch.cat([flat_ml[pick_q], flat_pl[pick_k]])
        )
        bank, bank_labels = self.queue.contents()

        anchors = q[:, :, top:bottom, left:right].permute(0, 2, 3, 1).reshape(-1, d)
        keys = k[:, :, top:bottom, left:right].permute(0, 2, 3, 1).reshape(-1, d)
        a_label = pl[:, top:bottom, left:right].reshape(-1)
        a_conf = conf[:, top:bottom, left:right].reshape(-1)
        counted = a_conf > self.confidence
        per_anchor = info_nce(anchors, keys, bank.to(anchors), self.temperature, a_label, bank_labels)
        contrast = masked_mean(per_anchor, counted)
        w = self.weight_at(step)
        logs = {
            "active": q.new_ones(()),
            "contrast": contrast.detach(),
            "weight": q.new_tensor(w),
            "anchors": q.new_tensor(float(anchors.shape[0])),
            "counted": counted.float().mean(),
            "box_area": q.new_tensor((bottom - top) * (right - left) / (grid[0] * grid[1])),
            "bank": q.new_tensor(float(len(self.queue))),
        }
        return w * contrast, logs
