"""HRDA: the crop box, the fusion, the multi-resolution loss, sliding inference, and that every
segmentation term reaches HRDA only through the network seam (MIC masks before the LR/HR split, FD
reads the LR context, pseudo-label margins weight every target term)."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mic_uda.models.hrda import (
    HRDANet,
    crop_box,
    draw_crop_box,
    fuse_scales,
    paste_average,
    scale_box,
    slide_boxes,
)
from mic_uda.train import build_datamodule
from mic_uda.uda.losses import weighted_cross_entropy

BASE = {"_target_": "mic_uda.models.daformer.DAFormerNet", "encoder_name": "mit_b0", "embed_dim": 16}
# MiT needs >= 32 px at stride 4 in its first stage: LR of a 64 px image at 0.5 is the smallest
TINY_HRDA = [
    "backbone=hrda_mit_b0",
    "data.size=64",
    "backbone.hr_crop_size=[32,32]",
    "backbone.attention_embed_dim=16",
    "backbone.test_crop_size=null",
    "backbone.test_stride=null",
]


def _net(**kw) -> HRDANet:
    torch.manual_seed(0)
    return HRDANet(4, {**BASE, "dropout": 0.0}, hr_crop_size=(32, 32), attention_embed_dim=16, **kw)


def test_crop_box_offsets_are_multiples_of_8_and_fit() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = [draw_crop_box(64, 96, (32, 32), 8, g) for _ in range(400)]
    assert all(y2 - y1 == 32 and x2 - x1 == 32 and y2 <= 64 and x2 <= 96 for y1, y2, x1, x2 in boxes)
    # offsets randint(0, (margin + 1) // 8) * 8: the official rule never reaches the last position
    assert {b[0] for b in boxes} == {0, 8, 16, 24}
    assert {b[2] for b in boxes} == {0, 8, 16, 24, 32, 40, 48, 56}
    assert draw_crop_box(32, 32, (32, 32), 8, g) == (0, 32, 0, 32)
    again = torch.Generator().manual_seed(0)
    assert [draw_crop_box(64, 96, (32, 32), 8, again) for _ in range(400)] == boxes
    with pytest.raises(ValueError, match="hr_crop_size 64x64 is larger than the training image 32x32"):
        draw_crop_box(32, 32, (64, 64), 8, g)


def test_fusion_on_hand_built_logits() -> None:
    lr = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2).clone()  # constant per class
    hr = torch.zeros(1, 2, 4, 4)
    hr[:, :, :2, :2] = torch.tensor([5.0, 3.0]).view(1, 2, 1, 1)  # pasted detail, top-left quarter
    att = torch.zeros(1, 2, 2, 2)
    att[:, 0, 0, 0], att[:, 1, 0, 0] = 0.25, 0.5  # class-wise attention, zero outside the crop cell
    fused = fuse_scales(lr, hr, att, 2.0)
    up_att = F.interpolate(att, scale_factor=2.0, mode="bilinear", align_corners=False)
    expected = up_att * hr + F.interpolate(
        (1 - att) * lr, scale_factor=2.0, mode="bilinear", align_corners=False
    )
    assert torch.equal(fused, expected)
    # far from the crop (bottom-right cell) the attention is 0 and the fusion is LR exactly
    assert torch.equal(fused[:, :, 3, 3], torch.tensor([[1.0, -2.0]]))
    # a fixed scalar attention: exactly att * HR + (1 - att) * LR
    assert torch.allclose(fuse_scales(lr, hr, 0.5, 2.0)[:, :, 0, 0], torch.tensor([[3.0, 0.5]]))


def test_training_fusion_is_lr_outside_the_crop_and_uses_the_cropped_detail() -> None:
    net = _net().eval()
    x = torch.rand(2, 3, 64, 96)
    box = (0, 32, 8, 40)
    with torch.no_grad():
        p = net.train_forward(x, box)
    assert torch.equal(p["hr_image"], x[..., 0:32, 8:40])
    assert p["lr_image"].shape[-2:] == (32, 48) and p["fused"].shape[-2:] == (16, 24)
    # the attention is zero outside the box's LR cells (stride 8 at 0.5: rows 0-3, cols 1-4)
    outside = torch.ones_like(p["mask"], dtype=torch.bool)
    outside[..., 0:4, 1:5] = False
    assert p["mask"][outside].sum() == 0 and (p["attention"][outside.expand_as(p["attention"])] == 0).all()
    up_lr = F.interpolate(p["lr_logits"], scale_factor=2.0, mode="bilinear", align_corners=False)
    # rows from 10 on (LR cells >= 5, one cell away from the box) are pure LR
    assert torch.equal(p["fused"][..., 10:, :], up_lr[..., 10:, :])
    assert not torch.equal(p["fused"][..., :8, 2:10], up_lr[..., :8, 2:10])  # HR contributes inside


def test_loss_is_09_fused_plus_01_detail_on_the_cropped_label_and_weight() -> None:
    net = _net().eval()
    x, y = torch.rand(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    y[:, :5] = 255
    w = torch.rand(2, 64, 64)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    with torch.no_grad():
        loss = net.train_loss(x, y, w, generator=g).loss
        g.set_state(state)
        box = draw_crop_box(64, 64, (32, 32), 8, g)
        p = net.train_forward(x, box)

    def ce(logits, labels, weight):
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return weighted_cross_entropy(up, labels, weight)

    expected = 0.9 * ce(p["fused"], y, w) + 0.1 * ce(p["hr_logits"], crop_box(y, box), crop_box(w, box))
    assert torch.allclose(loss, expected, rtol=0, atol=1e-6)
    uncropped = 0.9 * ce(p["fused"], y, w) + 0.1 * ce(p["hr_logits"], y[..., :32, :32], w[..., :32, :32])
    assert box[:3:2] != (0, 0) or not torch.allclose(loss, uncropped)


def test_views_name_the_lr_context_and_the_cropped_detail() -> None:
    net = _net()
    x, y = torch.rand(1, 3, 64, 64), torch.randint(0, 4, (1, 64, 64))
    g = torch.Generator().manual_seed(1)
    out = net.train_loss(x, y, generator=g, with_views=True)
    ctx, det = out.views["context"], out.views["detail"]
    assert ctx.image.shape[-2:] == (32, 32) and torch.equal(ctx.labels, y)  # LR image, full label
    assert det.image.shape[-2:] == (32, 32) and det.labels.shape == (1, 32, 32)
    g2 = torch.Generator().manual_seed(1)
    box = draw_crop_box(64, 64, (32, 32), 8, g2)
    assert torch.equal(det.labels, crop_box(y, box)) and torch.equal(det.image, crop_box(x, box))
    assert 0 < float(out.logs["train/hrda_attention"]) < 1


def test_sliding_windows_grid_and_average() -> None:
    # the official numbers: 1024 windows, stride 512 over 1024x2048 -> 3; 512 HR windows, stride 256 -> 9
    assert slide_boxes(1024, 2048, (1024, 1024), (512, 512)) == [
        (0, 1024, s, s + 1024) for s in (0, 512, 1024)
    ]
    assert len(slide_boxes(1024, 1024, (512, 512), (256, 256))) == 9
    assert slide_boxes(360, 480, (384, 384), (192, 192)) == [(0, 360, 0, 384), (0, 360, 96, 480)]
    pieces = [torch.ones(1, 1, 2, 2), 3 * torch.ones(1, 1, 2, 2)]
    avg = paste_average(pieces, [(0, 2, 0, 2), (0, 2, 1, 3)], (2, 3))
    assert torch.equal(avg, torch.tensor([[[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]]))
    assert scale_box((8, 40, 16, 48), 4) == (2, 10, 4, 12)


def test_forward_is_the_fused_lr_plus_sliding_hr_prediction() -> None:
    net = _net().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        lr_feats = net.base.forward_features(F.interpolate(x, scale_factor=0.5, mode="bilinear"))
        lr = net.base.decode(lr_feats)
        att = torch.sigmoid(net.attention_head(lr_feats))
        # 3x3 overlapping 32 px windows, stride 16, each decoded alone, averaged
        boxes = slide_boxes(64, 64, (32, 32), (16, 16))
        hr = paste_average(
            [net.base.decode(net.base.forward_features(crop_box(x, b))) for b in boxes],
            [scale_box(b, 4) for b in boxes],
            (16, 16),
        )
        expected = F.interpolate(fuse_scales(lr, hr, att, 2.0), size=(64, 64), mode="bilinear")
        assert torch.allclose(net(x), expected, atol=1e-5)
        # outer windows that cover the image: predict == forward
        whole = _net(test_crop_size=(64, 64), test_stride=(32, 32)).eval()
        assert torch.equal(whole.predict(x), whole(x))
        # one HR window covering the image == the single full-image HR pass
        single = _net(hr_slide_inference=False).eval()
        one_window = HRDANet(4, {**BASE, "dropout": 0.0}, hr_crop_size=(64, 64), attention_embed_dim=16)
        one_window.load_state_dict(single.state_dict())
        assert torch.allclose(one_window.eval()(x), single(x), atol=1e-6)


def test_scale_ablation_scores_one_branch_alone() -> None:
    """``hrda_scale=lr|hr`` (mic_uda.evaluate): attention 0 gives the context's upsampled logits,
    attention 1 the sliding HR windows' logits, everywhere; ``fused`` is the model as trained."""
    net = _net().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        fused = net(x)
        lr = net.base.decode(net.base.forward_features(F.interpolate(x, scale_factor=0.5, mode="bilinear")))
        hr = net.hr_slide_logits(x)
        net.set_inference_scale("lr")
        up_lr = F.interpolate(
            F.interpolate(lr, scale_factor=2.0, mode="bilinear"), size=(64, 64), mode="bilinear"
        )
        assert torch.allclose(net(x), up_lr, atol=1e-5)
        net.set_inference_scale("hr")
        assert torch.allclose(net(x), F.interpolate(hr, size=(64, 64), mode="bilinear"), atol=1e-5)
        net.set_inference_scale("fused")
        assert torch.equal(net(x), fused)
    assert not torch.allclose(up_lr, fused, atol=1e-3)  # the branches differ, so the test can tell
    with pytest.raises(ValueError, match=r"hrda_scale='both' is not one of \['fused', 'lr', 'hr'\]"):
        net.set_inference_scale("both")


