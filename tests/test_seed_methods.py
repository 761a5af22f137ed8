"""PiPa, RCCR and IR2F (SPEC 5-7) through the real ``mic_uda.train.train``: every method config with the
tiny overrides (the embedded synthetic data), one on HRDA, an exact resume of a queue-holding method,
and the paper presets' key values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import mic_uda.train as train_module
from mic_uda.tasks.method import parse_method
from mic_uda.tasks.seg_terms import build_seg_terms
from mic_uda.train import train

# thresholds low enough that a 3-step run of random networks has anchors, pairs and counted cells
# (32 px images: PiPa's crops are the whole image, as MiT needs >= 32 px)
LOOSE = {
    "pipa": [
        "method.pipa.pixel.min_pixels=4",
        "method.pipa.pixel.max_views=4",
        "method.pipa.patch.crop_fraction=1.0",
        "method.pipa.patch.confidence=0.0",
    ],
    "rccr": ["method.rccr.confidence=0.0", "method.rccr.ramp=false"],
    "ir2f": [],
}
# the term's loss key and a parameter (name fragment) that must be trained
CHECKS = {
    "pipa": (["train/loss_pipa_pixel", "train/loss_pipa_patch"], ["pixel.proj_head", "patch.proj_head"]),
    "rccr": (["train/loss_rccr"], ["rc.proj_head", "rc.teacher_head"]),
    "ir2f": (["train/loss_ir2f"], ["ir2f.inr_head"]),
}


class TermStates(L.Callback):
    """The terms' state dicts at the start and the end of fitting."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = {k: v.detach().clone() for k, v in pl_module.terms.state_dict().items()}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end = {k: v.detach().clone() for k, v in pl_module.terms.state_dict().items()}


def run_with(make_cfg, overrides: list[str], monkeypatch: pytest.MonkeyPatch, out: Path | None = None):
    states = TermStates()
    real = train_module.instantiate_dict

    def with_states(cfg: Any, what: str) -> list[Any]:
        objs = real(cfg, what)
        return [*objs, states] if what == "callbacks" else objs

    monkeypatch.setattr(train_module, "instantiate_dict", with_states)
    try:
        metrics = train(make_cfg(overrides, out=out))
    finally:
        monkeypatch.setattr(train_module, "instantiate_dict", real)
    return metrics, states


def assert_trained(metrics: dict[str, float], states: TermStates, family: str) -> None:
    losses, params = CHECKS[family]
    for key in losses:
        assert key in metrics and math.isfinite(metrics[key]), (key, metrics.get(key))
    for fragment in params:
        keys = [k for k in states.start if fragment in k and k.endswith("weight")]
        assert keys, f"no {fragment} parameters in {list(states.start)[:8]}"
        assert any(not torch.equal(states.start[k], states.end[k]) for k in keys), f"{fragment} unchanged"


@pytest.mark.parametrize("base", ["dacs", "mic"])
@pytest.mark.parametrize("family", ["pipa", "rccr", "ir2f"])
def test_method_trains_through_the_entry_point(make_cfg, monkeypatch, base: str, family: str) -> None:
    metrics, states = run_with(
        make_cfg, [f"method={base}_{family}", "test=false", *LOOSE[family]], monkeypatch
    )
    assert_trained(metrics, states, family)
    if base == "mic":
        assert math.isfinite(metrics["train/loss_mic"])
    if family == "ir2f":  # IR2F's own mixture replaces ClassMix
        assert "train/loss_mix" not in metrics and 0.0 < metrics["train/ir2f_r_target"] < 1.0
    if family == "pipa":
        assert metrics["train/pipa_patch_active"] == 1.0  # start_fraction 1/6 of 3 steps: from step 0


TINY_HRDA = [
    "backbone=hrda_mit_b0",
    "data.size=64",
    "data.mask_block_size=8",
    "backbone.hr_crop_size=[32,32]",
    "backbone.attention_embed_dim=16",
    "backbone.test_crop_size=null",
    "backbone.test_stride=null",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
]


def test_rccr_and_pipa_on_hrda(make_cfg, monkeypatch) -> None:
    """HRDA answers forward_with_features with its LR-context stages; PiPa's pixel contrast reads the
    detail view (64 px images: 32 px detail crop)."""
    over = [
        *TINY_HRDA,
        "test=false",
        "method=mic_pipa",
        *LOOSE["pipa"],  # crop_fraction 1.0: HRDA's LR pass of a 64 px crop is MiT's smallest input
    ]
    metrics, states = run_with(make_cfg, over, monkeypatch)
    assert_trained(metrics, states, "pipa")


def test_hrda_forward_with_features_is_forward_and_context_stages() -> None:
    from test_hrda import _net

    net = _net().eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits, stages = net.forward_with_features(x)
        lr = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        context = net.base.forward_features(lr)
        assert torch.equal(logits, net(x))
    assert [s.shape[-1] for s in stages] == [8, 4, 2, 1]  # the 32 px LR pass: strides 8..64 of x
    assert all(torch.equal(a, b) for a, b in zip(stages, context))


