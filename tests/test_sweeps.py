"""How people drive the entry point: sweeps (Optuna), clusters (submitit/SLURM), DDP, --help, and the
label-free objective a sweeper receives."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SEG
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mic_uda.objective import check_objective, objective_value, parse_objective
from mic_uda.train import train
from mic_uda.utils.hydra_utils import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "1"}


def compose_with_hydra(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The config including the ``hydra`` node (sweeper, launcher, help), as @hydra.main sees it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


# ----------------------------------------------------------------------------- objective
def test_objective_is_label_free_by_default_and_target_labels_need_opt_in(make_cfg) -> None:
    cfg = make_cfg([])
    assert cfg.optimized_metric == "-train/loss_sup_avg" and cfg.optimize_on_target_labels is False
    check_objective(cfg)
    assert parse_objective("-train/loss_sup_avg") == ("train/loss_sup_avg", -1.0)
    assert parse_objective("train/pseudo_weight") == ("train/pseudo_weight", 1.0)
    assert objective_value(cfg, {"train/loss_sup_avg": 0.25, "test/mIoU": 50.0}) == -0.25
    assert objective_value(cfg, {"test/mIoU": 50.0}) is None  # not logged -> None (and a warning)
    for key in ("val/mIoU", "test/student/mIoU", "-val/teacher/mIoU"):
        with pytest.raises(ValueError, match="optimize_on_target_labels=true"):
            check_objective(make_cfg([f"optimized_metric={key}"]))
        check_objective(make_cfg([f"optimized_metric={key}", "optimize_on_target_labels=true"]))
    with pytest.raises(ValueError, match="optimize_on_target_labels"):  # at start-up, before any training
        train(make_cfg(["optimized_metric=test/mIoU"]))


def test_train_average_is_the_mean_of_the_logged_steps(make_cfg) -> None:
    cfg = make_cfg(["method=source_only", "test=false"])
    metrics = train(cfg)
    with (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open() as f:
        logged = [float(r["train/loss_sup"]) for r in csv.DictReader(f) if r.get("train/loss_sup")]
    assert len(logged) == 3
    assert metrics["train/loss_sup_avg"] == pytest.approx(sum(logged) / 3, rel=1e-5)  # window 50 > 3 steps
    assert objective_value(cfg, metrics) == pytest.approx(-sum(logged) / 3, rel=1e-5)


def test_train_average_window_survives_resume(make_cfg, tmp_path: Path) -> None:
    import torch

    out = tmp_path / "resumable"
    short = ["method=source_only", "test=false", "trainer.val_check_interval=2"]
    train(make_cfg([*short, "trainer.max_steps=2"], out=out))
    metrics = train(make_cfg([*short, "trainer.max_steps=4", "ckpt_path=last"], out=out))
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("TrainAverages")]
    values = state["values"]["train/loss_sup"]
    assert len(values) == 4  # 2 steps before the restart + 2 after
    assert metrics["train/loss_sup_avg"] == pytest.approx(sum(values) / 4, rel=1e-5)


# ----------------------------------------------------------------------------- Optuna
def test_optuna_search_composes(tmp_path: Path) -> None:
    cfg = compose_with_hydra(["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert sweeper.direction == "maximize" and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert set(sweeper.params) == {
        "method.mic.ratio",
        "method.mic.block_size",
        "method.pseudo_label.threshold",
    }
    assert cfg.optimized_metric == "-train/loss_sup_avg"  # label-free objective by default
    assert sweeper.study_name == "mic_synthetic_seg"
    # every searched key exists in the composed method config (a typo here would only fail at sweep time)
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, key


def test_optuna_two_trials_through_the_entry_point(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mic_uda.train",
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=1",
            f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=${hydra.job.num}",
            *TINY_SEG,
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "test=false",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    assert set(results["best_params"]) == {
        "method.mic.ratio",
        "method.mic.block_size",
        "method.pseudo_label.threshold",
    }
    assert results["best_value"] < 0  # -(source loss)
    trials = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [p.name for p in trials] == ["0", "1"]
    ratios = {float(OmegaConf.load(t / ".hydra" / "config.yaml").method.mic.ratio) for t in trials}
    assert len(ratios) == 2 and all(0.3 <= r <= 0.9 for r in ratios)  # each trial got its sampled value

    table = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "collect_results.py"),
            str(sweep),
            "--metric",
            "train/loss_sup_avg",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = [ln for ln in table.splitlines() if ln.startswith("| seg | synthetic_seg | mic | ")]
    assert len(rows) == 2 and all("method.mic.ratio=" in r and "train/loss_sup_avg" in r for r in rows)


# ----------------------------------------------------------------------------- clusters, DDP
@pytest.mark.parametrize(("launcher", "hours"), [("slurm_daformer", 24), ("slurm_hrda", 48)])
def test_slurm_launcher_composes_without_submitting(launcher: str, hours: int) -> None:
    cfg = compose_with_hydra([f"hydra/launcher={launcher}", "experiment=mic_daformer_gta2cs"])
    la = cfg.hydra.launcher
    assert la._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (la.gpus_per_node, la.tasks_per_node, la.nodes, la.cpus_per_task, la.mem_gb) == (1, 1, 1, 10, 64)
    assert la.timeout_min == hours * 60 and la.signal_delay_s >= 120 and la.max_num_timeout == 0
    assert la.partition is None  # cluster-specific: given on the command line
    resolved = OmegaConf.to_container(la, resolve=True)  # every interpolation resolves
    assert resolved["submitit_folder"].endswith("/.submitit/%j") and resolved["name"]


def test_ddp_trainer_config() -> None:
    cfg = compose_with_hydra(["trainer=ddp", "trainer.devices=2", "trainer.sync_batchnorm=true"])
    t = cfg.trainer
    assert (t.strategy, t.accelerator, t.devices, t.sync_batchnorm, t.num_nodes) == ("ddp", "gpu", 2, True, 1)
    text = (CONFIG_DIR / "trainer" / "ddp.yaml").read_text()
    assert "effective batch = batch_size x devices x num_nodes" in text and "NOT rescaled" in text


# ----------------------------------------------------------------------------- --help
def _options(help_text: str, group: str) -> list[str]:
    line = next(ln for ln in help_text.splitlines() if ln.startswith(f"{group}: "))
    return line.split(": ", 1)[1].split(", ")


@pytest.mark.parametrize("command", [["-m", "mic_uda.train"], "console"])
def test_help_lists_config_groups_and_options(command) -> None:
    if command == "console":
        exe = shutil.which("mic-uda-train")
        if exe is None:
            pytest.skip("the package is not installed (pip install -e .): no mic-uda-train script")
        argv = [exe, "--help"]
    else:
        argv = [sys.executable, *command, "--help"]
    out = subprocess.run(argv, env=ENV, capture_output=True, text=True, check=True).stdout
    assert out.startswith("== mic_uda ")
    assert {"cls", "seg"} <= set(_options(out, "task"))
    assert {"dacs", "mic", "source_only", "oracle"} <= set(_options(out, "method"))
    assert {"synthetic_seg", "synthetic_cls", "gta2cs"} <= set(_options(out, "data"))
    assert "optuna" in _options(out, "hparams_search")
    assert {"slurm_daformer", "slurm_hrda"} <= set(_options(out, "hydra/launcher"))
    assert "python -m mic_uda.train -m method=source_only,dacs,mic seed=0,1,2" in out