EVAL_TINY = [
    "data.size=64",
    "data.datamodule.val.num_images=4",
    "data.datamodule.val_batch_size=4",
    "trainer=cpu",
    "+trainer.enable_progress_bar=false",
]


def test_evaluate_hrda_scale_through_the_entry_point(make_cfg, tmp_path) -> None:
    """``python -m mic_uda.evaluate ckpt_path=<HRDA run> hrda_scale=lr``: the LR branch's mIoU is what
    the checkpoint's student gives with attention 0; a non-HRDA checkpoint is refused in one line."""
    from mic_uda.evaluate import evaluate, load_module, set_hrda_scale
    from mic_uda.train import train

    short = ["trainer.max_steps=2", "trainer.val_check_interval=2", "method=source_only"]
    train(make_cfg([*TINY_HRDA, *short], out=tmp_path / "hrda"))
    ckpt = tmp_path / "hrda" / "checkpoints" / "last.ckpt"
    evals, cfgs = {}, {}
    for scale in ("fused", "lr"):
        cfgs[scale] = make_cfg(
            [f"ckpt_path={ckpt}", *EVAL_TINY, f"hrda_scale={scale}"],
            config_name="eval",
            out=tmp_path / f"eval_{scale}",
        )
        evals[scale] = evaluate(cfgs[scale])["test/student/mIoU"]
    module = load_module(ckpt).eval()
    module.student.set_inference_scale("lr")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.test(module, datamodule=instantiate(cfgs["lr"].data.datamodule, _recursive_=False), verbose=False)
    assert evals["lr"] == pytest.approx(float(trainer.callback_metrics["test/student/mIoU"]), abs=1e-6)
    assert evals["lr"] != evals["fused"]
    plain = SimpleNamespace(student=torch.nn.Conv2d(3, 4, 1), teacher=None)  # e.g. a DAFormer module
    with pytest.raises(ValueError, match=r"hrda_scale='hr': run/last\.ckpt is no HRDA checkpoint"):
        set_hrda_scale(plain, "hr", "run/last.ckpt")
    with pytest.raises(ValueError, match=r"hrda_scale='both' is not one of"):
        set_hrda_scale(module, "both", str(ckpt))


