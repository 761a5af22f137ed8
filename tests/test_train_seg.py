"""End to end through the real entry point: every method trains, validates, checkpoints, evaluates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mic_uda.evaluate import evaluate, load_module
from mic_uda.train import train


@pytest.mark.parametrize("method", ["source_only", "dacs", "mic", "oracle"])
def test_train_then_evaluate(method: str, make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg([f"method={method}"])
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert 0.0 <= metrics["test/mIoU"] <= 100.0
    assert "val/student/mIoU" in metrics
    assert ("val/teacher/mIoU" in metrics) == (method in ("dacs", "mic"))
    assert ("train/pl_share_sidewalk" in metrics) == (method in ("dacs", "mic"))
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["method"] == method and summary["metrics"]["test/mIoU"] == metrics["test/mIoU"]
    # the run's wall time, kept in the file when the folder is copied
    assert 0.0 < summary["wall_s"] < 600.0
    assert (out / "csv" / "metrics.csv").is_file()

    ecfg = make_cfg(
        [
            f"ckpt_path={ckpt}",
            "data.size=32",
            "data.datamodule.val.num_images=4",
            "save_predictions=true",
            "trainer=cpu",
            "+trainer.enable_progress_bar=false",
        ],
        config_name="eval",
        out=tmp_path / "eval",
    )
    emetrics = evaluate(ecfg)
    # the final weights evaluated again on the same split give the same numbers
    assert emetrics["test/mIoU"] == pytest.approx(metrics["test/mIoU"])
    assert len(list((tmp_path / "eval" / "predictions").glob("*.png"))) == 4


def test_same_seed_same_metrics_other_seed_differs(make_cfg, tmp_path: Path) -> None:
    runs = [
        train(make_cfg(["method=mic", f"seed={s}"], out=tmp_path / f"r{i}")) for i, s in enumerate((1, 1, 2))
    ]
    keys = ["test/mIoU", "train/loss_mic", "train/loss_mix", "val/teacher/mIoU"]
    assert [runs[0][k] for k in keys] == [runs[1][k] for k in keys]
    assert [runs[0][k] for k in keys] != [runs[2][k] for k in keys]
    w = [load_module(tmp_path / f"r{i}" / "checkpoints" / "last.ckpt").state_dict() for i in range(3)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert not all(torch.equal(w[0][k], w[2][k]) for k in w[0])


def test_last_checkpoint_holds_the_final_weights_between_periodic_saves(make_cfg, tmp_path: Path) -> None:
    """max_steps not a multiple of the save interval: last.ckpt is still the model the run tested."""
    cfg = make_cfg(["method=source_only", "trainer.max_steps=4"])  # saves every 3 steps
    metrics = train(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
    assert sorted(p.name for p in ckpts.iterdir()) == ["final.ckpt", "last.ckpt", "step_000004.ckpt"]
    ecfg = make_cfg(
        [
            f"ckpt_path={ckpts / 'last.ckpt'}",
            "data.size=32",
            "data.datamodule.val.num_images=4",
            "trainer=cpu",
        ],
        config_name="eval",
        out=tmp_path / "eval",
    )
    assert evaluate(ecfg)["test/mIoU"] == pytest.approx(metrics["test/mIoU"])
    ecfg.ckpt_path = str(ckpts / "final.ckpt")  # the handed-over, recalibrated model
    assert evaluate(ecfg)["test/mIoU"] == pytest.approx(metrics["test/recalibrated/mIoU"])


def test_fast_dev_run_override(make_cfg) -> None:
    metrics = train(make_cfg(["++trainer.fast_dev_run=true"]))
    assert "train/loss" in metrics


@pytest.mark.parametrize("logger", ["tensorboard", "wandb", "many"])
def test_loggers_write_offline(logger: str, make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(
        [f"logger={logger}", "method=source_only", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    )
    train(cfg)
    out = Path(cfg.paths.output_dir)
    if logger in ("tensorboard", "many"):
        assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    if logger == "many":
        assert (out / "csv" / "metrics.csv").is_file()
    if logger == "wandb":
        runs = list((out / "wandb").glob("offline-run-*"))
        assert runs and list(runs[0].glob("*.wandb"))


def test_resume_from_last_checkpoint_continues(make_cfg, tmp_path: Path) -> None:
    out = tmp_path / "resumable"
    train(make_cfg(["method=mic", "trainer.max_steps=2", "trainer.val_check_interval=2"], out=out))
    first = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert first["global_step"] == 2 and "uda_generator_state" in first
    train(
        make_cfg(
            ["method=mic", "trainer.max_steps=4", "trainer.val_check_interval=2", "ckpt_path=last"], out=out
        )
    )
    second = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert second["global_step"] == 4
    assert not torch.equal(first["uda_generator_state"], second["uda_generator_state"])


def test_gpu_trainer_without_cuda_is_a_clear_error(make_cfg) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: trainer=gpu is valid here")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        train(make_cfg(["trainer=gpu"]))


def test_ddp_sim_two_cpu_processes_train_and_evaluate(make_cfg) -> None:
    metrics = train(make_cfg(["trainer=ddp_sim", "method=mic"]))
    assert 0.0 <= metrics["test/mIoU"] <= 100.0 and "train/loss_mic" in metrics


def test_rank_generators_differ_across_ranks_and_repeat_per_seed() -> None:
    from mic_uda.uda.masking import block_mask
    from mic_uda.utils.seeding import rank_generator

    def mask(seed: int, rank: int) -> torch.Tensor:
        return block_mask(4, 64, 64, 8, 0.7, rank_generator(seed, rank))

    assert torch.equal(mask(0, 0), mask(0, 0))
    assert not torch.equal(mask(0, 0), mask(0, 1))
    assert not torch.equal(mask(0, 0), mask(1, 0))


def test_init_from_starts_a_new_run_from_another_runs_student(make_cfg, tmp_path: Path) -> None:
    source = train(make_cfg(["method=source_only"], out=tmp_path / "burn_in"))
    ckpt = tmp_path / "burn_in" / "checkpoints" / "last.ckpt"
    # no training: the run's test evaluates exactly the loaded student
    loaded = train(make_cfg(["method=mic", f"init_from={ckpt}", "train=false"], out=tmp_path / "loaded"))
    assert loaded["test/mIoU"] == source["test/mIoU"]
    trained = train(make_cfg(["method=mic", f"init_from={ckpt}"], out=tmp_path / "adapted"))
    assert "train/loss_mic" in trained
    state = torch.load(
        tmp_path / "adapted" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert state["global_step"] == 3  # a new run: its own step count, not the burn-in's continued


def test_init_from_errors_name_the_file(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("init_from='/nowhere.ckpt'")):
        train(make_cfg(["init_from=/nowhere.ckpt"]))
    torch.save({"state_dict": {"other.weight": torch.zeros(1)}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match=re.escape("no 'student.*' weights")):
        train(make_cfg([f"init_from={tmp_path / 'foreign.ckpt'}"]))
    torch.save({"state_dict": {"student.head.weight": torch.zeros(1)}}, tmp_path / "other_net.ckpt")
    with pytest.raises(ValueError, match="does not fit this run's network"):
        train(make_cfg([f"init_from={tmp_path / 'other_net.ckpt'}"]))
