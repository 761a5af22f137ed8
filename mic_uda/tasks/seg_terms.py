"""The segmentation method terms and the one seam they are called through.

A term is a small ``nn.Module`` (its own parameters, buffers and hyper-parameters) that the
segmentation module builds from the method config and calls once per step with a :class:`SegStep`:

* ``stage = "source"`` terms (FD, PiPa's pixel contrast) add to the supervised loss: they read the
  supervised pass's :class:`~mic_uda.models.seg_base.FeatureView` s (``needs_views``) in
  ``step.source_pass``, and their loss is back-propagated together with it;
* ``stage = "target"`` terms (ClassMix, MIC, ...) run after the teacher's pseudo-labels, do their own
  student passes through ``step.network_loss`` (so the network answers for the loss: HRDA's
  multi-resolution loss serves every term) and are back-propagated one by one, as the official code
  does, so one graph is alive at a time.

A term never reaches into the network: it asks ``step.network_loss(..., with_views=True)`` for
the feature views of a pass. Its parameters are trained by the module's optimiser (names containing
"head" get the head learning rate); a term with a momentum copy updates it in :meth:`SegTerm.after_ema`.
A new method = one term (here or in its own module, registered in :data:`TERMS`) + one config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mic_uda.models.seg_base import SegNetwork, SegTrainOutput
from mic_uda.uda.feature_distance import ImageNetFeatureDistance
from mic_uda.uda.masking import apply_mask, block_mask
from mic_uda.uda.mixing import classmix_masks, mix


@dataclass
class SegStep:
    """Everything a term may use in one training step (built by the segmentation module)."""

    source: Mapping[str, Tensor]  # image (B, 3, H, W) in [0, 1], label (B, H, W)
    target: Mapping[str, Tensor]  # image; valid_mask when the data has pseudo-label margins
    student: SegNetwork
    teacher: SegNetwork | None
    generator: torch.Generator
    step: int  # the global step of this iteration (0-based)
    max_steps: int
    ignore_index: int
    augment: Callable[[Tensor, torch.Generator], Tensor]  # the method's strong photometric aug
    mask_fill: Tensor | float  # what masked pixels take (the network's normalisation mean)
    source_pass: SegTrainOutput | None = None  # the supervised pass (its views if a term asked)
    pseudo_label: Tensor | None = None  # (B, H, W) teacher argmax on the clean target
    pseudo_weight: Tensor | None = None  # (B, H, W) confidence weight x margins
    teacher_logits: Tensor | None = None  # (B, C, H, W) the teacher's clean-target prediction
    # the stage features of that same teacher pass, when a term sets needs_teacher_features
    teacher_stages: list[Tensor] | None = None
    logs: dict[str, Tensor] = field(default_factory=dict)

    def network_loss(
        self, images: Tensor, labels: Tensor, weight: Tensor | None = None, with_views: bool = False
    ) -> SegTrainOutput:
        """The student's own training loss for (images, labels, weight)."""
        return self.student.train_loss(
            images,
            labels,
            weight,
            ignore_index=self.ignore_index,
            generator=self.generator,
            with_views=with_views,
        )


class SegTerm(nn.Module):
    """Base of every segmentation term: ``forward(step) -> loss`` (logs go into ``step.logs``)."""

    #: "source" (added to the supervised loss) or "target" (own passes, after the pseudo-labels)
    stage: str = "target"
    #: source terms: the supervised pass must return its feature views
    needs_views: bool = False
    #: whether the term needs the EMA teacher's pseudo-labels
    needs_teacher: bool = True
    #: whether the pseudo-label pass must also return the teacher's stage features (step.teacher_stages)
    needs_teacher_features: bool = False

    def setup_fit(self, weights_file: str | None) -> None:
        """Called at the start of fitting with the backbone's ImageNet weights file (if any)."""

    def after_ema(self, alpha: float) -> None:
        """Called after each EMA update of the teacher with its alpha (momentum copies)."""

    def forward(self, step: SegStep) -> Tensor:
        raise NotImplementedError