def test_batched_and_unbatched_outer_windows_agree() -> None:
    batched = _net(test_crop_size=(64, 64), test_stride=(32, 32)).eval()
    unbatched = _net(test_crop_size=(64, 64), test_stride=(32, 32), batched_slide=False).eval()
    x = torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        a, b = batched.predict(x), unbatched.predict(x)
    assert a.shape == (2, 4, 64, 128) and torch.allclose(a, b, atol=1e-5)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"backbone.scales \[0.5, 0.75\]"):
        HRDANet(4, BASE, scales=(0.5, 0.75))
    with pytest.raises(ValueError, match=r"test_crop_size and backbone\.test_stride"):
        HRDANet(4, BASE, test_crop_size=(64, 64))


def test_fixed_and_single_channel_attention() -> None:
    fixed = _net(fixed_attention=0.5)
    assert fixed.attention_head is None
    single = _net(attention_classwise=False)
    x = torch.rand(1, 3, 64, 64)
    assert single.attention_head(single.base.forward_features(x[..., ::2, ::2])).shape[1] == 1
    assert torch.isfinite(fixed.train_loss(x, torch.zeros(1, 64, 64, dtype=torch.long)).loss)


def test_deeplabv2_hrda_builds_with_its_own_attention_head() -> None:
    net = HRDANet(
        3,
        {"_target_": "mic_uda.models.deeplabv2.DeepLabV2Net"},
        hr_crop_size=(32, 32),
        attention_embed_dim=16,
    )
    assert type(net.attention_head).__name__ == "SummedASPP"
    x = torch.rand(1, 3, 64, 64)
    out = net.train_loss(x, torch.zeros(1, 64, 64, dtype=torch.long), generator=torch.Generator())
    assert torch.isfinite(out.loss)
    assert net.eval()(x).shape == (1, 3, 64, 64)


