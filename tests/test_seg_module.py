"""The segmentation module's contracts: teacher only moves by EMA, BN-statistics policies hold."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from mic_uda.train import build_datamodule, train


class Capture(L.Callback):
    """Student/teacher weights right before the first step and after the last one."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.student0 = {k: v.clone() for k, v in pl_module.student.state_dict().items()}
        self.teacher0 = (
            {k: v.clone() for k, v in pl_module.teacher.state_dict().items()} if pl_module.teacher else None
        )


def fit(make_cfg, overrides: list[str]) -> tuple[L.LightningModule, Capture]:
    cfg = make_cfg([*overrides, "trainer.max_steps=1", "test=false"])
    L.seed_everything(cfg.seed, workers=True)
    model = instantiate(cfg.task.module, _recursive_=False)
    cap = Capture()
    trainer = instantiate(
        cfg.trainer, callbacks=[cap], logger=False, enable_checkpointing=False, limit_val_batches=0
    )
    trainer.fit(model, datamodule=build_datamodule(cfg))
    return model, cap


def test_teacher_gets_no_gradients_and_moves_only_by_ema(make_cfg) -> None:
    model, cap = fit(make_cfg, ["method=mic"])
    teacher, student = model.teacher, model.student
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(cap.teacher0[k], cap.student0[k]) for k in cap.student0), (
        "teacher starts as a copy"
    )
    s1 = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        # step 1: alpha_1 = min(1 - 1/2, 0.999) = 0.5
        expected = 0.5 * cap.teacher0[name] + 0.5 * s1[name].detach()
        assert torch.allclose(p, expected, atol=1e-6), name
    assert not torch.equal(s1["head.classifier.weight"].detach(), cap.student0["head.classifier.weight"])
    # teacher_bn=batch: the teacher's BN buffers are never touched
    buffers = [n for n, _ in teacher.named_buffers() if n in cap.teacher0]
    assert any("running_mean" in n for n in buffers)
    for name in buffers:
        assert torch.equal(teacher.get_buffer(name), cap.teacher0[name]), name


def _bn_buffers(model: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.student.state_dict().items() if "running_" in k}


def test_student_bn_source_policy_ignores_mixed_and_masked_passes(make_cfg) -> None:
    ref, _ = fit(make_cfg, ["method=source_only"])
    frozen, _ = fit(make_cfg, ["method=mic", "method.student_bn=source"])
    free, _ = fit(make_cfg, ["method=mic", "method.student_bn=all"])
    r, f, a = _bn_buffers(ref), _bn_buffers(frozen), _bn_buffers(free)
    assert r, "the DAFormer head has BatchNorm layers"
    # only the (identical) source pass updated the statistics
    assert all(torch.equal(r[k], f[k]) for k in r)
    assert not all(torch.equal(r[k], a[k]) for k in r)


def test_teacher_running_policy_uses_eval_mode_and_averages_buffers(make_cfg) -> None:
    model, cap = fit(make_cfg, ["method=dacs", "method.teacher.bn=running"])
    assert not any(m.training for m in model.teacher.modules())
    s = model.student.state_dict()
    for name, b in model.teacher.named_buffers():
        if "running_mean" in name:
            assert torch.allclose(b, 0.5 * cap.teacher0[name] + 0.5 * s[name], atol=1e-6), name


def test_bad_method_value_names_key(make_cfg) -> None:
    with pytest.raises(ValueError, match=r"method.student_bn='target' is not one of \['source', 'all'\]"):
        train(make_cfg(["method=mic", "method.student_bn=target"]))


@pytest.mark.parametrize("images", ["target", "source", "one_each"])
def test_mic_masked_batch_follows_the_official_mask_modes(images: str, make_cfg) -> None:
    cfg = make_cfg(["method=mic", f"method.mic.images={images}"])
    module = instantiate(cfg.task.module, _recursive_=False)
    src = {"image": torch.rand(2, 3, 4, 4), "label": torch.randint(0, 3, (2, 4, 4))}
    x_t, pl, w = torch.rand(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4)), torch.full((2, 4, 4), 0.3)
    x, y, weight = module.terms["mic"].inputs(src, x_t, pl, w)
    if images == "target":
        assert x is x_t and y is pl and weight is w
    elif images == "source":
        assert x is src["image"] and y is src["label"] and weight is None
    else:  # official "separate": [source 0 + GT, weight 1] and [target 0 + pseudo-label, its weight]
        assert torch.equal(x, torch.stack([src["image"][0], x_t[0]]))
        assert torch.equal(y, torch.stack([src["label"][0], pl[0]]))
        assert torch.equal(weight, torch.stack([torch.ones(4, 4), w[0]]))


