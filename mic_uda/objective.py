"""What ``python -m mic_uda.train`` returns to a sweeper (Optuna maximises it): ``optimized_metric``.

Unsupervised domain adaptation has no target labels, so by default the objective must not read any:
``val/...`` and ``test/...`` metrics are computed on the *labelled* target evaluation split and are only
accepted with ``optimize_on_target_labels=true`` (an explicit opt-in, e.g. for an oracle study or a
separate labelled target validation split). A leading ``-`` negates a metric (losses).

The default, ``-train/loss_sup_avg``, is the negative source (supervised) loss averaged over the last
``window`` training steps (:class:`TrainAverages`). Why this one among the label-free metrics that are
logged: it does not depend *by construction* on the parameters the Optuna config searches
(``method.mic.ratio``, ``method.mic.block_size``, ``method.pseudo_label.threshold``), whereas
``train/pseudo_weight`` (the share of confident pseudo-labels) rises whenever the threshold is lowered
and the confidence-weighted ``train/loss_mic`` falls whenever the threshold is raised (weights -> 0) or
the mask ratio lowered, so optimising either would only learn to game its own definition. The source
loss rejects settings that wreck training (collapse, divergence), but it does not measure target
accuracy and mildly favours weaker adaptation: treat its optimum as a sanity-checked starting point.
The mean over the last steps removes most of the batch-to-batch noise of a single step's value.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from omegaconf import DictConfig

log = logging.getLogger("mic_uda")

#: metric prefixes computed on the labelled target evaluation split
TARGET_LABEL_PREFIXES = ("val/", "test/")


def parse_objective(spec: str) -> tuple[str, float]:
    """``"-train/loss_sup_avg"`` -> ``("train/loss_sup_avg", -1.0)``."""
    spec = str(spec).strip()
    if not spec or spec == "-":
        raise ValueError("optimized_metric is empty: give a logged metric, e.g. -train/loss_sup_avg")
    return (spec[1:], -1.0) if spec.startswith("-") else (spec, 1.0)


def uses_target_labels(key: str) -> bool:
    return key.startswith(TARGET_LABEL_PREFIXES)


def check_objective(cfg: DictConfig) -> None:
    """Fail at start-up when the objective would select hyper-parameters on target labels."""
    spec = cfg.get("optimized_metric")
    if spec is None:
        return
    key, _ = parse_objective(spec)
    if uses_target_labels(key) and not cfg.get("optimize_on_target_labels", False):
        raise ValueError(
            f"optimized_metric={spec!r} is computed with target labels (the target evaluation split): "
            "selecting hyper-parameters on it is not unsupervised domain adaptation. Use a label-free "
            "metric (default -train/loss_sup_avg) or opt in with optimize_on_target_labels=true"
        )


def objective_value(cfg: DictConfig, metrics: Mapping[str, float]) -> float | None:
    """The sweeper's value: ``sign * metrics[key]``; None (with a warning) when it was not logged."""
    spec = cfg.get("optimized_metric")
    if spec is None:
        return None
    key, sign = parse_objective(spec)
    if key not in metrics:
        log.warning(
            "optimized_metric=%r was not logged (available: %s); the sweeper gets None",
            spec,
            ", ".join(sorted(k for k in metrics if k.startswith("train/"))[:20]),
        )
        return None
    value = float(metrics[key])
    return sign * value if not math.isnan(value) else value


class TrainAverages(L.Callback):
    """Logs ``<key>_avg``: the mean of each training metric in ``keys`` over the last ``window`` steps.

    A single step's loss (batch 2 + 2) is too noisy to compare runs by; the running mean of the last
    steps is the label-free sweep objective (see the module docstring).
    """

    def __init__(self, keys: Sequence[str] = ("train/loss_sup",), window: int = 50) -> None:
        if window < 1:
            raise ValueError(f"callbacks.train_averages.window must be >= 1, got {window}")
        self.keys, self.window = list(keys), int(window)
        self.values: dict[str, deque[float]] = {k: deque(maxlen=self.window) for k in self.keys}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = trainer.callback_metrics
        for key in self.keys:
            value = metrics.get(key)
            if value is None:
                continue
            value = float(value)
            if math.isfinite(value):
                self.values[key].append(value)
            if self.values[key]:
                mean = sum(self.values[key]) / len(self.values[key])
                pl_module.log(f"{key}_avg", mean, on_step=True, on_epoch=False, sync_dist=False)

    def state_dict(self) -> dict[str, Any]:
        return {"values": {k: list(v) for k, v in self.values.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k, vals in state_dict.get("values", {}).items():
            if k in self.values:
                self.values[k].extend(vals)
