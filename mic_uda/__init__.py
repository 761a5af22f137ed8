"""mic_uda: unsupervised domain adaptation (DACS, MIC, ...) with Lightning and Hydra.

The task-agnostic pieces are a small public API for use in your own PyTorch loop (README, "Use MIC in
your own loop"); these names are stable:

=============================  ==========================================================================
``block_mask``                 MIC's random block keep-mask ``(B, 1, H, W)`` in {0, 1}
``apply_mask``                 masked images: ``images * keep + fill * (1 - keep)``
``weighted_cross_entropy``     pixel/sample-weighted CE: the supervised, mixed and masked-consistency loss
``pseudo_label_from_logits``   teacher logits ``(B, C, ...)`` -> labels and confidences ``(B, ...)``
``confidence_weight``          the papers' pseudo-label weight (confident fraction per image or batch)
``ema_update``                 one EMA step of the teacher towards the student (``ema_alpha``: its ramp)
``copy_weights``               teacher <- exact copy of the student
``set_teacher_mode``           the teacher's BN policy: ``"batch"`` (official) or ``"running"``
``frozen_bn_statistics``       context: student BN layers normalise without updating running statistics
``reestimate_bn_statistics``   AdaBN: running statistics re-estimated on unlabelled target batches
``classmix_masks``, ``mix``    DACS's ClassMix masks ``(B, 1, H, W)`` and the mixing of images/labels
``StrongAugment``              colour jitter + Gaussian blur of DACS/MIC on images ``(B, 3, H, W)`` in [0, 1]
=============================  ==========================================================================

Every random draw takes an explicit ``torch.Generator``. Imported lazily: ``import mic_uda`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "block_mask": "mic_uda.uda.masking",
    "apply_mask": "mic_uda.uda.masking",
    "weighted_cross_entropy": "mic_uda.uda.losses",
    "pseudo_label_from_logits": "mic_uda.uda.pseudo_label",
    "confidence_weight": "mic_uda.uda.pseudo_label",
    "ema_update": "mic_uda.uda.ema",
    "ema_alpha": "mic_uda.uda.ema",
    "copy_weights": "mic_uda.uda.ema",
    "set_teacher_mode": "mic_uda.uda.bn",
    "frozen_bn_statistics": "mic_uda.uda.bn",
    "reestimate_bn_statistics": "mic_uda.uda.bn",
    "classmix_masks": "mic_uda.uda.mixing",
    "mix": "mic_uda.uda.mixing",
    "StrongAugment": "mic_uda.uda.augment",
}

__all__ = [  # = _PUBLIC's names (a test checks)
    "StrongAugment",
    "__version__",
    "apply_mask",
    "block_mask",
    "classmix_masks",
    "confidence_weight",
    "copy_weights",
    "ema_alpha",
    "ema_update",
    "frozen_bn_statistics",
    "mix",
    "pseudo_label_from_logits",
    "reestimate_bn_statistics",
    "set_teacher_mode",
    "weighted_cross_entropy",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names are resolved on first use
    from mic_uda.uda.augment import StrongAugment
    from mic_uda.uda.bn import frozen_bn_statistics, reestimate_bn_statistics, set_teacher_mode
    from mic_uda.uda.ema import copy_weights, ema_alpha, ema_update
    from mic_uda.uda.losses import weighted_cross_entropy
    from mic_uda.uda.masking import apply_mask, block_mask
    from mic_uda.uda.mixing import classmix_masks, mix
    from mic_uda.uda.pseudo_label import confidence_weight, pseudo_label_from_logits


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mic_uda' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
