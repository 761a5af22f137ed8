"""Exact resumption: a run killed mid-training and restarted with ``ckpt_path=last`` ends with the same
metrics and weights as an uninterrupted run (CPU, same seed); the loaders' state behind it."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import mic_uda.train as train_module
from mic_uda.data.datamodule import UDADataModule
from mic_uda.data.resumable import ResumableLoader, ResumableSampler
from mic_uda.train import resolve_ckpt_path, train

_spec = importlib.util.spec_from_file_location(
    "fault_check", Path(__file__).parents[1] / "scripts" / "fault_check.py"
)
fault_check = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(fault_check)  # type: ignore[union-attr]


class SimulatedKill(Exception):
    """Stands for SIGKILL: nothing is saved on the way out (PreemptionCheckpoint ignores it)."""


class KillAt(L.Callback):
    """Dies right before training step ``step + 1``: after step ``step``'s checkpoint (and validation)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise SimulatedKill(f"killed after step {self.step}")


def run(
    make_cfg, out: Path, overrides: Sequence[str], monkeypatch: pytest.MonkeyPatch, kill_at: int | None = None
) -> dict[str, float]:
    real = train_module.instantiate_dict

    def with_kill(cfg: Any, what: str) -> list[Any]:
        objs = real(cfg, what)
        return [*objs, KillAt(kill_at)] if what == "callbacks" and kill_at is not None else objs

    monkeypatch.setattr(train_module, "instantiate_dict", with_kill)
    try:
        return train(make_cfg(list(overrides), out=out))
    finally:
        monkeypatch.setattr(train_module, "instantiate_dict", real)


def final_state(out: Path) -> dict[str, Any]:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def assert_same_end(a: dict[str, float], b: dict[str, float], out_a: Path, out_b: Path) -> None:
    assert a.keys() == b.keys()
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k] and not (a[k] != a[k] and b[k] != b[k])}  # nan == nan
    assert not diff, f"final metrics differ: {diff}"
    ca, cb = final_state(out_a), final_state(out_b)
    assert ca["global_step"] == cb["global_step"]
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), f"weights differ: {k}"
    for sa, sb in zip(ca["optimizer_states"], cb["optimizer_states"]):
        for pid, st in sa["state"].items():
            for name, t in st.items():
                assert torch.equal(torch.as_tensor(t), torch.as_tensor(sb["state"][pid][name])), (pid, name)
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    assert torch.equal(ca["uda_generator_state"], cb["uda_generator_state"])
    loader_state = [c["loops"]["fit_loop"]["state_dict"]["combined_loader"] for c in (ca, cb)]
    assert loader_state[0] == loader_state[1] and len(loader_state[0]) == 2  # source, target positions


# source 8 images (4 batches of 2), target 6 (3 batches): an epoch is 4 steps and the target loader
# restarts inside epochs (max_size_cycle). Kills at step 4 (an epoch boundary) and step 6 (mid-epoch,
# right after a validation), checkpoints every step, validation every 3.
SEG = [
    "method=mic",
    "data.datamodule.target.num_images=6",
    "trainer.max_steps=9",
    "trainer.val_check_interval=3",
    "callbacks.model_checkpoint.every_n_train_steps=1",
]


