"""mic_uda as a library (issue 18): the public API, the packaged configs (wheel, installed venv), user config
dirs and the recipe in force, quiet runs, and clear errors for files that are not weights/checkpoints."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.warnings import PossibleUserWarning

import mic_uda
from mic_uda.evaluate import evaluate
from mic_uda.models.daformer import DAFormerNet
from mic_uda.train import train
from mic_uda.utils.checkpointing import check_checkpoint_fits
from mic_uda.utils.hydra_utils import CONFIG_DIR, intentional_eval_modules, quiet_intentional, recipe_in_force

ROOT = Path(__file__).resolve().parents[1]
CONF_FILES = sorted(p.relative_to(CONFIG_DIR.parent).as_posix() for p in CONFIG_DIR.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------- public API
def test_public_api_names_resolve_with_docstrings() -> None:
    assert set(mic_uda.__all__) == {"__version__", *mic_uda._PUBLIC}
    for name in mic_uda._PUBLIC:
        obj = getattr(mic_uda, name)
        assert obj.__module__ == mic_uda._PUBLIC[name] and obj.__doc__, name
    for name in ("block_mask", "apply_mask", "classmix_masks", "mix", "confidence_weight"):
        assert "(B" in getattr(mic_uda, name).__doc__, f"{name}: the docstring gives the shapes"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mic_uda.nope  # noqa: B018


def test_import_mic_uda_is_cheap() -> None:
    """``import mic_uda`` does not import torch: the API names load on first use."""
    code = "import sys, mic_uda; print('torch' in sys.modules); from mic_uda import block_mask as b; print(b)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "False" and "function block_mask" in out


# ----------------------------------------------------------------------------------- packaging
def test_every_config_file_is_package_data() -> None:
    """setuptools' package-data globs of pyproject.toml match every file under mic_uda/conf."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "mic_uda"
    ]
    matched = {
        Path(f).as_posix() for g in globs for f in glob.glob(g, root_dir=CONFIG_DIR.parent, recursive=True)
    }
    assert CONF_FILES and not [f for f in CONF_FILES if f not in matched]