@pytest.mark.parametrize("augment", [True, False])
def test_mic_augment_switch_decides_whether_the_masked_images_are_augmented(
    augment: bool, make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mic_uda.tasks.seg_terms import MaskedConsistencyTerm

    calls: list[int] = []
    real = MaskedConsistencyTerm.forward

    def spy(self, *args, **kwargs):
        before = len(calls_aug)
        out = real(self, *args, **kwargs)
        calls.append(len(calls_aug) - before)
        return out

    calls_aug: list[int] = []
    import mic_uda.uda.augment as aug_module

    real_call = aug_module.StrongAugment.__call__
    monkeypatch.setattr(
        aug_module.StrongAugment, "__call__", lambda self, x, g: calls_aug.append(1) or real_call(self, x, g)
    )
    monkeypatch.setattr(MaskedConsistencyTerm, "forward", spy)
    fit(make_cfg, ["method=mic", f"method.mic.augment={str(augment).lower()}"])
    assert calls == [1 if augment else 0]


def test_mic_daformer_preset_switches_on_the_official_behaviours(make_cfg) -> None:
    cfg = make_cfg(["experiment=mic_daformer_gta2cs", "backbone.weights=w.pth"], tiny=False)
    m = cfg.method
    assert m.pseudo_label.weight_scope == "batch" and m.student_bn == "all" and m.augment.draw == "batch"
    assert m.augment.semantics == "kornia05"
    assert m.mix.classes == "batch_union" and m.mix.include_ignore is True
    assert (m.pseudo_label.ignore_top, m.pseudo_label.ignore_bottom) == (15, 120)
    assert m.mic.images == "target" and m.mic.augment is True
    assert cfg.trainer.precision == "32-true" and cfg.handover == "student"
    assert (
        m.fd.weight == 0.005 and m.fd.scale_min_ratio == 0.75 and list(m.fd.classes) == [6, 7, *range(11, 19)]
    )
    dacs = make_cfg(["experiment=daformer_gta2cs", "backbone.weights=w.pth"], tiny=False).method
    assert (
        dacs.mic is None and dacs.mix.classes == "batch_union" and dacs.pseudo_label.weight_scope == "batch"
    )


PRESETS = {
    "daformer_synthia2cs": ("synthia2cs", "DAFormerNet", False, (15, 120)),
    "mic_daformer_synthia2cs": ("synthia2cs", "DAFormerNet", True, (15, 120)),
    "daformer_cs2acdc": ("cs2acdc", "DAFormerNet", False, (0, 0)),
    "mic_daformer_cs2acdc": ("cs2acdc", "DAFormerNet", True, (0, 0)),
    "daformer_cs2darkzurich": ("cs2darkzurich", "DAFormerNet", False, (0, 0)),
    "mic_daformer_cs2darkzurich": ("cs2darkzurich", "DAFormerNet", True, (0, 0)),
    "dacs_dlv2_gta2cs": ("gta2cs", "DeepLabV2Net", False, (0, 0)),
    "daformer_dlv2_gta2cs": ("gta2cs", "DeepLabV2Net", False, (15, 120)),
    "mic_dlv2_gta2cs": ("gta2cs", "DeepLabV2Net", True, (15, 120)),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_segmentation_paper_presets_carry_the_official_switches(preset: str, make_cfg) -> None:
    data, net, has_mic, margins = PRESETS[preset]
    cfg = make_cfg([f"experiment={preset}", "backbone.weights=w.pth"], tiny=False)
    m = cfg.method
    assert cfg.data.name == data and cfg.backbone._target_.endswith(net)
    assert (m.mic is not None) == has_mic and m.mix.classes == "batch_union" and m.mix.include_ignore
    assert m.pseudo_label.weight_scope == "batch" and m.student_bn == "all"
    assert (m.augment.draw, m.augment.semantics) == ("batch", "kornia05")
    assert (m.pseudo_label.ignore_top, m.pseudo_label.ignore_bottom) == margins
    assert cfg.trainer.precision == "32-true" and cfg.trainer.max_steps == 40000 and cfg.handover == "student"
    assert (m.fd is None) == (preset == "dacs_dlv2_gta2cs") and cfg.data.rcs.enabled == (
        preset != "dacs_dlv2_gta2cs"
    )
    if has_mic:
        official_separate = data in ("cs2acdc", "cs2darkzurich")
        assert (m.mic.images, m.mic.augment) == (
            ("one_each", False) if official_separate else ("target", True)
        )


def test_named_miou_subsets_are_the_means_of_their_classes(make_cfg) -> None:
    """SYNTHIA's mIoU16 / mIoU13 are means of 16 / 13 of the 19 per-class IoUs (data.miou_subsets)."""
    cfg = make_cfg(["method=source_only", "+data.miou_subsets={mIoU2: [0, 3]}"])
    metrics = train(cfg)
    names = list(cfg.data.class_names)
    ious = [metrics[f"test/student/IoU_{names[c]}"] for c in (0, 3)]
    expected = sum(v for v in ious if v == v) / max(1, sum(v == v for v in ious))
    assert metrics["test/mIoU2"] == pytest.approx(expected, abs=1e-4)
    assert metrics["test/student/mIoU2"] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(Exception, match=r"data.miou_subsets.IoU2"):
        train(make_cfg(["method=source_only", "+data.miou_subsets={IoU2: [0]}"]))


def test_dataset_configs_set_their_official_mic_mode_and_metrics(make_cfg) -> None:
    for data in ("cs2acdc", "cs2darkzurich"):
        mic = make_cfg(["method=mic", f"data={data}"], tiny=False).method.mic
        assert (mic.images, mic.augment) == ("one_each", False)
    assert make_cfg(["method=mic", "data=gta2cs"], tiny=False).method.mic.images == "target"
    subsets = make_cfg(["data=synthia2cs"], tiny=False).task.module.miou_subsets
    assert (
        len(subsets.mIoU16) == 16 and len(subsets.mIoU13) == 13 and set(subsets.mIoU13) < set(subsets.mIoU16)
    )
    assert make_cfg(["data=synthia2cs_16"], tiny=False).task.module.miou_subsets is None


def test_handover_default_is_the_tasks(make_cfg) -> None:
    assert make_cfg([]).handover == "recalibrated"
    assert make_cfg(["task=cls"]).handover == "recalibrated"
    assert make_cfg(["task=det"]).handover == "student"
    assert make_cfg(["task=det", "handover=recalibrated"]).handover == "recalibrated"