def test_seg_resume_after_kills_is_exact(make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = run(make_cfg, tmp_path / "ref", SEG, monkeypatch)
    out = tmp_path / "killed"
    with pytest.raises(SimulatedKill):
        run(make_cfg, out, SEG, monkeypatch, kill_at=4)
    assert final_state(out)["global_step"] == 4
    with pytest.raises(SimulatedKill):
        run(make_cfg, out, [*SEG, "ckpt_path=last"], monkeypatch, kill_at=6)
    assert final_state(out)["global_step"] == 6
    resumed = run(make_cfg, out, [*SEG, "ckpt_path=auto"], monkeypatch)
    assert_same_end(ref, resumed, tmp_path / "ref", out)


def test_hrda_mic_resume_after_a_kill_is_exact(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HRDA draws its detail crops from the module's generator: a resumed run draws the same ones."""
    hrda = [
        *SEG[:2],
        "trainer.max_steps=5",
        "trainer.val_check_interval=5",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "backbone=hrda_mit_b0",
        "data.size=64",
        "data.mask_block_size=8",
        "backbone.hr_crop_size=[32,32]",
        "backbone.attention_embed_dim=16",
        "backbone.test_crop_size=[64,64]",
        "backbone.test_stride=[32,32]",
    ]
    ref = run(make_cfg, tmp_path / "ref", hrda, monkeypatch)
    out = tmp_path / "killed"
    with pytest.raises(SimulatedKill):
        run(make_cfg, out, hrda, monkeypatch, kill_at=3)
    resumed = run(make_cfg, out, [*hrda, "ckpt_path=last"], monkeypatch)
    assert any("attention_head" in k for k in final_state(out)["state_dict"])
    assert_same_end(ref, resumed, tmp_path / "ref", out)


# 16 source / 12 target images in batches of 4 (4 and 3 per pass); SDAT (CDAN, MCC, SAM) + MIC.
CLS = [
    "task=cls",
    "method=sdat_mic",
    "data.datamodule.target.num_images=12",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "callbacks.model_checkpoint.every_n_train_steps=1",
]


def test_cls_resume_after_a_kill_is_exact(make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = run(make_cfg, tmp_path / "ref", CLS, monkeypatch)
    out = tmp_path / "killed"
    with pytest.raises(SimulatedKill):
        run(make_cfg, out, CLS, monkeypatch, kill_at=5)
    resumed = run(make_cfg, out, [*CLS, "ckpt_path=last"], monkeypatch)
    assert_same_end(ref, resumed, tmp_path / "ref", out)


# ----------------------------------------------------------------------------------- the loaders
def _batches(loader: ResumableLoader, n: int) -> list[Any]:
    out: list[Any] = []
    while len(out) < n:  # iter() again when a pass ends, as Lightning's max_size_cycle does
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def _same(a: Any, b: Any) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.mark.parametrize(("num_workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_loader_state_resumes_the_same_batches_and_augmentations(num_workers: int, persistent: bool) -> None:
    """Order and per-sample augmentation (random flips from the global RNG) are functions of the
    stream position: a fresh loader given the state continues identically, with or without workers;
    iterators abandoned mid-pass (epoch ends) lose nothing; ranks read disjoint shards."""
    from mic_uda.data.synthetic_seg import SyntheticSegDataset

    ds = SyntheticSegDataset("source", num_images=10, size=16, seed=0, hflip=True)

    def loader(rank: int = 0, world: int = 1) -> ResumableLoader:
        return ResumableLoader(
            ds,
            batch_size=2,
            seed=3,
            stream=0,
            num_replicas=world,
            rank=rank,
            num_workers=num_workers,
            persistent_workers=persistent,
        )

    ref = _batches(loader(), 12)  # 2.4 passes over the data
    first = loader()
    it = iter(first)
    part = [next(it) for _ in range(3)]  # abandoned mid-pass, workers may have prefetched more
    state = first.state_dict()
    assert state["position"] == 6
    again = loader()
    again.load_state_dict(state)
    rest = _batches(again, 9)
    assert all(_same(x, y) for x, y in zip(part + rest, ref))
    flips = [torch.equal(b["image"][0], ds[int(b["index"][0])]["image"]) for b in ref]
    assert not all(flips) and any(flips)  # augmentation happens (and is reproduced above)
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(_same(x, y) for x, y in zip(_batches(loader(), 4), ref))
    r0, r1 = (loader(r, 2) for r in (0, 1))
    i0 = torch.cat([b["index"] for b in _batches(r0, 2)])
    i1 = torch.cat([b["index"] for b in _batches(r1, 2)])
    assert len(set(i0.tolist()) | set(i1.tolist())) == 8


def test_rare_class_sampling_draws_resume_exactly(tmp_path: Path) -> None:
    """RCS draws (class, image, crop, flip) from a generator re-seeded per sample by the loader: the
    loader's position is its whole state, in any process."""
    from mic_uda.data.rcs import RareClassSampling, RCSConfig
    from mic_uda.data.seg_files import FolderSegDataset

    fault_check.write_seg_folder(tmp_path / "d", n=6)
    ds = FolderSegDataset(tmp_path / "d", num_classes=3, crop_size=16, hflip=True)
    rcs = RareClassSampling(ds, RCSConfig(enabled=True, min_pixels=10, cache_dir=str(tmp_path / "cache")))

    def loader() -> ResumableLoader:
        return ResumableLoader(rcs, batch_size=2, seed=1, stream=0)

    ref = _batches(loader(), 6)
    first = loader()
    part = _batches(first, 2)
    again = loader()
    again.load_state_dict(first.state_dict())
    assert all(_same(x, y) for x, y in zip(part + _batches(again, 4), ref))
    assert len({tuple(b["index"].tolist()) for b in ref}) > 1


def test_sampler_covers_every_sample_once_per_pass() -> None:
    s = ResumableSampler(dataset_len=7, batch_size=2, seed=0, stream=0)
    assert len(s) == 6  # 3 whole batches per iteration; no sample dropped: passes continue the stream
    keys = [s.key(p) for p in range(14)]
    assert sorted(i for i, _ in keys[:7]) == list(range(7)) and sorted(i for i, _ in keys[7:]) == list(
        range(7)
    )
    assert len({seed for _, seed in keys}) == 14  # every position its own augmentation seed


def test_datamodule_train_loaders_are_stateful_and_seeded() -> None:
    from lightning.fabric.utilities.types import _Stateful

    cfg = {
        "_target_": "mic_uda.data.synthetic_seg.SyntheticSegDataset",
        "num_images": 6,
        "size": 16,
        "hflip": True,
    }
    dm = UDADataModule(cfg, {**cfg, "domain": "target"}, {**cfg, "split": "val"}, seed=5)
    dm.setup("fit")
    combined = dm.train_dataloader()
    assert all(isinstance(dl, _Stateful) for dl in combined.flattened)
    assert [dl.sampler.seed for dl in combined.flattened] == [5, 5]
    assert [dl.sampler.stream for dl in combined.flattened] == [0, 1]


def test_ckpt_path_auto_and_last(tmp_path: Path) -> None:
    assert resolve_ckpt_path("auto", str(tmp_path)) is None  # nothing yet: a fresh start
    assert resolve_ckpt_path("last", str(tmp_path)) is None
    assert resolve_ckpt_path(None, str(tmp_path)) is None
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert resolve_ckpt_path("auto", str(tmp_path)) == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    import os

    os.utime(last, (1, 1))  # the SLURM requeue checkpoint is newer
    assert resolve_ckpt_path("auto", str(tmp_path)) == str(hpc)
    assert resolve_ckpt_path("last", str(tmp_path)) == str(last)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), str(tmp_path))