def _build_wheel(out: Path) -> Path:
    """The wheel of the working tree, built offline from a copy (the checkout stays clean)."""
    src = out / "src"
    shutil.copytree(ROOT / "mic_uda", src / "mic_uda", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*cmd, "-q", "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    return next(out.glob("mic_uda-*.whl"))


def test_built_wheel_holds_every_config_file(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [f for f in CONF_FILES if f"mic_uda/{f}" not in names]
    assert "mic_uda/convert.py" in names and "mic_uda/py.typed" in names


@pytest.mark.slow
def test_installed_wheel_trains_the_embedded_default_from_an_empty_folder(tmp_path: Path) -> None:
    """A fresh venv reusing the installed dependencies (nothing fetched): `mic-uda-train --help` lists the
    packaged config groups, and a fast_dev_run of the embedded default runs from an empty folder."""
    wheel = _build_wheel(tmp_path / "wheel")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py, exe = venv / "bin" / "python", venv / "bin" / "mic-uda-train"
    pip = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    where = subprocess.run(
        [str(py), "-c", "import mic_uda.utils.hydra_utils as h; print(h.CONFIG_DIR, h.PROJECT_ROOT)"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(venv)) and where.strip().endswith("None"), where  # the wheel's copy
    help_text = subprocess.run(
        [str(exe), "--help"], cwd=empty, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "method: dacs" in help_text and "recipe: camvid_day2dusk" in help_text
    run = subprocess.run(
        [str(exe), "trainer=cpu", "data.size=32", "data.datamodule.source.num_images=4",
         "data.datamodule.target.num_images=4", "data.datamodule.val.num_images=2",
         "data.datamodule.val_batch_size=2", "backbone.embed_dim=16", "++trainer.fast_dev_run=true",
         "+trainer.enable_progress_bar=false", "~callbacks.progress_bar"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert list((empty / "logs" / "train" / "runs" / "synthetic_seg" / "mic").glob("seed0/*/train.log"))


# ----------------------------------------------------------------------------------- user config dirs
def write_user_conf(root: Path, recipe: bool = True) -> Path:
    """A user's own data/, recipe/ and experiment/ files inheriting ours through `defaults:`."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "my_data.yaml").write_text(
        "defaults:\n  - synthetic_seg\n  - _self_\nname: my_data\nsize: 32\n"
        "datamodule:\n  source: {num_images: 4}\n  target: {num_images: 4}\n  val: {num_images: 2}\n"
        "  val_batch_size: 2\n"
    )
    if recipe:
        (root / "recipe").mkdir()
        (root / "recipe" / "my_data.yaml").write_text(
            "# @package _global_\ndefaults:\n  - camvid_day2dusk\n  - _self_\ntrainer:\n  max_steps: 3\n"
            "  val_check_interval: 3\n"
        )
    (root / "experiment").mkdir()
    (root / "experiment" / "my_exp.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: my_data\n  - override /method: dacs\n"
        "backbone:\n  embed_dim: 16\n"
    )
    return root


def test_recipe_in_force_is_named_at_start_up(make_cfg) -> None:
    assert recipe_in_force(make_cfg([])).startswith(
        "recipe: synthetic_seg (recipe/synthetic_seg.yaml, picked by data=synthetic_seg)"
    )
    explicit = recipe_in_force(make_cfg(["recipe=camvid_day2dusk"], tiny=False))
    assert explicit.startswith("recipe: camvid_day2dusk (recipe/camvid_day2dusk.yaml, chosen by recipe=")
    assert "max_steps=1000" in explicit
    none = recipe_in_force(make_cfg(["data=gta2cs"], tiny=False))
    assert (
        none.startswith("recipe: none (no recipe/gta2cs.yaml for data=gta2cs)") and "max_steps=40000" in none
    )
    assert "recipe=<name> (camvid_day2dusk," in none
    assert recipe_in_force(make_cfg(["~recipe"], tiny=False)).startswith(
        "recipe: none (removed with ~recipe)"
    )


def test_user_config_dir_recipes_and_their_absence(tmp_path: Path, make_cfg) -> None:
    """`--config-dir` = one more search path: the user's data inherits ours, the user's recipe for it is
    picked (and named); without one the run says that the defaults apply."""
    conf = write_user_conf(tmp_path / "with")
    cfg = make_cfg([f"hydra.searchpath=[file://{conf}]", "experiment=my_exp"], tiny=False)
    assert (cfg.data.name, cfg.method.name, cfg.trainer.max_steps, cfg.backbone.embed_dim) == (
        "my_data",
        "dacs",
        3,
        16,
    )
    assert cfg.task.module.optimizer.lr == 6.0e-4  # from recipe/camvid_day2dusk.yaml, inherited
    assert recipe_in_force(cfg).startswith("recipe: my_data (recipe/my_data.yaml, picked by data=my_data)")
    bare = write_user_conf(tmp_path / "without", recipe=False)
    cfg = make_cfg([f"hydra.searchpath=[file://{bare}]", "experiment=my_exp"], tiny=False)
    assert cfg.trainer.max_steps == 40000
    line = recipe_in_force(cfg)
    assert line.startswith("recipe: none (no recipe/my_data.yaml for data=my_data)"), line
    assert "add recipe/my_data.yaml to your --config-dir" in line


def test_config_dir_on_the_command_line(tmp_path: Path) -> None:
    """The real CLI: `python -m mic_uda.train --config-dir <mine> experiment=my_exp` trains the user's data
    with the user's recipe, and the log names it."""
    conf = write_user_conf(tmp_path / "conf")
    cmd = [sys.executable, "-m", "mic_uda.train", "--config-dir", str(conf), "experiment=my_exp",
           "trainer=cpu", "++trainer.fast_dev_run=true", "+trainer.enable_progress_bar=false",
           "~callbacks.progress_bar", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "recipe: my_data (recipe/my_data.yaml, picked by data=my_data); schedule max_steps=3" in log
    noise = proc.stdout + proc.stderr
    for text in ("module(s) in eval mode", "💡 Tip", "LeafSpec", "Using ModelCheckpoint with manual"):
        assert text not in noise, text


# ----------------------------------------------------------------------------------- quiet runs
def test_a_run_prints_none_of_the_intentional_warnings(make_cfg, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg(["trainer.max_steps=2", "trainer.val_check_interval=2"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(cfg)
    texts = [str(w.message) for w in seen]
    for text in ("module(s) in eval mode", "LeafSpec", "Using ModelCheckpoint with manual optimization"):
        assert not [t for t in texts if text in t], text
    assert not [r for r in caplog.records if "Tip:" in r.getMessage()]


def test_eval_mode_warning_is_silenced_for_exactly_the_teacher(make_cfg) -> None:
    """N = the teacher's modules in eval mode; a warning with another N (e.g. a student module left in
    eval mode by mistake) still shows."""
    cfg = make_cfg([])
    model = instantiate(cfg.task.module, _recursive_=False)
    model.train()
    n = intentional_eval_modules(model)
    assert n == sum(not m.training for m in model.teacher.modules()) > 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_intentional(model):
            for k in (n, n + 1):
                msg = f"Found {k} module(s) in eval mode at the start of training. This may lead to ..."
                warnings.warn(msg, PossibleUserWarning, stacklevel=1)
    assert [str(w.message)[:8] for w in seen] == [f"Found {n + 1}"[:8]]


# ----------------------------------------------------------------------------------- clear words
def test_weights_that_are_not_a_weights_file_are_named(tmp_path: Path, make_cfg) -> None:
    text = tmp_path / "mit_b0.pth"
    text.write_text("these are my notes, not weights\n")
    with pytest.raises(ValueError, match=rf"'{text}' is not a PyTorch/safetensors weights file"):
        train(make_cfg([f"backbone.weights={text}"]))  # at start-up, before any data
    with pytest.raises(ValueError, match=r"is not a PyTorch/safetensors weights file .* \(mit_b0\)"):
        DAFormerNet(3, "mit_b0", embed_dim=16).load_encoder_weights(text)
    truncated = tmp_path / "half.pth"
    torch.save({"w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"Could not read .*half.pth.* with torch.load\(weights_only=True\)"):
        DAFormerNet(3, "mit_b0", embed_dim=16).load_encoder_weights(truncated)
    from mic_uda.models.classifier import read_state_dict

    with pytest.raises(ValueError, match=r"not a readable safetensors weights file"):
        (tmp_path / "w.safetensors").write_text("x" * 20)
        read_state_dict(tmp_path / "w.safetensors", "vit_b16")


def test_evaluate_names_what_a_checkpoint_is_not(tmp_path: Path, make_cfg) -> None:
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint")
    ecfg = make_cfg([f"ckpt_path={notes}", "trainer=cpu"], config_name="eval", out=tmp_path / "e")
    with pytest.raises(
        ValueError, match=r"^ckpt_path='.*notes.ckpt' is not a checkpoint \(it starts with b'not "
    ):
        evaluate(ecfg)
    seg = tmp_path / "seg.ckpt"
    names = ["sky", "building", "vegetation", "road", "sidewalk", "car", "person", "pole"]
    torch.save(
        {"mic_uda_module": "mic_uda.tasks.seg.SegUDAModule", "hyper_parameters": {"class_names": names}}, seg
    )
    cls_data = make_cfg([f"ckpt_path={seg}", "data=synthetic_cls"], config_name="eval").data
    with pytest.raises(ValueError) as err:
        check_checkpoint_fits(seg, cls_data)
    msg = str(err.value)
    assert "\n" not in msg
    assert "holds a seg model of 8 classes [sky, building, vegetation, road, ...]" in msg
    assert "data=synthetic_cls asks for a cls model of 6 classes [circle," in msg
    other = make_cfg([f"ckpt_path={seg}", "data=camvid_day2dusk"], config_name="eval").data
    with pytest.raises(ValueError, match="data=camvid_day2dusk asks for a seg model of 11 classes"):
        check_checkpoint_fits(seg, other)
    assert (
        check_checkpoint_fits(seg, make_cfg([f"ckpt_path={seg}"], config_name="eval").data)["class_names"]
        == names
    )
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    with pytest.raises(ValueError, match=r"was not written by mic_uda .* python -m mic_uda\.convert"):
        check_checkpoint_fits(plain, other)
