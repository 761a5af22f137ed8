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

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mic_uda.models.seg_base import SegNetwork, SegTrainOutput
from mic_uda.uda.bn import check_choice
from mic_uda.uda.contrastive import nearest_labels
from mic_uda.uda.feature_distance import ImageNetFeatureDistance
from mic_uda.uda.ir2f import IR2F, mixture_nll, posterior_weight
from mic_uda.uda.masking import apply_mask, block_mask
from mic_uda.uda.mixing import CLASSMIX_CLASSES, classmix_masks, mix
from mic_uda.uda.pipa import PatchContrast, PixelContrast
from mic_uda.uda.rccr import OFFICIAL_START_SHARE, RegionalContrast


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


def classmix_batch(step: SegStep, classes: str, include_ignore: bool) -> tuple[Tensor, Tensor, Tensor]:
    """DACS's mixed batch: the ClassMix mask (source classes onto the target), the strongly augmented
    mixed image and the mixed label (source ground truth / target pseudo-label); shared by every term
    that trains on the mixed image (ClassMix, IR2F)."""
    src, x_t, g = step.source, step.target["image"], step.generator
    assert step.pseudo_label is not None
    mask = classmix_masks(src["label"], g, step.ignore_index, classes, include_ignore).to(x_t)
    x_m = step.augment(mix(mask, src["image"], x_t), g)
    return mask, x_m, mix(mask, src["label"], step.pseudo_label)


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
        assert step.pseudo_weight is not None
        mask, x_m, y_m = classmix_batch(step, self.classes, self.include_ignore)
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


# ------------------------------------------------------------------ PiPa, RCCR, IR2F (SPEC 5-7)
# Adapters of the maths modules of mic_uda.uda.{pipa,rccr,ir2f}: they fill what the network and the
# run know (stage channels, classes, ignore label, max_steps) and pass each step what the modules'
# docstrings ask for. Features come only through the network's seam: the supervised pass's views and
# ``forward_with_features`` (DAFormerNet / DeepLabV2Net: one pass; HRDANet: its LR-context pass).


def term_arguments(cls: type, cfg: Mapping[str, Any] | None, key: str, filled: Mapping[str, Any]) -> dict:
    """``cls``'s constructor arguments from a method block ``method.<key>``: an unknown name is a
    one-line error naming it; ``filled`` (from the network / the run) is used where the block has
    no value (absent or null)."""
    params = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    given = dict(cfg or {})
    for name in given:
        if name not in params:
            raise ValueError(f"method.{key}.{name} is not an argument of {cls.__name__} (allowed: {params})")
    kwargs = {k: v for k, v in filled.items() if k in params}
    kwargs.update({k: v for k, v in given.items() if v is not None or k not in filled})
    return kwargs


def stage_channels(network: nn.Module) -> tuple[int, ...]:
    """The channels of the network's encoder stages, finest first (``feature_network.feature_channels``)."""
    channels = getattr(getattr(network, "feature_network", network), "feature_channels", None)
    if channels is None:
        raise ValueError(
            f"{type(network).__name__} declares no feature_network.feature_channels: PiPa / RCCR / IR2F need "
            "a network with stage features (DAFormerNet, DeepLabV2Net, HRDANet)"
        )
    return tuple(int(c) for c in channels)


def run_max_steps(step: SegStep, fixed: int | None, key: str) -> int:
    """``method.<key>.max_steps`` if set, else the run's ``trainer.max_steps``."""
    n = int(fixed or step.max_steps or 0)
    if n <= 0:
        raise ValueError(f"method.{key}.max_steps: the run has no trainer.max_steps > 0; set one of them")
    return n


def log_term(step: SegStep, prefix: str, logs: Mapping[str, Any]) -> None:
    for k, v in logs.items():
        step.logs[f"train/{prefix}_{k}"] = (
            v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
        )


class PixelContrastTerm(SegTerm):
    """PiPa's pixel contrast (:class:`~mic_uda.uda.pipa.PixelContrast`) on the supervised pass's
    ``detail`` view: the stages of the image the head saw and the labels of that same field of view
    (HRDA: the detail crop and its cropped label, SPEC 5's fix of the official uncropped label)."""

    stage = "source"
    needs_views = True
    needs_teacher = False

    def __init__(
        self, cfg: Mapping[str, Any], num_classes: int, ignore_index: int, network: nn.Module
    ) -> None:
        super().__init__()
        filled = {
            "stage_channels": stage_channels(network),
            "num_classes": num_classes,
            "ignore_index": ignore_index,
        }
        self.pixel = PixelContrast(**term_arguments(PixelContrast, cfg, "pipa.pixel", filled))

    def forward(self, step: SegStep) -> Tensor:
        assert step.source_pass is not None
        view = step.source_pass.views["detail"]
        loss, logs = self.pixel(view.stages, view.labels, step.generator)
        log_term(step, "pipa_pixel", logs)
        return loss