class FeatureDistanceTerm(SegTerm):
    """ImageNet Feature Distance on the supervised pass's ``context`` view (HRDA: its LR pass)."""

    stage = "source"
    needs_views = True
    needs_teacher = False

    def __init__(self, cfg: Any, num_classes: int, ignore_index: int, network: nn.Module) -> None:
        super().__init__()
        self.fd = ImageNetFeatureDistance(
            cfg.weight, cfg.classes, cfg.scale_min_ratio, num_classes, ignore_index
        )
        self.fd.build_reference(network, None)  # the ImageNet weights are loaded in setup_fit

    def setup_fit(self, weights_file: str | None) -> None:
        if not weights_file:
            raise ValueError(
                "method.fd compares with the ImageNet encoder: it needs backbone.weights (a local file)"
            )
        self.fd.load_reference(weights_file)  # resuming restores it too

    def forward(self, step: SegStep) -> Tensor:
        assert step.source_pass is not None
        context = step.source_pass.views["context"]
        loss, mask = self.fd(context.image, context.labels, context.stages[-1])
        step.logs["train/fd_cells"] = mask.float().mean() if mask is not None else torch.tensor(1.0)
        step.logs["train/fd_memory_mb"] = torch.tensor(self.fd.memory_bytes() / 2**20)
        return loss


class ClassMixTerm(SegTerm):
    """DACS: ClassMix source classes onto the target, strong aug, weighted CE to the mixed label."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.weight, self.classes, self.include_ignore = (
            float(cfg.weight),
            cfg.classes,
            bool(cfg.include_ignore),
        )

    def forward(self, step: SegStep) -> Tensor:
        src, x_t, g = step.source, step.target["image"], step.generator
        assert step.pseudo_label is not None and step.pseudo_weight is not None
        mask = classmix_masks(src["label"], g, step.ignore_index, self.classes, self.include_ignore).to(x_t)
        x_m = step.augment(mix(mask, src["image"], x_t), g)
        y_m = mix(mask, src["label"], step.pseudo_label)
        w_m = mix(mask, torch.ones_like(step.pseudo_weight), step.pseudo_weight)
        return self.weight * step.network_loss(x_m, y_m, w_m).loss


class MaskedConsistencyTerm(SegTerm):
    """MIC: a fresh strong aug of the images (``images``: the target with its clean-image pseudo-label
    and weight by default), block-masked, against those labels."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.weight, self.block_size, self.ratio = float(cfg.weight), int(cfg.block_size), float(cfg.ratio)
        self.images, self.augment = cfg.images, bool(cfg.augment)

    def forward(self, step: SegStep) -> Tensor:
        images, labels, weights = self.inputs(
            step.source, step.target["image"], step.pseudo_label, step.pseudo_weight
        )
        b, _, h, w = images.shape
        g = step.generator
        keep = block_mask(b, h, w, self.block_size, self.ratio, g, device=images.device).to(images.dtype)
        if self.augment:
            images = step.augment(images, g)
        return self.weight * step.network_loss(apply_mask(images, keep, step.mask_fill), labels, weights).loss

    def inputs(
        self, src: Mapping[str, Tensor], x_t: Tensor, pl: Tensor | None, weight: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The masked batch of the official ``mask_mode``s: target, source, or the first half of the
        batch from the source (ground truth, weight 1) and the rest from the target."""
        if self.images == "source":
            return src["image"], src["label"], None
        assert pl is not None and weight is not None
        if self.images == "target":
            return x_t, pl, weight
        k = x_t.shape[0] // 2  # source images; the other n target images
        n = x_t.shape[0] - k
        return (
            torch.cat([src["image"][:k], x_t[:n]]),
            torch.cat([src["label"][:k], pl[:n]]),
            torch.cat([torch.ones_like(weight[:k]), weight[:n]]),
        )


def _fd(cfg: Any, num_classes: int, ignore_index: int, network: nn.Module) -> SegTerm:
    return FeatureDistanceTerm(cfg, num_classes, ignore_index, network)


#: method-config key -> term factory (cfg, num_classes, ignore_index, student) -> a term, or several
#: terms by name (a method with a source and a target part); the order is the order of the calls in
#: a step (ClassMix before MIC, as the official code)
TERMS: dict[str, Callable[[Any, int, int, nn.Module], SegTerm | dict[str, SegTerm]]] = {
    "fd": _fd,
    "mix": lambda cfg, *_: ClassMixTerm(cfg),
    "mic": lambda cfg, *_: MaskedConsistencyTerm(cfg),
}


def build_seg_terms(method: Any, num_classes: int, ignore_index: int, student: nn.Module) -> nn.ModuleDict:
    """The terms the method config switches on, in :data:`TERMS` order."""
    terms: dict[str, SegTerm] = {}
    for name, factory in TERMS.items():
        if getattr(method, name, None) is None:
            continue
        built = factory(getattr(method, name), num_classes, ignore_index, student)
        terms.update(built if isinstance(built, dict) else {name: built})
    return nn.ModuleDict(terms)
