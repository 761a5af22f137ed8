"""SDAT's SAM step as the official SDAT / SDAT+MIC code: which loss terms, on which batch, feed the
ascent gradient (exact, against an independent recomputation at the same weights), and which masked
loss the update step uses."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import mic_uda.tasks.cls as cls_module
import mic_uda.train as train_module
from mic_uda.tasks.cls import ClsUDAModule
from mic_uda.train import train
from mic_uda.uda.masking import apply_mask, block_mask
from mic_uda.uda.mcc import mcc_loss
from mic_uda.uda.pseudo_label import confidence_weight, pseudo_label_from_logits


class FirstStep(L.Callback):
    """Copies of student, teacher, batch and generator state before the first training step."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None
        self.module: ClsUDAModule | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.module = pl_module
        if self.state is None:
            self.state = {
                "student": copy.deepcopy(pl_module.student),
                "teacher": copy.deepcopy(pl_module.teacher),
                "batch": copy.deepcopy(batch),
                "generator": pl_module.generator.get_state(),
            }


def _run_recording_ascent(make_cfg, monkeypatch, overrides: list[str]) -> tuple[FirstStep, list[Any]]:
    rec = FirstStep()
    real_cb = train_module.instantiate_dict
    monkeypatch.setattr(
        train_module,
        "instantiate_dict",
        lambda cfg, what: [*real_cb(cfg, what), rec] if what == "callbacks" else real_cb(cfg, what),
    )
    captured: list[Any] = []
    real_perturb = cls_module.sam.perturb

    def recording_perturb(params: Any, rho: float) -> Any:
        params = list(params)
        disc = rec.module.adversarial
        captured.append(
            {
                "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
                "disc_grads": [] if disc is None else [p.grad for p in disc.parameters()],
            }
        )
        return real_perturb(params, rho)

    monkeypatch.setattr(cls_module.sam, "perturb", recording_perturb)
    train(make_cfg(["task=cls", "trainer.max_steps=1", "trainer.val_check_interval=1", *overrides]))
    return rec, captured


def _expected_ascent(rec: FirstStep, method: Any, module: ClsUDAModule, with_mic: bool) -> list[torch.Tensor]:
    """CE(source) + MCC(target) of one joint [source, target] forward (+ the probability-weighted
    masked loss), recomputed from scratch at the step's starting weights."""
    s = rec.state
    student, teacher, batch = s["student"], s["teacher"], s["batch"]
    x_s, y_s, x_t = batch["source"]["image"], batch["source"]["label"], batch["target"]["image"]
    n = x_s.shape[0]
    logits = student(torch.cat([x_s, x_t]))
    loss = F.cross_entropy(logits[:n], y_s) + method.mcc.weight * mcc_loss(logits[n:], method.mcc.temperature)
    if with_mic:
        g = torch.Generator().set_state(s["generator"])
        with torch.no_grad():
            pl, conf = pseudo_label_from_logits(teacher(x_t))
        pc = method.pseudo_label
        weight = confidence_weight(conf, pc.threshold, pc.weight_scope, weight_type=pc.weight_type)
        b, _, h, w = x_t.shape
        keep = block_mask(b, h, w, method.mic.block_size, method.mic.ratio, g).to(x_t.dtype)
        x_k = apply_mask(module.augment(x_t, g), keep, module.mask_fill())
        ce = F.cross_entropy(student(x_k), pl, reduction="none")
        loss = loss + method.mic.weight * (ce * weight).mean()
    return list(torch.autograd.grad(loss, list(student.parameters()), allow_unused=True))


@pytest.mark.parametrize("method", ["sdat", "sdat_mic"])
def test_sam_ascent_is_the_gradient_of_the_task_terms_on_the_joint_batch(
    method: str, make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec, captured = _run_recording_ascent(make_cfg, monkeypatch, [f"method={method}"])
    assert len(captured) == 1
    module = rec.module
    expected = _expected_ascent(rec, module.method, module, with_mic=method == "sdat_mic")
    got = captured[0]["grads"]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if e is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert all(g is None for g in captured[0]["disc_grads"])  # CDAN is not part of the ascent


def test_sam_ascent_differs_from_the_source_only_task_loss(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """The former variant (source CE of a source-only forward) gives another direction."""
    rec, captured = _run_recording_ascent(make_cfg, monkeypatch, ["method=sdat"])
    s = rec.state
    student = s["student"]
    x_s, y_s = s["batch"]["source"]["image"], s["batch"]["source"]["label"]
    source_only = torch.autograd.grad(F.cross_entropy(student(x_s), y_s), list(student.parameters()))
    diff = sum(float((a - b).abs().sum()) for a, b in zip(captured[0]["grads"], source_only) if a is not None)
    assert diff > 1e-4


@pytest.mark.parametrize(("official", "expected"), [(False, [True, True]), (True, [True, False])])
def test_update_step_masked_loss_weighting_follows_the_official_switch(
    official: bool, expected: list[bool], make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []
    real = ClsUDAModule._masked_loss

    def recording(self: ClsUDAModule, masked: Any, weighted: bool) -> torch.Tensor:
        calls.append(weighted)
        return real(self, masked, weighted)

    monkeypatch.setattr(ClsUDAModule, "_masked_loss", recording)
    train(
        make_cfg(
            [
                "task=cls",
                "method=sdat_mic",
                f"method.mic.official_unweighted_update={str(official).lower()}",
                "trainer.max_steps=1",
                "trainer.val_check_interval=1",
            ]
        )
    )
    assert calls == expected  # ascent (always weighted), then the update step


def test_masked_loss_weighted_and_unweighted_values(make_cfg) -> None:
    from hydra.utils import instantiate

    cfg = make_cfg(["task=cls", "method=sdat_mic"])
    module = instantiate(cfg.task.module, _recursive_=False)
    torch.manual_seed(0)
    x_k = torch.rand(4, 3, 16, 16)
    pl = torch.tensor([0, 1, 2, 0])
    weight = torch.tensor([0.9, 0.5, 0.2, 1.0])
    ce = F.cross_entropy(module.student(x_k), pl, reduction="none")
    w = module.method.mic.weight
    weighted = module._masked_loss((x_k, pl, weight), weighted=True)
    torch.testing.assert_close(weighted, w * (ce * weight).mean())
    torch.testing.assert_close(module._masked_loss((x_k, pl, weight), weighted=False), w * ce.mean())
