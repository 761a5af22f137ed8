"""Faults during a run: pre-emption (SIGTERM), a crash while saving, non-finite losses, unreadable
samples, the SLURM requeue config, 2-process resumption, and the fault-check script."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import mic_uda.models.seg_base as seg_module  # where every seg network loss is computed
import mic_uda.train as train_module
from mic_uda.data.bad_samples import SkipBadSamples
from mic_uda.data.cls_files import ClassFolderDataset
from mic_uda.data.seg_files import FolderSegDataset
from mic_uda.train import train

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fault_check", ROOT / "scripts" / "fault_check.py")
fault_check = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(fault_check)  # type: ignore[union-attr]


def with_callbacks(monkeypatch: pytest.MonkeyPatch, *extra: L.Callback) -> None:
    """Runs of ``train`` get ``extra`` callbacks after the configured ones."""
    real = train_module.instantiate_dict
    monkeypatch.setattr(
        train_module,
        "instantiate_dict",
        lambda cfg, what: [*real(cfg, what), *extra] if what == "callbacks" else real(cfg, what),
    )


def csv_column(out: Path, key: str) -> list[float]:
    with open(out / "csv" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


# ----------------------------------------------------------------------------------- SIGTERM
def test_sigterm_writes_last_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    """A real `python -m mic_uda.train` process, SIGTERM once it trains: last.ckpt of the step it was in
    (ModelCheckpoint's own last.ckpt is off, so the file comes from PreemptionCheckpoint), exit status 0,
    and the run resumes from it with ckpt_path=auto."""
    t0 = time.monotonic()
    ok, observed = fault_check.check_sigterm(tmp_path)
    assert ok, observed
    run_dir = tmp_path / "sigterm_run"
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "global_step"
    ]
    assert time.monotonic() - t0 < 120
    cfg = fault_check.compose(
        [
            *fault_check.SYNTHETIC_SEG,
            *fault_check.RUN,
            f"trainer.max_steps={step + 1}",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            "ckpt_path=auto",
            "test=false",
        ],
        run_dir,
    )
    train(cfg)
    after = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert after["global_step"] == step + 1


def test_preemption_callback_is_on_by_default(make_cfg) -> None:
    cfg = make_cfg()
    assert cfg.callbacks.preemption_checkpoint._target_ == "mic_uda.callbacks.PreemptionCheckpoint"
    assert cfg.callbacks.preemption_checkpoint.dirpath == cfg.callbacks.model_checkpoint.dirpath


# ----------------------------------------------------------------------------------- atomic saving
class SimulatedKill(Exception):
    pass


def test_crash_while_saving_leaves_the_previous_last_ckpt(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    base = ["method=source_only", "callbacks.model_checkpoint.every_n_train_steps=1", "test=false"]
    train(make_cfg([*base, "trainer.max_steps=2", "trainer.val_check_interval=2"], out=out))
    last = out / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    real_save = torch.save

    def half_then_crash(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # the file gets half a checkpoint...
        raise SimulatedKill("died while writing")  # ...and the process dies

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(SimulatedKill):
        train(
            make_cfg(
                [*base, "trainer.max_steps=4", "trainer.val_check_interval=2", "ckpt_path=last"], out=out
            )
        )
    monkeypatch.setattr(torch, "save", real_save)
    assert last.read_bytes() == before
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_kill_during_save_subprocess(tmp_path: Path) -> None:
    ok, observed = fault_check.check_kill_during_save(tmp_path)
    assert ok, observed


def test_trainer_uses_the_atomic_checkpoint_io(make_cfg) -> None:
    from mic_uda.utils.checkpointing import AtomicCheckpointIO

    for t in ("cpu", "default", "ddp_sim", "slurm"):
        cfg = make_cfg([f"trainer={t}"])
        assert cfg.trainer.plugins[0]._target_ == "mic_uda.utils.checkpointing.AtomicCheckpointIO", t
    trainer = instantiate(make_cfg().trainer, logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_trainer_slurm_composes_auto_requeue(make_cfg) -> None:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from mic_uda.utils.checkpointing import slurm_environment

    cfg = make_cfg(["trainer=slurm"])
    plugins = [instantiate(p) for p in cfg.trainer.plugins]
    env = plugins[1]
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue
    assert env.requeue_signal == __import__("signal").SIGUSR1
    assert cfg.trainer.max_steps == 3  # everything else inherited from trainer=default (+ the test overrides)
    with pytest.raises(ValueError, match="not a signal name"):
        slurm_environment(requeue_signal="SIGFOO")


# ----------------------------------------------------------------------------------- non-finite losses
class StepRecorder(L.Callback):
    """Per batch: teacher/student weights and the optimiser's step counts, before and after."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @staticmethod
    def _snap(pl_module: Any) -> dict[str, Any]:
        opt = pl_module.optimizers().optimizer
        return {
            "teacher": [p.detach().clone() for p in pl_module.teacher.parameters()],
            "student": [p.detach().clone() for p in pl_module.student.parameters()],
            "opt_steps": [float(s["step"]) for s in opt.state.values() if "step" in s],
            "skipped": pl_module.skipped_steps,
            "global_step": pl_module.global_step,
            "sched_steps": pl_module.lr_schedulers().last_epoch,
            "lr": pl_module.optimizers().param_groups[0]["lr"],
        }

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.rows.append({"before": self._snap(pl_module)})

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.rows[-1]["after"] = self._snap(pl_module)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_nan_loss_step_is_skipped_and_counted(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """MIC computes 3 losses per step (sup, mix, mic): call 3 is the 2nd step's supervised loss."""
    monkeypatch.setattr(
        seg_module, "weighted_cross_entropy", fault_check.nan_after({3}, seg_module.weighted_cross_entropy)
    )
    rec = StepRecorder()
    with_callbacks(monkeypatch, rec)
    cfg = make_cfg(["method=mic", "trainer.max_steps=3"])
    metrics = train(cfg)
    assert len(rec.rows) == 4  # 3 optimiser steps + the skipped one
    bad = rec.rows[1]
    assert bad["after"]["skipped"] == 1 and bad["after"]["global_step"] == bad["before"]["global_step"]
    assert _same(bad["before"]["teacher"], bad["after"]["teacher"])  # no EMA update
    assert _same(bad["before"]["student"], bad["after"]["student"])  # no optimiser step
    assert bad["before"]["opt_steps"] == bad["after"]["opt_steps"]
    # the lr schedule does not advance on a skipped step (it would run ahead of global_step)
    assert bad["after"]["sched_steps"] == bad["before"]["sched_steps"]
    assert bad["after"]["lr"] == bad["before"]["lr"]
    assert all(r["after"]["sched_steps"] == r["after"]["global_step"] for r in rec.rows)
    good = rec.rows[2]
    assert not _same(good["before"]["teacher"], good["after"]["teacher"])
    assert good["after"]["opt_steps"][0] == good["before"]["opt_steps"][0] + 1
    assert metrics["train/skipped_steps"] == 1.0
    assert csv_column(Path(cfg.paths.output_dir), "train/skipped_steps") == [0.0, 1.0, 1.0, 1.0]


def test_consecutive_nan_losses_stop_with_a_clear_error(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        seg_module, "weighted_cross_entropy", fault_check.nan_after(None, seg_module.weighted_cross_entropy)
    )
    with pytest.raises(
        FloatingPointError, match=r"3 consecutive steps with a non-finite loss \(train/loss_sup"
    ) as e:
        train(make_cfg(["method=source_only", "task.module.max_bad_steps=3"]))
    assert "task.module.max_bad_steps=3" in str(e.value) and "lower the learning rate" in str(e.value)


# ----------------------------------------------------------------------------------- bad samples
def _seg_data(root: Path) -> Path:
    fault_check.write_seg_folder(root)
    fault_check.corrupt(root / "images" / "001.png")
    fault_check._png(root / "labels" / "003.png", np.zeros((28, 48), dtype=np.uint8))  # size mismatch
    return root


def test_bad_samples_stop_the_run_by_default_naming_the_file(tmp_path: Path, make_cfg) -> None:
    root = fault_check.write_seg_folder(tmp_path / "d")
    fault_check.corrupt(root / "images" / "001.png")
    with pytest.raises(OSError, match=r"images/001\.png: cannot read image \(UnidentifiedImageError"):
        train(make_cfg(fault_check.folder_seg(root), tiny=False))


def test_on_bad_sample_skip_replaces_and_counts_seg(tmp_path: Path, make_cfg) -> None:
    root = _seg_data(tmp_path / "d")
    cfg = make_cfg([*fault_check.folder_seg(root), "data.on_bad_sample=skip"], tiny=False)
    metrics = train(cfg)
    # 2 steps x 2 = one pass over the 4 source images: 001 (unreadable) and 003 (label size) replaced;
    # over the target (the same folder, images only): 001; val/test (4 images): 001 and 003
    assert metrics["train/bad_samples"] == 3.0
    assert metrics["test/bad_samples"] == 2.0 and metrics["val/bad_samples"] == 2.0
    assert 0 <= metrics["test/mIoU"] <= 100


def test_on_bad_sample_skip_replaces_and_counts_cls(tmp_path: Path, make_cfg) -> None:
    root = fault_check.write_cls_folder(tmp_path / "d")
    fault_check.corrupt(root / "b" / "2.png")
    overrides = [*fault_check.folder_cls(root), "trainer.max_steps=4", "trainer.val_check_interval=4"]
    with pytest.raises(OSError, match=r"b/2\.png: cannot read image"):
        train(make_cfg(overrides, tiny=False, out=tmp_path / "error"))
    metrics = train(make_cfg([*overrides, "data.on_bad_sample=skip"], tiny=False, out=tmp_path / "skip"))
    # one pass over source and target (the same folder): b/2 replaced in each; once in the evaluation
    assert metrics["train/bad_samples"] == 2.0 and metrics["test/bad_samples"] == 1.0


def test_skip_wrapper_next_index_and_giving_up(tmp_path: Path) -> None:
    root = _seg_data(tmp_path / "d")
    ds = SkipBadSamples(FolderSegDataset(root, num_classes=3), "val", max_consecutive=2)
    assert ds[1]["index"] == 2 and ds[1]["bad_samples"] == 1  # 001 unreadable -> 002
    assert ds[3]["index"] == 0 and ds[3]["bad_samples"] == 1  # 003 mismatched -> wraps to 000
    assert ds[0]["bad_samples"] == 0 and ds.num_classes == 3  # attributes of the wrapped dataset
    fault_check.corrupt(root / "images" / "002.png")
    with pytest.raises(RuntimeError, match=r"2 consecutive unreadable samples from #1 on .*001\.png"):
        ds[1]
    cls_root = fault_check.write_cls_folder(tmp_path / "c")
    fault_check.corrupt(cls_root / "a" / "3.png")
    cds = SkipBadSamples(ClassFolderDataset(cls_root, image_size=8), "source")
    assert int(cds[3]["label"]) == 1 and cds[3]["bad_samples"] == 1  # a/3 -> b/0


def test_on_bad_sample_rejects_unknown_modes(make_cfg) -> None:
    with pytest.raises(ValueError, match=r"data\.on_bad_sample='ignore'; allowed: error, skip"):
        train(make_cfg(["data.on_bad_sample=ignore"]))


# ----------------------------------------------------------------------------------- 2 processes
class KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise SimulatedKill(f"killed after step {self.step}")


def test_ddp_sim_resume_continues_exactly_on_rank_0_and_ranks_keep_their_own_streams(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trainer=ddp_sim (2 CPU processes, gloo), killed after step 3 and resumed with ckpt_path=last:
    training continues from step 3 and ends with the same weights (every parameter and rank 0's
    buffers), optimiser and generator states, training metrics and final test metrics as an
    uninterrupted 2-process run. The checkpoint holds both ranks' generator states, which differ (so do
    their MIC masks and ClassMix draws), and each rank continues its own; each rank reads its own shard
    of the data stream, resumed by position.

    What is not exact, by construction of DDP: the BatchNorm running statistics of ranks > 0. Each rank
    updates them from its own batches and the checkpoint (written by rank 0) has rank 0's. torch's DDP
    broadcasts rank 0's buffers to the other ranks in the first forward of a fit only (Lightning's
    manual optimisation runs forwards without gradient sync, which turns later broadcasts off), so an
    uninterrupted run's rank 1 keeps its own statistics while a resumed run's rank 1 restarts from
    rank 0's. Training does not read them (BN normalises with batch statistics; the teacher's BN too,
    method.teacher.bn=batch), so the weights stay identical, but rank 1 evaluates its half of the
    validation split with them: val/* metrics computed during a multi-process fit can differ slightly.
    The final test runs once on one device with rank 0's weights and matches exactly.

    Not compared with a 1-process run: that is a different computation by construction. Each rank
    takes batch_size samples (effective batch 2x), the ranks draw their masks and mixes from different
    generators, and BatchNorm statistics are per rank (no sync_batchnorm); even with the batch halved,
    the gradient of the mean of two per-rank losses differs from one loss over the pooled batch where
    pixel weights (pseudo-label confidence, ignore_index) normalise per rank.
    """
    base = [
        "trainer=ddp_sim",
        "method=mic",
        "trainer.max_steps=5",
        "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=1",
    ]
    ref = train(make_cfg(base, out=tmp_path / "ref"))
    out = tmp_path / "killed"
    with_callbacks(monkeypatch, KillAt(3))
    with pytest.raises(Exception, match="killed after step 3"):
        train(make_cfg(base, out=out))
    mid = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert mid["global_step"] == 3
    g0, g1 = mid["uda_generator_states"]
    assert not torch.equal(g0, g1)  # the ranks' streams differ
    monkeypatch.undo()
    resumed = train(make_cfg([*base, "ckpt_path=last"], out=out))
    assert ref.keys() == resumed.keys()
    differ = {k for k in ref if ref[k] != resumed[k]}
    assert all(k.startswith("val/") for k in differ), differ  # see the docstring
    assert any(k.startswith("test/") for k in ref) and any(k.startswith("train/") for k in ref)
    a, b = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for d in (tmp_path / "ref", out)
    )
    assert a["global_step"] == b["global_step"] == 5
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert all(torch.equal(x, y) for x, y in zip(a["uda_generator_states"], b["uda_generator_states"]))
    assert not torch.equal(*a["uda_generator_states"])
    for sa, sb in zip(a["optimizer_states"], b["optimizer_states"]):
        assert all(
            torch.equal(torch.as_tensor(t), torch.as_tensor(sb["state"][p][n]))
            for p, st in sa["state"].items()
            for n, t in st.items()
        )


# ----------------------------------------------------------------------------------- the script
def test_fault_check_script_passes(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fault_check.py"), "--keep", str(tmp_path / "work")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    table = proc.stdout
    assert proc.returncode == 0, table + proc.stderr[-3000:]
    for name, _, _ in fault_check.FAULTS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
        assert row.rstrip().endswith("| pass   |"), row
    assert f"{len(fault_check.FAULTS)}/{len(fault_check.FAULTS)} pass" in table
    print(f"fault_check.py: {time.monotonic() - t0:.1f}s")