class PatchContrastTerm(SegTerm):
    """PiPa's patch contrast (:class:`~mic_uda.uda.pipa.PatchContrast`) on the UDA target batch, with
    the student's and the EMA teacher's ``forward_with_features``. Its start: ``start_fraction`` of
    the run's max_steps (the official 10k of 60k scaled to any schedule), else ``start_step``; before
    it the loss is a zero without graph (not back-propagated)."""

    def __init__(
        self, cfg: Mapping[str, Any], num_classes: int, ignore_index: int, network: nn.Module
    ) -> None:
        super().__init__()
        cfg = dict(cfg)
        self.fixed_max_steps = cfg.get("max_steps")
        self.start_fraction = cfg.get("start_fraction")
        filled = {
            "stage_channels": stage_channels(network),
            "num_classes": num_classes,
            "max_steps": self.fixed_max_steps or 1,  # the run's, set at each step (below)
        }
        self.patch = PatchContrast(**term_arguments(PatchContrast, cfg, "pipa.patch", filled))

    def forward(self, step: SegStep) -> Tensor:
        if self.start_fraction is not None:
            self.patch.start = round(
                self.start_fraction * run_max_steps(step, self.fixed_max_steps, "pipa.patch")
            )
        assert step.teacher is not None
        loss, logs = self.patch(
            step.target["image"],
            step.student.forward_with_features,
            step.teacher.forward_with_features,
            step.step,
            step.generator,
            step.augment,
        )
        log_term(step, "pipa_patch", logs)
        return loss


def _pipa(
    cfg: Mapping[str, Any], num_classes: int, ignore_index: int, network: nn.Module
) -> dict[str, SegTerm]:
    cfg = dict(cfg)
    unknown = set(cfg) - {"pixel", "patch"}
    if unknown:
        raise ValueError(f"method.pipa.{sorted(unknown)[0]} is not a PiPa term (allowed: ['pixel', 'patch'])")
    terms: dict[str, SegTerm] = {}
    if cfg.get("pixel") is not None:
        terms["pipa_pixel"] = PixelContrastTerm(cfg["pixel"], num_classes, ignore_index, network)
    if cfg.get("patch") is not None:
        terms["pipa_patch"] = PatchContrastTerm(cfg["patch"], num_classes, ignore_index, network)
    return terms


class RegionalContrastTerm(SegTerm):
    """RCCR (:class:`~mic_uda.uda.rccr.RegionalContrast`): the teacher's logits and stages of the clean
    target come from the pseudo-label pass (``needs_teacher_features``), the student's from
    ``forward_with_features`` of the mixed image; the momentum head follows the network's EMA with the
    same alpha (:meth:`after_ema`). ``feature_stride: null``: the stride of stage ``stage``, read from
    the teacher's features each step (8 for DeepLabV2's layer4, 32 for MiT's last stage; HRDA's
    context pass doubles it). ``max_steps: null``: the run's (the ramp's T, the official start)."""

    needs_teacher_features = True

    def __init__(
        self, cfg: Mapping[str, Any], num_classes: int, ignore_index: int, network: nn.Module
    ) -> None:
        super().__init__()
        cfg = dict(cfg)
        self.fixed_max_steps = cfg.get("max_steps")
        self.auto_stride = cfg.get("feature_stride") is None
        self.official_start_iter = bool(cfg.get("official_start_iter", False))
        channels = stage_channels(network)
        stage = int(cfg.get("stage", -1))
        if not -len(channels) <= stage < len(channels):
            raise ValueError(f"method.rccr.stage={stage}: the network has {len(channels)} stages")
        filled = {
            "in_channels": channels[stage],
            "ignore_index": ignore_index,
            "max_steps": self.fixed_max_steps or 1,  # the run's, set at each step (below)
            "feature_stride": 8,  # replaced by the features' stride when null
        }
        self.rc = RegionalContrast(**term_arguments(RegionalContrast, cfg, "rccr", filled))

    def after_ema(self, alpha: float) -> None:
        self.rc.update_teacher(alpha)

    def forward(self, step: SegStep) -> Tensor:
        assert step.teacher_stages is not None and step.teacher_logits is not None
        total = run_max_steps(step, self.fixed_max_steps, "rccr")
        self.rc.max_steps = total
        if self.official_start_iter:
            self.rc.start = math.ceil(OFFICIAL_START_SHARE * total)
        if self.auto_stride:
            self.rc.feature_stride = (
                step.target["image"].shape[-2] // step.teacher_stages[self.rc.stage].shape[-2]
            )
        loss, logs = self.rc(
            step.source["image"],
            step.source["label"],
            step.target["image"],
            step.teacher_logits,
            step.teacher_stages,
            step.student.forward_with_features,
            step.step,
            step.generator,
            step.augment,
        )
        log_term(step, "rccr", logs)
        return loss


