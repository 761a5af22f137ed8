"""The method axis as a validated structured config: which loss terms run and with what settings.

A method YAML (``conf/method/*.yaml``) is merged onto :class:`MethodConfig`, so a typo or a wrong
type fails at start-up naming the key. Methods switch terms on and off; they never copy a module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mic_uda.uda.augment import DRAW_CHOICES, SEMANTICS_CHOICES
from mic_uda.uda.mixing import CLASSMIX_CLASSES


@dataclass
class TeacherConfig:
    alpha: float = 0.999
    bn: str = "batch"  # "batch" (official) or "running"; see mic_uda.uda.bn


@dataclass
class PseudoLabelConfig:
    threshold: float = 0.968
    # "fraction": the share of confident pixels (> threshold) per image/batch (DACS/MIC seg);
    # "probability": each sample weighted by the teacher's own confidence (MIC cls)
    weight_type: str = "fraction"
    weight_scope: str = "image"  # "image" (papers) or "batch" (official code); for "fraction"
    ignore_top: int = 0
    ignore_bottom: int = 0


@dataclass
class AugmentConfig:
    color_jitter_strength: float = 0.2
    color_jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    # when the apply/skip coin of jitter and blur is drawn: "image" (each image, each step: the
    # intended behaviour), "batch" (once per step for the whole batch: official DACS/MIC seg), "run"
    # (once per run from the seed: the official MIC cls/det code draws it in Masking.__init__, a bug)
    draw: str = "image"
    # what the jitter factors do: "torchvision" ops or "kornia05" (the official code's kornia 0.5 maths:
    # additive brightness, multiplicative contrast, saturation on HSV S); see mic_uda.uda.augment
    semantics: str = "torchvision"


@dataclass
class MixConfig:
    weight: float = 1.0
    # which classes ClassMix draws half of: "per_image" (present in the image; DACS's description) or
    # "batch_union" (present in the batch, the official get_class_masks); include_ignore: 255 counts
    classes: str = "per_image"
    include_ignore: bool = False


@dataclass
class MaskConfig:
    block_size: int = 32
    ratio: float = 0.7
    weight: float = 1.0
    # seg: which images are masked (official mask_mode): "target" (the target batch with its
    # pseudo-labels: separatetrg[aug], GTA/SYNTHIA -> Cityscapes), "source" (the source batch with its
    # labels: separatesrc[aug]) or "one_each" (the first half of the batch from the source with its
    # labels and weight 1, the rest from the target: separate[aug], official for Cityscapes -> ACDC /
    # Dark Zurich); augment: the strong photometric augmentation before masking (the "aug" suffix)
    images: str = "target"
    augment: bool = True
    # cls only. False (default, the paper): the update step's masked CE is weighted by the teacher's
    # probability. True: the official SDAT+MIC code, which weights it only in SAM's ascent pass and uses
    # the unweighted CE in the update (MIC cls/examples/cdan_mcc_sdat_masking.py:245-249 vs :264-265).
    official_unweighted_update: bool = False
    # det only. "none": the masked RPN objectness and ROI classification losses unweighted. "prob": the
    # official PSEUDO_LABEL_WEIGHT 'prob' (objectness BCE per anchor x sigmoid(objectness), ROI CE per
    # ROI x its detached max softmax; MIC det/.../rpn/loss.py:140-146, roi_box_head/loss.py:205-209).
    confidence_weight: str = "none"


@dataclass
class FdConfig:
    """ImageNet Feature Distance (seg, DAFormer): source thing-class cells of the last encoder stage
    kept close to the frozen ImageNet encoder's (mic_uda.uda.feature_distance)."""

    weight: float = 0.005
    # train ids of the thing classes (a dataset sets them: data.fd_classes; Cityscapes 6, 7, 11-18);
    # null = every cell
    classes: list[int] | None = None
    scale_min_ratio: float = 0.75


@dataclass
class CdanConfig:
    """CDAN: a domain discriminator on features x predictions behind gradient reversal (SDAT)."""

    weight: float = 1.0
    entropy_conditioning: bool = False  # plain CDAN as the official SDAT/MIC runs; True = CDAN+E
    hidden_dim: int = 1024
    randomized_dim: int | None = None  # random multilinear map of this size (None = outer product)
    grl_max_iters: int = 1000  # warm-start of the reversal coefficient 0 -> 1 (tllib default)


@dataclass
class MccConfig:
    """Minimum Class Confusion on the target predictions."""

    weight: float = 1.0
    temperature: float = 2.0  # the official code's default (its ViT runs); its ResNet-101 runs use 3.0


@dataclass
class SamConfig:
    """Sharpness-aware minimisation of the task (source) loss: perturb by rho * g / ||g||."""

    rho: float = 0.02


