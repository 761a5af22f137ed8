"""The method axis as a validated structured config: which loss terms run and with what settings.

A method YAML (``conf/method/*.yaml``) is merged onto :class:`MethodConfig`, so a typo or a wrong
type fails at start-up naming the key. Methods switch terms on and off; they never copy a module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class TeacherConfig:
    alpha: float = 0.999
    bn: str = "batch"  # "batch" (official) or "running"; see mic_uda.uda.bn


@dataclass
class PseudoLabelConfig:
    threshold: float = 0.968
    weight_scope: str = "image"  # "image" (papers) or "batch" (official code)
    ignore_top: int = 0
    ignore_bottom: int = 0


@dataclass
class AugmentConfig:
    color_jitter_strength: float = 0.2
    color_jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)


@dataclass
class MixConfig:
    weight: float = 1.0


@dataclass
class MaskConfig:
    block_size: int = 32
    ratio: float = 0.7
    weight: float = 1.0


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

    @property
    def needs_teacher(self) -> bool:
        return self.mix is not None or self.mic is not None

    @property
    def needs_target_labels(self) -> bool:
        return self.supervised_domain == "target"


_CHOICES = {
    "supervised_domain": ("source", "target"),
    "student_bn": ("source", "all"),
    "teacher.bn": ("batch", "running"),
    "pseudo_label.weight_scope": ("image", "batch"),
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
    return method