# ----------------------------------------------------------------- through the segmentation module
# an untrained teacher is never confident: threshold 0 so the pseudo-label weight is 1
CONFIDENT = ["method.pseudo_label.threshold=0.0"]


def _module_and_batch(make_cfg, overrides):
    cfg = make_cfg([*TINY_HRDA, *overrides])
    L.seed_everything(0)
    module = instantiate(cfg.task.module, _recursive_=False)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    batch = batch[0] if isinstance(batch, tuple) else batch
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    module.setup("fit")
    module.configure_optimizers()
    return module, batch


class Spy:
    """Records the arguments of a real call and passes it through."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


def _run_terms(module, batch, monkeypatch):
    spy = Spy(module.student.train_loss)
    monkeypatch.setattr(module.student, "train_loss", spy)
    monkeypatch.setattr(module, "manual_backward", lambda loss: loss.backward())
    monkeypatch.setattr(module, "finish_step", lambda logs: setattr(module, "_logs", logs))
    module.training_step(batch, 0)
    return spy, module._logs


def test_mic_masks_the_full_crop_before_the_lr_hr_split(make_cfg, monkeypatch) -> None:
    module, batch = _module_and_batch(
        make_cfg, ["method=mic", "method.mix=null", "data.mask_block_size=8", *CONFIDENT]
    )
    spy, logs = _run_terms(module, batch, monkeypatch)
    masked = spy.calls[-1][0][0]  # the MIC term's call: the full 64 px masked target, not a crop
    assert masked.shape[-2:] == (64, 64)
    fill = module.mask_fill().view(1, 3, 1, 1)
    blocks = (masked == fill).all(1)[:, ::8, ::8]  # 8 px blocks filled with the mean colour
    assert 0.4 < blocks.float().mean() < 0.95 and float(logs["train/loss_mic"]) > 0


def test_fd_with_hrda_reads_the_lr_context(make_cfg, monkeypatch, tmp_path) -> None:
    weights = tmp_path / "mit_b0.pth"
    torch.manual_seed(0)
    enc = HRDANet(8, BASE, hr_crop_size=(32, 32), attention_embed_dim=16).base.encoder
    torch.save(enc.state_dict(), weights)
    module, batch = _module_and_batch(
        make_cfg, ["method=dacs", "+method.fd={weight:0.005,classes:[5,6]}", f"backbone.weights={weights}"]
    )
    fd = module.terms["fd"].fd
    fd_spy = Spy(fd.forward)
    monkeypatch.setattr(fd, "forward", fd_spy)
    _run_terms(module, batch, monkeypatch)
    images, labels, last = fd_spy.calls[0][0]
    assert images.shape[-2:] == (32, 32) and labels.shape[-2:] == (64, 64)  # LR image, full label
    assert last.shape[-2:] == (1, 1)  # stage 4 of the 32 px LR image


def test_pseudo_label_margins_weight_every_target_term(make_cfg, monkeypatch) -> None:
    module, batch = _module_and_batch(make_cfg, ["method=mic", "method.mix=null", *CONFIDENT])
    batch["target"]["valid_mask"] = torch.zeros_like(batch["target"]["image"][:, 0])
    _, logs = _run_terms(module, batch, monkeypatch)
    assert float(logs["train/loss_mic"]) == 0.0  # every masked-target pixel is in the margin
    module2, batch2 = _module_and_batch(make_cfg, ["method=mic", "method.mix=null", *CONFIDENT])
    _, logs2 = _run_terms(module2, batch2, monkeypatch)
    assert float(logs2["train/loss_mic"]) > 0


HRDA_PRESETS = {  # preset: (source resize, target resize, margins, MIC images or None, seed, base network)
    "hrda_gta2cs": ([2560, 1440], [2048, 1024], [30, 240, 30, 30], None, 1, "DAFormerNet"),
    "mic_hrda_gta2cs": ([2560, 1440], [2048, 1024], [30, 240, 30, 30], "target", 2, "DAFormerNet"),
    "hrda_synthia2cs": ([2560, 1520], [2048, 1024], [30, 240, 30, 30], None, 0, "DAFormerNet"),
    "mic_hrda_synthia2cs": ([2560, 1520], [2048, 1024], [30, 240, 30, 30], "target", 0, "DAFormerNet"),
    "hrda_cs2acdc": ([2048, 1024], [1920, 1080], None, None, 0, "DAFormerNet"),
    "mic_hrda_cs2acdc": ([2048, 1024], [1920, 1080], None, "one_each", 0, "DAFormerNet"),
    "hrda_cs2darkzurich": ([2048, 1024], [1920, 1080], None, None, 0, "DAFormerNet"),
    "mic_hrda_cs2darkzurich": ([2048, 1024], [1920, 1080], None, "one_each", 0, "DAFormerNet"),
    "hrda_dlv2_gta2cs": ([2560, 1440], [2048, 1024], [30, 240, 30, 30], None, 0, "DeepLabV2Net"),
}


@pytest.mark.parametrize("preset", sorted(HRDA_PRESETS))
def test_hrda_presets_compose_to_the_official_configuration(make_cfg, preset) -> None:
    src, tgt, margins, mic_images, seed, base = HRDA_PRESETS[preset]
    cfg = make_cfg([f"experiment={preset}"], tiny=False)
    d, m, b = cfg.data.datamodule, cfg.method, cfg.backbone
    assert b._target_ == "mic_uda.models.hrda.HRDANet" and b.base._target_.endswith(base)
    assert list(b.scales) == [0.5, 1.0] and list(b.hr_crop_size) == [512, 512] and b.crop_divisible == 8
    assert b.hr_loss_weight == 0.1 and b.attention_classwise and b.hr_slide_inference
    assert list(b.test_crop_size) == [1024, 1024] and list(b.test_stride) == [512, 512]
    assert list(d.source.resize) == src and list(d.target.resize) == tgt and list(d.val.resize) == tgt
    assert d.source.crop_size == d.target.crop_size == 1024 and d.val.native_label
    assert (None if d.target.get("pseudo_margins") is None else list(d.target.pseudo_margins)) == margins
    assert m.pseudo_label.ignore_top == m.pseudo_label.ignore_bottom == 0  # margins replace 15/120
    assert cfg.data.rcs.enabled and cfg.data.rcs.min_crop_pixels == 6000  # min_crop_ratio 2.0 x 3000
    assert m.fd.weight == 0.005 and m.mix is not None and m.student_bn == "all"
    assert (m.mic.images if m.get("mic") else None) == mic_images
    if mic_images:
        assert m.mic.block_size == 64 and m.mic.ratio == 0.7
    assert cfg.seed == seed and cfg.trainer.max_steps == 40000 and cfg.trainer.val_check_interval == 4000
    assert cfg.trainer.precision == "32-true" and cfg.handover == "student"


def test_camvid_daformer_scale_preset_is_the_run_the_readme_reports(make_cfg) -> None:
    """The README's HRDA-around-DAFormer row ran as overrides of the 0.5-context preset; the named preset
    must compose to exactly that config, with the context at the DAFormer rows' input scale."""
    named = make_cfg(["experiment=camvid_day2dusk_hrda_mic_daformer_scale"], tiny=False)
    overrides = make_cfg(
        [
            "experiment=camvid_day2dusk_hrda_mic",
            "backbone.scales=[0.6666667,1.0]",
            "backbone.crop_divisible=24",
            "data.crop_size=288",
            "backbone.hr_crop_size=[144,144]",
        ],
        tiny=False,
    )
    assert OmegaConf.to_container(named) == OmegaConf.to_container(overrides)
    daformer = make_cfg(["experiment=camvid_day2dusk_mic"], tiny=False)
    b, d = named.backbone, named.data
    context_px = round(d.crop_size * b.scales[0])
    assert context_px == daformer.data.crop_size == 192 and list(b.hr_crop_size) == [144, 144]
    assert b.scales[0] == pytest.approx(daformer.data.resize[0] / 480, abs=1e-6)  # 320 of the 480 px frame
    assert b.crop_divisible * b.scales[0] == pytest.approx(16)  # HR offsets land on whole LR pixels
