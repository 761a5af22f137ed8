"""Contrastive losses and a fixed-size FIFO feature queue, shared by PiPa (SPEC 5) and RCCR (SPEC 6).

Three pieces, each a pure function or a buffer-only module:

* :func:`info_nce`: one positive per anchor against a set of negatives, the negatives of the anchor's
  own (pseudo-)class masked out. Both official codes write it the same way (PiPa ``mmseg/models/uda/
  dacs.py:576-616``, RCCR ``train_spasr_gtav.py:653-694``): ``-log(exp(a.p/T) / (exp(a.p/T) +
  sum_{n: label(n) != label(a)} exp(a.n/T)))``, with an ``eps = 1e-8`` inside the log and chunked
  gradient checkpointing for memory. Here it is a logsumexp (no eps; exact to ~1e-8 of theirs).
* :func:`pixel_contrast_loss`: PiPa's pixel contrast over sampled anchors (``mmseg/models/decode_heads/
  hrda_head.py:103-140``, ContrastSeg's form): for every anchor ``i`` and every other anchor ``j`` of
  its class, ``log(exp(s_ij) / (exp(s_ij) + sum_{k of another class} exp(s_ik)))``, averaged over the
  ``j``, times ``-(T / T_base)`` with ``T = 0.1``, ``T_base = 0.07``. This is *not* Khosla et al.'s
  SupCon denominator (the sum over every other anchor); ``denominator="supcon"`` gives that one.
* :class:`FeatureQueue`: the memory bank of both methods. The official codes keep a Python list of the
  last ``step_save + 1 = 3`` iterations' samples (PiPa ``dacs.py:566-574``, RCCR ``train_spasr_gtav.py
  :639-650``), which is neither in the checkpoint nor on a fixed device; here it is ``slots`` fixed
  slots of registered buffers with a pointer, so it follows ``.to()``, is saved in ``state_dict`` and a
  resumed run continues with the very same negatives.

Also the two resamplings both methods need to bring labels and teacher predictions onto a feature grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PIXEL_DENOMINATORS = ("official", "supcon")
#: what a masked-out logit is set to: finite (not -inf), so a row with every entry masked has a finite
#: logsumexp and no NaN gradient, yet exp() of it is exactly 0 next to any real logit
MASKED_LOGIT = -1e30


def _at_least_float32(x: Tensor) -> Tensor:
    """bf16/fp16 -> float32 (the losses are computed in at least single precision); float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def info_nce(
    anchors: Tensor,
    positives: Tensor,
    negatives: Tensor,
    temperature: float,
    anchor_labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
) -> Tensor:
    """Per-anchor InfoNCE ``(N,)``: ``logsumexp([a.p, a.n_1, ...] / T) - a.p / T``.

    ``anchors`` / ``positives``: ``(N, D)`` row-paired; ``negatives``: ``(M, D)``. With labels, the
    negatives whose label equals the anchor's are left out ("label-aware negative masking"; an anchor
    with no negative left gets loss 0, as ``log(exp(pos) / exp(pos))``). The caller decides what is
    detached (both official codes detach the positive key and the whole bank).
    """
    if anchors.shape != positives.shape:
        raise ValueError(f"info_nce: anchors {tuple(anchors.shape)} vs positives {tuple(positives.shape)}")
    a = _at_least_float32(anchors)
    pos = (a * positives.to(a.dtype)).sum(-1, keepdim=True) / temperature  # (N, 1)
    neg = a @ negatives.to(a.dtype).t() / temperature  # (N, M)
    if (anchor_labels is None) != (negative_labels is None):
        raise ValueError("info_nce: give both anchor_labels and negative_labels, or neither")
    if anchor_labels is not None and negative_labels is not None:
        same = anchor_labels.view(-1, 1) == negative_labels.view(1, -1)
        neg = neg.masked_fill(same, MASKED_LOGIT)
    return torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1) - pos.squeeze(1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; an exact, graph-connected 0 when nothing is masked in (the
    official ``(loss * mask).sum() / (mask.sum() + 1e-12)``, without the 1e-12)."""
    mask = mask.bool()
    kept = torch.where(mask, values, values.new_zeros(()))
    return kept.sum() / mask.sum().clamp_min(1).to(values.dtype)


def pixel_contrast_loss(
    features: Tensor,
    labels: Tensor,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
    denominator: str = "official",
) -> Tensor:
    """PiPa's supervised pixel contrast of sampled anchors.

    ``features``: ``(A, V, D)``, ``A`` anchor groups (one image x one class each) of ``V`` views,
    L2-normalised; ``labels``: ``(A,)`` the class of each group. Every one of the ``A * V`` embeddings
    is an anchor; its positives are the other embeddings of its class (in any image: groups of the same
    class share labels), its negatives those of the other classes.

    ``denominator``: ``"official"`` (``hrda_head.py:128-133``): per positive ``j``,
    ``log(exp(s_ij) / (exp(s_ij) + sum_neg exp(s_ik)))``; ``"supcon"``: ``log(exp(s_ij) /
    sum_{k != i} exp(s_ik))``. Loss ``-(T / T_base) * mean_i mean_j log_prob_ij``. Anchors without any
    positive are left out of the mean (the official code returns NaN for them: ``mask.sum(1) = 0``);
    no anchor with a positive -> an exact, graph-connected 0.
    """
    if denominator not in PIXEL_DENOMINATORS:
        raise ValueError(
            f"pixel_contrast_loss: denominator={denominator!r} is not one of {PIXEL_DENOMINATORS}"
        )
    a, v, _ = features.shape
    x = torch.cat(
        torch.unbind(_at_least_float32(features), dim=1), dim=0
    )  # (V * A, D), view-major as official
    y = labels.reshape(-1).repeat(v)
    sim = x @ x.t() / temperature
    same = y.view(-1, 1) == y.view(1, -1)
    eye = torch.eye(a * v, dtype=torch.bool, device=x.device)
    pos_mask, neg_mask = same & ~eye, ~same
    if denominator == "official":
        log_neg = torch.logsumexp(sim.masked_fill(~neg_mask, MASKED_LOGIT), dim=1, keepdim=True)
        log_prob = sim - torch.logaddexp(sim, log_neg)
    else:
        log_prob = sim - torch.logsumexp(sim.masked_fill(eye, MASKED_LOGIT), dim=1, keepdim=True)
    n_pos = pos_mask.sum(1)
    mean_log_prob_pos = torch.where(pos_mask, log_prob, sim.new_zeros(())).sum(1) / n_pos.clamp_min(1)
    per_anchor = -(temperature / base_temperature) * mean_log_prob_pos
    return masked_mean(per_anchor, n_pos > 0)


class FeatureQueue(nn.Module):
    """A FIFO of the last ``slots`` pushes of up to ``slot_size`` ``dim``-d features with integer labels.

    Everything is a persistent buffer (features, labels, a validity mask and the write pointer), so the
    queue is saved in checkpoints, restored exactly, and lives on the module's device. Each
    :meth:`push` overwrites the oldest slot: with ``slots = 3`` the queue holds the current and the 2
    previous iterations, as both official banks do (``step_save = 2``). Pushed features are detached.
    """

    def __init__(self, dim: int, slots: int, slot_size: int) -> None:
        super().__init__()
        if dim <= 0 or slots <= 0 or slot_size <= 0:
            raise ValueError(
                f"FeatureQueue: dim, slots, slot_size must be > 0, got {dim}, {slots}, {slot_size}"
            )
        self.dim, self.slots, self.slot_size = int(dim), int(slots), int(slot_size)
        self.register_buffer("features", torch.zeros(slots, slot_size, dim))
        self.register_buffer("labels", torch.zeros(slots, slot_size, dtype=torch.long))
        self.register_buffer("valid", torch.zeros(slots, slot_size, dtype=torch.bool))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, features: Tensor, labels: Tensor) -> None:
        """Write ``(n, dim)`` features and their ``(n,)`` labels (``n <= slot_size``) into the oldest slot."""
        n = features.shape[0]
        if features.dim() != 2 or features.shape[1] != self.dim or labels.shape != (n,):
            raise ValueError(
                f"FeatureQueue.push: expected ({n}, {self.dim}) features and ({n},) labels, got "
                f"{tuple(features.shape)} and {tuple(labels.shape)}"
            )
        if n > self.slot_size:
            raise ValueError(f"FeatureQueue.push: {n} entries do not fit a slot of {self.slot_size}")
        i = int(self.ptr)
        self.features[i, :n] = features.detach().to(self.features)
        self.features[i, n:] = 0
        self.labels[i, :n] = labels.to(self.labels)
        self.labels[i, n:] = 0
        self.valid[i] = False
        self.valid[i, :n] = True
        self.ptr.fill_((i + 1) % self.slots)

    def contents(self) -> tuple[Tensor, Tensor]:
        """The valid entries ``(M, dim)``, ``(M,)``, oldest slot first (detached buffers)."""
        order = [(int(self.ptr) + k) % self.slots for k in range(self.slots)]
        valid = self.valid[order]
        return self.features[order][valid], self.labels[order][valid]

    def __len__(self) -> int:
        return int(self.valid.sum())

    def extra_repr(self) -> str:
        return f"dim={self.dim}, slots={self.slots}, slot_size={self.slot_size}"


def nearest_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, H, W)`` integer labels -> ``(B, h, w)`` by PyTorch ``nearest`` (the top-left pixel of each
    cell for an integer factor), as both official codes downsample labels (PiPa ``hrda_head.py:143-146``,
    RCCR ``train_spasr_gtav.py:594-596``)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def probabilities_on_grid(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Class probabilities ``(B, K, h, w)`` of ``logits`` ``(B, K, H, W)`` on an ``h x w`` grid: the
    softmax averaged over each cell when ``H, W`` are integer multiples of ``h, w`` (the cell's mean
    prediction), else bilinearly resampled (align_corners False). Computed in float32."""
    probs = torch.softmax(logits.float(), dim=1)
    (big_h, big_w), (h, w) = probs.shape[-2:], size
    if (big_h, big_w) == (h, w):
        return probs
    if big_h % h == 0 and big_w % w == 0:
        return F.avg_pool2d(probs, kernel_size=(big_h // h, big_w // w))
    return F.interpolate(probs, size=size, mode="bilinear", align_corners=False)


def random_subset(n: int, k: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
    """``min(k, n)`` distinct indices of ``range(n)`` in random order, drawn on the generator's device
    (so CPU and GPU runs draw the same) and moved to ``device``; the official ``np.random.choice(...,
    replace=False)`` crashes instead when ``k > n``."""
    return torch.randperm(n, generator=generator, device=generator.device)[: min(k, n)].to(device)