class IR2FTerm(SegTerm):
    """IR2F, **our interpretation** (:class:`~mic_uda.uda.ir2f.IR2F`): a target term that *replaces*
    DACS's ClassMix term (its method configs set ``mix: null``) by its own rectified mixture term.

    Each step: ``r`` (B, H, W) of the clean target from the teacher's stage features of the
    pseudo-label pass; ``r`` supervised on the source (BCE against "the ``supervise_with`` network's
    prediction is right"); a ClassMix image (``mix_classes`` / ``mix_include_ignore`` as
    ``method.mix``'s ``classes`` / ``include_ignore``) whose per-pixel weight is ``r`` mixed as the
    label (pasted source pixels 1) in place of DACS's per-image confidence scalar (kept as a factor with
    ``keep_confidence_weight``). ``mixture: rmm``: the weight is the posterior
    :func:`~mic_uda.uda.ir2f.posterior_weight` of a no-grad student pass of the mixed image, so the
    network's own ``train_loss`` (HRDA's multi-resolution loss too) has the gradient of
    ``-log(r p(y) + (1 - r) / C)`` w.r.t. the logits (exact for a single-scale network up to dropout);
    ``mixture: weight``: ``r`` itself. Later target terms (MIC) get ``r`` as ``step.pseudo_weight``:
    the masked image's pseudo-label is rectified by the same map.
    """

    needs_teacher_features = True

    def __init__(
        self, cfg: Mapping[str, Any], num_classes: int, ignore_index: int, network: nn.Module
    ) -> None:
        super().__init__()
        cfg = dict(cfg)
        self.classes = cfg.pop("mix_classes", "per_image")
        self.include_ignore = bool(cfg.pop("mix_include_ignore", False))
        check_choice("method.ir2f.mix_classes", self.classes, CLASSMIX_CLASSES)
        filled = {
            "stage_channels": stage_channels(network),
            "num_classes": num_classes,
            "ignore_index": ignore_index,
        }
        self.ir2f = IR2F(**term_arguments(IR2F, cfg, "ir2f", filled))

    def forward(self, step: SegStep) -> Tensor:
        src, g, f = step.source, step.generator, self.ir2f
        assert step.teacher is not None and step.teacher_stages is not None
        assert step.pseudo_label is not None and step.pseudo_weight is not None
        size = (step.pseudo_label.shape[-2], step.pseudo_label.shape[-1])
        r = f.rectification(step.teacher_stages, size)
        conf = step.pseudo_weight
        rectified = (r * conf if f.keep_confidence_weight else r).detach()
        step.pseudo_weight = rectified  # MIC after this term: the same rectification
        step.logs["train/ir2f_r_target"] = r.detach().mean()

        # r learns where correctness is known: the source
        net = step.teacher if f.supervise_with == "teacher" else step.student
        with torch.set_grad_enabled(f.supervise_with == "student" and not f.detach_features):
            s_logits, s_stages = net.forward_with_features(src["image"])
        preds = nearest_labels(s_logits.argmax(1), tuple(src["label"].shape[-2:]))
        sup, logs = f.supervision_loss(s_stages, preds.detach(), src["label"], g)
        log_term(step, "ir2f", logs)

        # the rectified mixture on the ClassMix image
        mask, x_m, y_m = classmix_batch(step, self.classes, self.include_ignore)
        r_m = mix(mask, torch.ones_like(r), r.detach())
        weight = r_m
        if f.mixture == "rmm":
            with torch.no_grad():
                logits = step.student(x_m)
                if logits.shape[-2:] != y_m.shape[-2:]:
                    logits = F.interpolate(logits, size=y_m.shape[-2:], mode="bilinear", align_corners=False)
                prob = logits.float().softmax(1)
                p_y = prob.gather(1, y_m.clamp(0, f.num_classes - 1)[:, None].long())[:, 0]
                weight = posterior_weight(r_m, p_y, f.num_classes)
                step.logs["train/ir2f_rmm_nll"] = mixture_nll(
                    logits, y_m.long(), r_m, step.ignore_index
                ).mean()
        if f.keep_confidence_weight:
            weight = weight * mix(mask, torch.ones_like(conf), conf)
        step.logs["train/ir2f_weight"] = weight.mean()
        return f.weight * step.network_loss(x_m, y_m, weight.detach()).loss + sup


def _fd(cfg: Any, num_classes: int, ignore_index: int, network: nn.Module) -> SegTerm:
    return FeatureDistanceTerm(cfg, num_classes, ignore_index, network)


#: method-config key -> term factory (cfg, num_classes, ignore_index, student) -> a term, or several
#: terms by name (a method with a source and a target part); the order is the order of the calls in
#: a step (ClassMix before MIC, as the official code)
TERMS: dict[str, Callable[[Any, int, int, nn.Module], SegTerm | dict[str, SegTerm]]] = {
    "fd": _fd,
    "mix": lambda cfg, *_: ClassMixTerm(cfg),
    "ir2f": IR2FTerm,  # before MIC: it rectifies the pseudo-weight MIC uses
    "mic": lambda cfg, *_: MaskedConsistencyTerm(cfg),
    "pipa": _pipa,  # pipa_pixel (source), pipa_patch (target, after the mixture terms as officially)
    "rccr": RegionalContrastTerm,
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
