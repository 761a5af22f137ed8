"""Detection end to end through the real entry point on the embedded default, and the module's terms:
the masked pass (D2, D3), the BN policies through training and validation (D1), SADA through the
module, and the cs2foggy preset's recipe (D8)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mic_uda.data.boxes import unpad_targets
from mic_uda.evaluate import evaluate, load_module
from mic_uda.models.daformer import load_encoder_weights_into
from mic_uda.models.detector import SmpEncoderFPN
from mic_uda.tasks.det import MIC_DET_LOSSES, DetUDAModule, pseudo_targets
from mic_uda.train import build_datamodule, train
from mic_uda.uda.bn import batchnorm_layers
from mic_uda.uda.masking import apply_mask, block_mask
from mic_uda.utils.metrics import nan_mean

TERMS = {
    "source_only": set(),
    "sada": {"loss_sada"},
    "mic": {"loss_mic"},
    "sada_mic": {"loss_sada", "loss_mic"},
}


@pytest.mark.parametrize("method", list(TERMS))
def test_det_train_then_evaluate(method: str, make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(["task=det", f"method={method}"])
    metrics = train(cfg)
    for term in ("loss_sada", "loss_mic"):
        assert (f"train/{term}" in metrics) == (term in TERMS[method]), term
    # the logged total is the sum of the terms of the (last) step
    parts = sum(metrics.get(f"train/{k}", 0.0) for k in ("loss_sup", "loss_sada", "loss_mic"))
    assert metrics["train/loss"] == pytest.approx(parts, rel=1e-5)
    sup = sum(metrics[f"train/det_{k}"] for k in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier"))
    assert metrics["train/loss_sup"] == pytest.approx(sup + metrics["train/det_loss_box_reg"], rel=1e-5)
    if "loss_sada" in TERMS[method]:  # weights 1 (official)
        sada = sum(metrics[f"train/sada_{k}"] for k in ("img", "ins", "cst"))
        assert metrics["train/loss_sada"] == pytest.approx(sada, rel=1e-5)
    if "loss_mic" in TERMS[method]:
        assert metrics["train/ema_alpha"] == pytest.approx(2 / 3)  # logged at step 2: min(1 - 1/3, 0.9)
        assert metrics["train/mic_images"] in (0.0, 1.0, 2.0)
        if metrics["train/mic_images"] == 0.0:
            assert metrics["train/loss_mic"] == 0.0
    for split in ("val", "test"):  # the headline is the nan-mean of the per-class APs
        per_class = torch.tensor([metrics[f"{split}/student/AP50_{c}"] for c in ("car", "person")])
        assert metrics[f"{split}/student/mAP50"] == pytest.approx(100 * nan_mean(per_class / 100), rel=1e-5)
        assert metrics[f"{split}/mAP50"] == metrics[f"{split}/student/mAP50"]
    assert ("val/teacher/mAP50" in metrics) == ("loss_mic" in TERMS[method])
    out = Path(cfg.paths.output_dir)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["primary_metric"] in metrics
    panels = list((out / "media").rglob("target_val_boxes_*.png"))
    assert panels  # boxes drawn on the fixed validation images at the validation
    ckpt = out / "checkpoints" / "last.ckpt"
    model = load_module(ckpt)
    assert isinstance(model, DetUDAModule)
    assert (model.alignment is not None) == ("loss_sada" in TERMS[method])
    if method in ("source_only", "sada_mic"):  # the checkpoint holds the evaluated student
        ecfg = make_cfg(
            [
                f"ckpt_path={ckpt}",
                "data=synthetic_det",
                "data.size=64",
                "data.datamodule.val.dataset.num_images=4",
                "data.datamodule.val_batch_size=4",
                "trainer=cpu",
                "+trainer.enable_progress_bar=false",
            ],
            config_name="eval",
            out=tmp_path / "eval",
        )
        assert evaluate(ecfg)["test/mAP50"] == pytest.approx(metrics["test/student/mAP50"], abs=1e-6)


def test_pseudo_boxes_are_filtered_by_score_with_official_greater_or_equal() -> None:
    dets = [
        {
            "boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]]),
            "scores": torch.tensor([0.95, 0.8, 0.79]),
            "labels": torch.tensor([1, 2, 2]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    out = pseudo_targets(dets, 0.8)
    torch.testing.assert_close(
        out[0]["boxes"], torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5]])
    )  # 0.8 kept (D10)
    torch.testing.assert_close(out[0]["labels"], torch.tensor([1, 2]))
    assert out[1]["boxes"].shape == (0, 4)


# ----------------------------------------------------------------- the masked pass (D2, D3, item 7)
def det(box: list[float], score: float, label: int) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor([box]), "scores": torch.tensor([score]), "labels": torch.tensor([label])}


TEACHER_OUT = [  # hand-built teacher detections on 3 target images
    {
        "boxes": torch.tensor([[4.0, 4, 30, 30], [10, 10, 20, 20]]),
        "scores": torch.tensor([0.9, 0.5]),
        "labels": torch.tensor([1, 2]),
    },
    det([0.0, 0, 10, 10], 0.79, 1),  # below 0.8: this image has no pseudo box
    det([20.0, 20, 60, 50], 0.8, 2),  # exactly 0.8: kept (>=)
]


def mic_module(make_cfg, monkeypatch, teacher_out, overrides=()):
    cfg = make_cfg(["task=det", "method=mic", *overrides])
    module: DetUDAModule = instantiate(cfg.task.module, _recursive_=False)
    module.generator = torch.Generator().manual_seed(0)
    monkeypatch.setattr(module.teacher, "forward", lambda x: teacher_out)
    calls: dict[str, list] = {"supervised": [], "backward": []}
    real = module.student.supervised

    def spy(x, targets, **kwargs):
        calls["supervised"].append((x.clone(), targets, kwargs))
        return real(x, targets, **kwargs)

    monkeypatch.setattr(module.student, "supervised", spy)
    # no trainer here: back-propagate as Lightning's manual_backward would
    monkeypatch.setattr(
        module, "manual_backward", lambda loss: (calls["backward"].append(loss), loss.backward())
    )
    return module, calls


@pytest.mark.parametrize("weighting", ["none", "prob"])
def test_masked_pass_trains_the_student_on_masked_augmented_images_with_boxes(
    make_cfg, monkeypatch, weighting: str
) -> None:
    """The real masked pass: block mask after the photometric augmentation, pseudo targets from the
    teacher, images without a pseudo box left out (D2, official trainer.py:243-246, 325-345), only
    the objectness and ROI classification losses (optionally confidence-weighted, D3)."""
    module, calls = mic_module(
        make_cfg, monkeypatch, TEACHER_OUT, [f"method.mic.confidence_weight={weighting}"]
    )
    m = module.method
    x_t = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    replay = torch.Generator()
    replay.set_state(module.generator.get_state())
    reference = copy.deepcopy(module.student)
    torch.manual_seed(5)
    logs = module._mic_term(x_t, module.generator)

    keep = block_mask(3, 64, 64, m.mic.block_size, m.mic.ratio, replay).to(x_t.dtype)
    augmented = module.augment(x_t, replay)
    expected_images = apply_mask(augmented, keep, module.mask_fill())[[0, 2]]
    assert 0 < float(keep.mean()) < 1 and not torch.equal(augmented, x_t)
    ((images, targets, kwargs),) = calls["supervised"]
    torch.testing.assert_close(images, expected_images)
    assert kwargs == {"confidence_weight": weighting}
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[4.0, 4, 30, 30]]))
    torch.testing.assert_close(targets[1]["boxes"], torch.tensor([[20.0, 20, 60, 50]]))
    assert [t["labels"].tolist() for t in targets] == [[1], [2]]
    assert float(logs["train/mic_images"]) == 2 and float(
        logs["train/pseudo_boxes_per_image"]
    ) == pytest.approx(2 / 3)

    torch.manual_seed(5)  # the same ROI/anchor sampling draws
    losses = reference.supervised(expected_images, targets, confidence_weight=weighting).losses
    expected = m.mic.weight * sum(losses[k] for k in MIC_DET_LOSSES)  # no box regression on pseudo boxes
    assert float(logs["train/loss_mic"]) == pytest.approx(float(expected), rel=1e-5)
    assert len(calls["backward"]) == 1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())


def test_masked_pass_without_any_pseudo_box_is_an_exact_zero(make_cfg, monkeypatch) -> None:
    """D2: with no image left the term is 0, with no forward and no backward, and the log says so."""
    none = [det([0.0, 0, 10, 10], 0.5, 1), {**det([0.0, 0, 1, 1], 0.1, 1)}]
    module, calls = mic_module(make_cfg, monkeypatch, none)
    state = module.generator.get_state()
    logs = module._mic_term(torch.rand(2, 3, 64, 64), module.generator)
    assert calls["supervised"] == [] and calls["backward"] == []
    assert float(logs["train/loss_mic"]) == 0.0 and float(logs["train/mic_images"]) == 0.0
    assert not torch.equal(module.generator.get_state(), state)  # mask drawn anyway: one stream
    assert all(p.grad is None for p in module.student.parameters())


# ----------------------------------------------------------------- BN policies through fit (D1)
class Probe(L.Callback):
    """The student before the first step, the first source batch, and the teacher's BN modes right
    after each training step and each validation batch (where the teacher's forward just ran)."""

    def __init__(self) -> None:
        self.modes: list[tuple[str, list[tuple[bool, bool]]]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.student0 = copy.deepcopy(pl_module.student)  # in train mode, as the step finds it
        self.teacher0 = {k: v.clone() for k, v in pl_module.teacher.named_buffers()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.source = {k: v.clone() for k, v in batch["source"].items()}

    def _record(self, where: str, pl_module) -> None:
        self.modes.append(
            (where, [(m.training, m.track_running_stats) for m in batchnorm_layers(pl_module.teacher)])
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record("train", pl_module)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._record("val", pl_module)


def fit(make_cfg, overrides: list[str]) -> tuple[DetUDAModule, Probe]:
    cfg = make_cfg(
        ["task=det", *overrides, "trainer.max_steps=1", "trainer.val_check_interval=1", "test=false"]
    )
    L.seed_everything(cfg.seed, workers=True)
    model = instantiate(cfg.task.module, _recursive_=False)
    probe = Probe()
    trainer = instantiate(
        cfg.trainer, callbacks=[probe], logger=False, enable_checkpointing=False, limit_val_batches=1
    )
    trainer.fit(model, datamodule=build_datamodule(cfg))
    assert [w for w, _ in probe.modes] == ["train", "val"], "one step, then a validation"
    return model, probe


def _running(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if "running_" in k}


def _source_only_statistics(probe: Probe) -> dict[str, torch.Tensor]:
    ref = probe.student0
    ref.supervised(probe.source["image"], unpad_targets(probe.source["boxes"], probe.source["labels"]))
    return _running(ref)


@pytest.mark.parametrize("student_bn", ["source", "all"])
def test_bn_policies_survive_training_and_validation(make_cfg, student_bn: str) -> None:
    """D1 through the module: the default task=det detector has trainable BN; the teacher.bn=batch
    teacher keeps batch statistics through its forwards (training and validation) and its buffers;
    the student's running statistics follow method.student_bn (source: only the supervised pass,
    not the SADA target pass nor the masked pass)."""
    model, probe = fit(make_cfg, ["method=sada_mic", f"method.student_bn={student_bn}"])
    assert batchnorm_layers(model.teacher), "the default detector has BatchNorm layers"
    for where, modes in probe.modes:
        assert all(training and not track for training, track in modes), where
    for name, value in model.teacher.named_buffers():
        assert torch.equal(value, probe.teacher0[name]), name  # the EMA averages parameters only
    actual, source_only = _running(model.student), _source_only_statistics(probe)
    same = all(torch.equal(actual[k], source_only[k]) for k in source_only)
    assert same == (student_bn == "source")


def test_teacher_running_statistics_are_averaged_and_used(make_cfg) -> None:
    model, probe = fit(make_cfg, ["method=mic", "method.teacher.bn=running"])
    for where, modes in probe.modes:
        assert all(not training for training, _ in modes), where
    student = model.student.state_dict()
    for name, value in model.teacher.named_buffers():
        if "running_" in name:  # step 1: alpha = min(1 - 1/2, 0.9) = 0.5
            torch.testing.assert_close(value, 0.5 * probe.teacher0[name] + 0.5 * student[name])
    assert not any(m.training for m in model.teacher.modules())


# ----------------------------------------------------------------- SADA through the module
def test_sada_grl_warm_start_through_the_entry_point(make_cfg, tmp_path: Path) -> None:
    metrics = train(make_cfg(["task=det", "method=sada", "method.sada.grl_max_iters=10"]))
    # logged at the last of 2 steps, t = 1: 2 / (1 + exp(-1 / 10)) - 1
    assert metrics["train/grl_coeff"] == pytest.approx(2 / (1 + math.exp(-0.1)) - 1, rel=1e-5)
    constant = train(make_cfg(["task=det", "method=sada"], out=tmp_path / "constant"))
    assert constant["train/grl_coeff"] == 1.0


def test_sada_target_rois_come_from_the_module_generator(make_cfg, monkeypatch) -> None:
    """D7 through the module: the target pass gets the step's generator (deterministic under the seed)."""
    cfg = make_cfg(["task=det", "method=sada"])
    module: DetUDAModule = instantiate(cfg.task.module, _recursive_=False)
    seen = []
    real = module.student.unsupervised_features
    monkeypatch.setattr(
        module.student,
        "unsupervised_features",
        lambda x, generator=None: (seen.append(generator), real(x, generator))[1],
    )
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False
    )
    trainer.fit(module, datamodule=build_datamodule(cfg))
    assert seen == [module.generator]
    assert module.alignment is not None and len(module.alignment.instance) == len(
        module.student.roi_feature_levels
    )
    assert module.student.target_proposals == 16  # the tiny test config's


# ----------------------------------------------------------------- the cs2foggy preset (D8)
def test_cs2foggy_preset_builds_the_official_recipe(make_cfg) -> None:
    """Official e2e_da_faster_rcnn_R_50_FPN_masking_cs.yaml + defaults.py, built for real (random
    weights instead of the ImageNet file the preset needs)."""
    cfg = make_cfg(
        [
            "experiment=mic_sada_cs2foggy",
            "backbone.backbone_weights=null",
            "+task.module.scheduler.max_steps=60000",
        ],
        tiny=False,
    )
    assert cfg.trainer.max_steps == 60000
    for split in ("source", "target", "val"):
        assert list(cfg.data.datamodule[split].resize) == [1600, 800]  # MIC blocks of 32 px at 800 px
    assert cfg.data.datamodule.batch_size == 1 and cfg.data.datamodule.target_batch_size == 1
    module: DetUDAModule = instantiate(cfg.task.module, _recursive_=False)
    det = module.student
    assert det.model.transform.min_size == (800,) and det.model.transform.max_size == 1600
    body = det.model.backbone.body
    frozen = {n.split(".")[0] for n, p in body.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "layer1"} and trainable == {
        "layer2",
        "layer3",
        "layer4",
    }  # FREEZE_CONV_BODY_AT 2
    assert not batchnorm_layers(det.model.backbone)  # frozen BN (FrozenBatchNorm2d)
    assert det.target_proposals == 256 and det.model.roi_heads.fg_bg_sampler.batch_size_per_image == 256
    m = module.method
    assert (m.mic.confidence_weight, m.mic.block_size, m.mic.ratio, m.mic.weight) == ("prob", 32, 0.5, 1.0)
    assert (m.pseudo_label.threshold, m.teacher.alpha) == (0.8, 0.9)
    align = module.alignment
    assert align is not None and align.grl == (0.025, 0.1) and align.consistency_grl == 0.1
    assert align.weights == (1.0, 1.0, 1.0) and len(align.instance) == 4 and len(align.image) == 5

    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.SGD)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = [*det.named_parameters(), *align.named_parameters(prefix="alignment")]
    assert {id(p) for _, p in named if p.requires_grad} == set(by_param)
    for name, p in named:
        if p.requires_grad:
            group = by_param[id(p)]
            lr, wd = (
                (0.005, 0.0) if "bias" in name else (0.0025, 1e-4)
            )  # BIAS_LR_FACTOR 2, WEIGHT_DECAY_BIAS 0
            assert group["initial_lr"] == pytest.approx(lr), name  # "lr" is already x factor(0)
            assert group["weight_decay"] == pytest.approx(wd), name
            assert group["momentum"] == 0.9
    factor = sched.lr_lambdas[0]  # WarmupMultiStepLR(30k, 40k; 0.1; warm-up 1/3 over 500, linear)
    expected = {0: 1 / 3, 250: 2 / 3, 499: 1 / 3 * (1 / 500) + 499 / 500, 500: 1.0, 29999: 1.0}
    expected.update({30000: 0.1, 39999: 0.1, 40000: 0.01, 59999: 0.01})
    for step, value in expected.items():
        assert factor(step) == pytest.approx(value, rel=1e-12), step


# ----------------------------------------------------------------- the ImageNet detector of the CamVid table
def test_lite0_fpn_detector_loads_imagenet_encoder_and_trains_end_to_end(make_cfg) -> None:
    """The CamVid detection table's network: Faster R-CNN on the EfficientNet-Lite0 encoder whose
    ImageNet weights ship as a registry package (the only pretrained weights on these machines)."""
    cfg = make_cfg(["task=det", "backbone=fasterrcnn_lite0_fpn", "method=sada_mic"])
    net_cfg = OmegaConf.to_container(cfg.backbone, resolve=True)
    net_cfg.pop("weights")  # a full-detector file, loaded by the task module at fit
    detector = instantiate(net_cfg, num_classes=3)
    backbone = detector.model.backbone
    assert isinstance(backbone, SmpEncoderFPN) and detector.feature_levels == ["0", "1", "2", "pool"]
    assert detector.instance_dim == 256 and detector.roi_feature_levels == ["0", "1", "2"]
    reference = SmpEncoderFPN(backbone.encoder_name)
    load_encoder_weights_into(reference.encoder, cfg.backbone.backbone_weights, backbone.encoder_name)
    expected = reference.encoder.state_dict()
    loaded = backbone.encoder.state_dict()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    assert {k for k in expected if not k.endswith("num_batches_tracked")} == set(loaded)
    for name, value in loaded.items():
        assert torch.equal(value, expected[name]), name  # the file's weights and BN statistics
    metrics = train(cfg)
    assert "train/loss_sada" in metrics and "train/loss_mic" in metrics and "test/mAP50" in metrics
    parts = sum(metrics[f"train/{k}"] for k in ("loss_sup", "loss_sada", "loss_mic"))
    assert metrics["train/loss"] == pytest.approx(parts, rel=1e-5)
