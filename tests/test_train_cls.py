"""Classification end to end through the real entry point: every method trains, validates,
checkpoints and evaluates on the embedded default; determinism; clear errors for wrong pairings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from mic_uda.evaluate import adapt_bn_to_target, evaluate, load_module
from mic_uda.tasks.cls import ClsUDAModule
from mic_uda.train import train
from mic_uda.uda.bn import batchnorm_layers, reestimate_bn_statistics

TERMS = {
    "source_only": set(),
    "oracle": set(),
    "sdat": {"loss_cdan", "loss_mcc"},
    "mic": {"loss_mic"},
    "sdat_mic": {"loss_cdan", "loss_mcc", "loss_mic"},
}


@pytest.mark.parametrize("method", list(TERMS))
def test_cls_train_then_evaluate(method: str, make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(["task=cls", f"method={method}"])
    metrics = train(cfg)
    for term in ("loss_cdan", "loss_mcc", "loss_mic"):
        assert (f"train/{term}" in metrics) == (term in TERMS[method]), term
    assert 0.0 <= metrics["test/acc"] <= 100.0 and 0.0 <= metrics["test/mean_class_acc"] <= 100.0
    assert ("val/teacher/acc" in metrics) == ("loss_mic" in TERMS[method])
    out = Path(cfg.paths.output_dir)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["task"] == "cls" and summary["primary_metric"] == "test/recalibrated/acc"
    ckpt = out / "checkpoints" / "last.ckpt"
    model = load_module(ckpt)
    assert isinstance(model, ClsUDAModule)
    if "loss_cdan" in TERMS[method]:
        assert model.adversarial is not None  # the discriminator is checkpointed with the model

    ecfg = make_cfg(
        [
            f"ckpt_path={ckpt}",
            "data=synthetic_cls",
            "data.image_size=16",
            "data.datamodule.val.num_images=8",
            "data.datamodule.val_batch_size=8",
            "trainer=cpu",
            "+trainer.enable_progress_bar=false",
        ],
        config_name="eval",
        out=tmp_path / "eval",
    )
    emetrics = evaluate(ecfg)
    assert emetrics["test/acc"] == pytest.approx(metrics["test/acc"])
    if method == "source_only":  # AdaBN evaluation: BN statistics re-estimated on the target images
        ecfg.bn_stats = "target"
        adapted = evaluate(ecfg)
        assert 0.0 <= adapted["test/acc"] <= 100.0
        # the glue: the student's statistics become exactly those of the target training images
        dm = instantiate(ecfg.data.datamodule, _recursive_=False)
        model, reference = load_module(ckpt), load_module(ckpt).student
        before = [bn.running_mean.clone() for bn in batchnorm_layers(model.student)]
        torch.manual_seed(0)  # the target set's training augmentation draws from the global RNG
        adapt_bn_to_target(model, dm)
        torch.manual_seed(0)
        assert reestimate_bn_statistics(reference, (b["image"] for b in dm.target_eval_dataloader())) > 0
        after = [(bn.running_mean, bn.running_var) for bn in batchnorm_layers(model.student)]
        expected = [(bn.running_mean, bn.running_var) for bn in batchnorm_layers(reference)]
        assert all(torch.equal(a[0], e[0]) and torch.equal(a[1], e[1]) for a, e in zip(after, expected))
        assert not all(torch.equal(b, a[0]) for b, a in zip(before, after))
        ecfg.bn_stats = "targets"
        with pytest.raises(ValueError, match="bn_stats='targets'"):
            evaluate(ecfg)


def test_cls_method_settings_specialise_shared_method_names(make_cfg) -> None:
    mic = make_cfg(["task=cls", "method=mic"]).method
    assert mic.mix is None and mic.teacher.alpha == 0.9 and mic.pseudo_label.weight_type == "probability"
    seg_mic = make_cfg(["method=mic"]).method
    assert seg_mic.mix is not None and seg_mic.pseudo_label.weight_type == "fraction"
    sdat_mic = make_cfg(["task=cls", "method=sdat_mic"]).method
    assert sdat_mic.sam.rho == 0.02 and sdat_mic.mcc.temperature == 2.0 and sdat_mic.mic.ratio == 0.7
    assert sdat_mic.cdan.entropy_conditioning is False


def test_cls_same_seed_same_result(make_cfg, tmp_path: Path) -> None:
    runs = [
        train(make_cfg(["task=cls", "method=sdat_mic", f"seed={s}"], out=tmp_path / f"r{i}"))
        for i, s in enumerate((3, 3, 4))
    ]
    keys = ["test/acc", "train/loss_mic", "train/loss_cdan", "train/loss_mcc"]
    assert [runs[0][k] for k in keys] == [runs[1][k] for k in keys]
    w = [load_module(tmp_path / f"r{i}" / "checkpoints" / "last.ckpt").state_dict() for i in range(3)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert not all(torch.equal(w[0][k], w[2][k]) for k in w[0])


def test_segmentation_method_under_cls_is_a_clear_error(make_cfg) -> None:
    with pytest.raises(ValueError, match=r"method\.mix.*task=cls.*supports"):
        train(make_cfg(["task=cls", "method=dacs"]))


def test_segmentation_backbone_under_cls_is_a_clear_error(make_cfg) -> None:
    with pytest.raises(ValueError, match="classification backbone"):
        train(make_cfg(["task=cls", "backbone=mit_b0", "trainer=cpu"], tiny=False))


def test_cls_methods_under_seg_are_a_clear_error(make_cfg) -> None:
    with pytest.raises(ValueError, match=r"method\.cdan"):
        train(make_cfg(["method=sdat"]))


@pytest.mark.parametrize(
    ("preset", "steps", "batch"), [("mic_sdat_visda", 15000, 32), ("mic_sdat_officehome", 30000, 24)]
)
def test_cls_paper_presets_are_the_official_runs(preset: str, steps: int, batch: int, make_cfg) -> None:
    cfg = make_cfg([f"experiment={preset}", "backbone.weights=w.safetensors"], tiny=False)
    m = cfg.method
    assert m.cdan.entropy_conditioning is False and m.mcc.temperature == 2.0 and m.sam.rho == 0.02
    assert m.mic.official_unweighted_update is True and m.student_bn == "all" and m.augment.draw == "run"
    assert m.augment.semantics == "kornia05"
    assert m.teacher.alpha == 0.9 and m.mic.block_size == 64 and m.mic.ratio == 0.7
    assert cfg.handover == "student"  # what the official code evaluates
    assert cfg.trainer.max_steps == steps and cfg.trainer.precision == "32-true"
    assert cfg.data.datamodule.batch_size == cfg.data.datamodule.target_batch_size == batch
    sch = cfg.task.module.scheduler
    assert sch._target_.endswith("inv_iteration_scheduler") and (sch.gamma, sch.power) == (0.001, 0.75)
    opt = cfg.task.module.optimizer
    assert (opt.lr, opt.momentum, opt.weight_decay, opt.nesterov) == (0.002, 0.9, 0.001, True)
    assert cfg.task.module.param_group_keys.backbone.lr_mult == 0.1