def test_unknown_argument_names_the_key(make_cfg) -> None:
    cfg = make_cfg(["method=dacs_rccr", "+method.rccr.temprature=0.2"])
    from hydra.utils import instantiate

    with pytest.raises(Exception, match=r"method\.rccr\.temprature is not an argument of RegionalContrast"):
        instantiate(cfg.task.module, _recursive_=False)


def test_official_untrained_head_keeps_rccr_head_out_of_the_optimiser() -> None:
    method = parse_method({"name": "x", "mix": {}, "rccr": {"official_untrained_head": True}})
    from test_hrda import _net

    terms = build_seg_terms(method, 4, 255, _net())
    assert not any(p.requires_grad for p in terms["rccr"].parameters())


# ------------------------------------------------------------------------------- exact resume
RESUME = [
    "method=mic_rccr",
    *LOOSE["rccr"],
    "data.datamodule.target.num_images=6",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "callbacks.model_checkpoint.every_n_train_steps=1",
]


def test_rccr_resume_after_a_kill_is_exact(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """The memory bank (features, labels, validity, pointer) and the momentum head are checkpointed:
    killed at step 4 and resumed, the run ends with the same weights and queue as an uninterrupted one."""
    from test_resume import SimulatedKill, assert_same_end, final_state, run

    ref = run(make_cfg, tmp_path / "ref", RESUME, monkeypatch)
    out = tmp_path / "killed"
    with pytest.raises(SimulatedKill):
        run(make_cfg, out, RESUME, monkeypatch, kill_at=4)
    resumed = run(make_cfg, out, [*RESUME, "ckpt_path=last"], monkeypatch)
    state = final_state(out)["state_dict"]
    queue = [k for k in state if ".queue." in k]
    assert {k.rsplit(".", 1)[1] for k in queue} == {"features", "labels", "valid", "ptr"}
    assert int(state[next(k for k in queue if k.endswith("ptr"))]) == 6 % 3
    assert bool(state[next(k for k in queue if k.endswith("valid"))].any())
    assert_same_end(ref, resumed, tmp_path / "ref", out)  # every state_dict entry, queues included


# ------------------------------------------------------------------------------- paper presets
@pytest.mark.parametrize(
    ("preset", "steps", "patch_weight", "network"),
    [
        ("pipa_hrda_gta2cs", 60000, 0.01, "HRDANet"),
        ("pipa_hrda_synthia2cs", 60000, 0.01, "HRDANet"),
        ("pipa_daformer_gta2cs", 60000, 0.1, "DAFormerNet"),
    ],
)
def test_pipa_presets(make_cfg, preset: str, steps: int, patch_weight: float, network: str) -> None:
    cfg = make_cfg([f"experiment={preset}"], tiny=False)
    method = parse_method(cfg.method)
    assert cfg.trainer.max_steps == steps and cfg.backbone._target_.endswith(network)
    assert method.pipa["patch"]["weight"] == patch_weight and method.pipa["pixel"]["weight"] == 0.1
    assert method.fd is not None and method.mix is not None and method.teacher.alpha == 0.999


@pytest.mark.parametrize("data", ["gta2cs", "synthia2cs"])
def test_rccr_presets_compose_to_the_official_recipe(make_cfg, data) -> None:
    cfg = make_cfg([f"experiment=rccr_dlv2_{data}"], tiny=False)
    opt = cfg.task.module.optimizer
    assert cfg.data.name == data and cfg.backbone._target_.endswith("DeepLabV2Net")
    assert list(cfg.backbone.dilations) == [6, 12] and cfg.method.name == "dacs_rccr"
    assert opt._target_ == "torch.optim.SGD" and opt.lr == 2.5e-4 and opt.momentum == 0.9
    assert opt.weight_decay == 5e-4 and opt.betas is None  # dropped before SGD is built
    assert cfg.task.module.param_group_keys.head.lr_mult == 10.0
    assert cfg.task.module.param_group_keys.norm.decay_mult == 1.0
    assert cfg.task.module.scheduler.warmup_steps == 0 and cfg.task.module.scheduler.power == 0.9
    assert cfg.trainer.max_steps == 250000 and cfg.method.teacher.alpha == 0.99
    r = cfg.method.rccr
    assert r.weight == 0.01 and r.ramp and r.temperature == 0.1 and r.confidence == 0.75 and r.proj_dim == 128
    assert not r.official_untrained_head and not r.official_start_iter
    assert cfg.method.get("fd") is None and not cfg.data.rcs.enabled


@pytest.mark.parametrize("data", ["gta2cs", "cs2darkzurich"])
def test_ir2f_presets_replace_classmix_and_keep_the_official_switches(make_cfg, data) -> None:
    cfg = make_cfg([f"experiment=ir2f_daformer_{data}"], tiny=False)
    m = cfg.method
    assert "interpretation" in cfg.tags and m.name == "dacs_ir2f"
    assert m.mix is None and m.ir2f.mix_classes == "batch_union" and m.ir2f.mix_include_ignore
    assert m.fd.weight == 0.005 and m.student_bn == "all" and m.pseudo_label.weight_scope == "batch"
    assert cfg.data.name == data and cfg.backbone.encoder_name == "mit_b5"