@dataclass
class SadaConfig:
    """Scale-aware image + instance domain alignment for Faster R-CNN (det: SADA; mic_uda.uda.sada).
    Defaults: the official MIC det config e2e_da_faster_rcnn_R_50_FPN_masking_cs.yaml:25-28."""

    # loss weights of the image, instance and consistency terms (official: the three added unweighted)
    image_weight: float = 1.0
    instance_weight: float = 1.0
    consistency_weight: float = 1.0
    # gradient-reversal coefficients on the features (DA_IMG_GRL_WEIGHT, DA_INS_GRL_WEIGHT)
    image_grl: float = 0.025
    instance_grl: float = 0.1
    # COS_WEIGHT: the consistency loss reaches the features through non-reversed scalers
    # +consistency_grl * image_grl and +consistency_grl * instance_grl (da_heads.py:217-218)
    consistency_grl: float = 0.1
    # "per_level": one instance discriminator per ROI pooling level (SADA's design); "shared": one for
    # all ROIs; "official_first_level": the official code's early return (da_heads.py:191), only
    # level-0 ROIs get logits, the others logit 0 (a bug, reproduced only on request)
    instance_heads: str = "per_level"
    # 0: constant reversal coefficients (SADA). T > 0: scaled by the warm start 2 / (1 + exp(-t / T)) - 1
    # (as cdan.grl_max_iters; T = total iterations / 10 is DANN's schedule), so fresh discriminators
    # do not push a trained detector's features from the first step
    grl_max_iters: int = 0


@dataclass
class MethodConfig:
    name: str = "source_only"
    supervised_domain: str = "source"  # "target" only for the target-supervised oracle
    student_bn: str = "source"  # which student passes update BN running statistics: "source" | "all"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mix: MixConfig | None = None  # DACS ClassMix self-training term
    mic: MaskConfig | None = None  # MIC masked image consistency term
    fd: FdConfig | None = None  # ImageNet feature distance on the source (seg: DAFormer)
    cdan: CdanConfig | None = None  # conditional adversarial alignment (cls: SDAT)
    mcc: MccConfig | None = None  # minimum class confusion (cls: SDAT)
    sam: SamConfig | None = None  # sharpness-aware task loss (cls: SDAT)
    sada: SadaConfig | None = None  # image/instance domain alignment (det: SADA)
    # seg seed methods: their blocks are the constructor arguments of their terms (mic_uda.tasks.
    # seg_terms: PipaTerms / RegionalContrastTerm / IR2FTerm), checked there by name at start-up;
    # pipa has two sub-blocks, `pixel` (source) and `patch` (target)
    pipa: dict[str, Any] | None = None  # PiPa pixel + patch contrast (SPEC 5)
    rccr: dict[str, Any] | None = None  # RCCR regional contrast, momentum head, bank (SPEC 6)
    ir2f: dict[str, Any] | None = None  # IR2F, our interpretation (SPEC 7): INR + mixture loss

    @property
    def needs_teacher(self) -> bool:
        return any(getattr(self, t) is not None for t in ("mix", "mic", "pipa", "rccr", "ir2f"))

    @property
    def needs_target_labels(self) -> bool:
        return self.supervised_domain == "target"


_CHOICES = {
    "supervised_domain": ("source", "target"),
    "student_bn": ("source", "all"),
    "teacher.bn": ("batch", "running"),
    "pseudo_label.weight_scope": ("image", "batch"),
    "pseudo_label.weight_type": ("fraction", "probability"),
    "augment.draw": DRAW_CHOICES,
    "augment.semantics": SEMANTICS_CHOICES,
}


_TERM_CHOICES = {
    "mix.classes": CLASSMIX_CLASSES,
    "mic.images": ("target", "source", "one_each"),
    "mic.confidence_weight": ("none", "prob"),
}


def parse_method(cfg: Any) -> MethodConfig:
    """Validate a method config (dict/DictConfig) into a :class:`MethodConfig`, with clear errors."""
    schema = OmegaConf.structured(MethodConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(OmegaConf.to_container(OmegaConf.create(cfg))))
    except OmegaConfBaseException as e:
        raise ValueError(f"invalid method config: {e}".replace("\n", " | ")) from e
    method: MethodConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(merged, key)
        if value not in allowed:
            raise ValueError(f"method.{key}={value!r} is not one of {list(allowed)}")
    if method.mic is not None and not 0.0 <= method.mic.ratio < 1.0:
        raise ValueError(f"method.mic.ratio must be in [0, 1), got {method.mic.ratio}")
    for key, allowed in _TERM_CHOICES.items():  # options of a term, checked when the term is on
        term = key.split(".")[0]
        value = OmegaConf.select(merged, key)
        if getattr(method, term) is not None and value not in allowed:
            raise ValueError(f"method.{key}={value!r} is not one of {list(allowed)}")
    return method


OPTIONAL_TERMS = ("mix", "mic", "fd", "cdan", "mcc", "sam", "sada", "pipa", "rccr", "ir2f")


def check_terms(method: MethodConfig, supported: tuple[str, ...], task: str) -> None:
    """A method term the task's module does not implement is an error naming both, not a no-op."""
    unsupported = [t for t in OPTIONAL_TERMS if getattr(method, t) is not None and t not in supported]
    if unsupported:
        raise ValueError(
            f"method={method.name} uses {', '.join('method.' + t for t in unsupported)}, which task={task} "
            f"does not implement (it supports: {list(supported) or 'no extra terms'})"
        )
