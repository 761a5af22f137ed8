"""Every option of every config group composes; bad options and missing data fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import get_object
from omegaconf import OmegaConf

from mic_uda.tasks.method import parse_method
from mic_uda.train import build_datamodule, train
from mic_uda.utils.hydra_utils import CONFIG_DIR

GROUPS = [
    "task",
    "data",
    "backbone",
    "method",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "debug",
    "experiment",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def task_of(group: str, option: str) -> str | None:
    """The task an option belongs to when it is not segmentation (read from the file, so new options
    are covered): classification (``cls``) or detection (``det``)."""
    text = (CONFIG_DIR / group / f"{option}.yaml").read_text()
    det = {
        "data": "mic_uda.data.boxes" in text or "mic_uda.data.det_files" in text,
        "backbone": "mic_uda.models.detector" in text,
        "method": "sada:" in text,
    }.get(group, False)
    cls = {
        "data": "image_size:" in text and "palette:" not in text,
        "backbone": "mic_uda.models.classifier" in text,
        "method": "cdan:" in text,
    }.get(group, False)
    return "det" if det else "cls" if cls else None


def classification_only(group: str, option: str) -> bool:
    return task_of(group, option) == "cls"


ALL = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize(("group", "option"), ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_every_option_composes(group: str, option: str, make_cfg) -> None:
    task = [f"task={task_of(group, option)}"] if task_of(group, option) else []
    cfg = make_cfg([*task, f"{group}={option}"], tiny=False)
    given = [f"{key}=/given.pth" for key in _required_keys(OmegaConf.to_container(cfg, resolve=False))]
    if given:  # values the user must give (${mic_uda_required:...}): what a user's command line adds
        cfg = make_cfg([*task, f"{group}={option}", *given], tiny=False)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # interpolations resolve
    method = parse_method(cfg.method)
    targets = list(_targets(resolved))
    assert targets and all(callable(get_object(t)) for t in targets)  # every _target_ imports
    own = OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")
    if group == "method":
        assert method.name == own.get("name", cfg.method.name)
    elif "_target_" in own and not str(own._target_).startswith("${"):
        assert cfg[group]._target_ == own._target_  # the option's own network/logger/... is the one built
    assert cfg.task.module._target_ in {
        "mic_uda.tasks.seg.SegUDAModule",
        "mic_uda.tasks.cls.ClsUDAModule",
        "mic_uda.tasks.det.DetUDAModule",
    }


def _required_keys(node: object, prefix: str = ""):
    """Dotted keys whose value is ``${mic_uda_required:...}`` in an unresolved config."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _required_keys(v, f"{prefix}{k}.")
    elif isinstance(node, str) and node.startswith("${mic_uda_required:"):
        yield prefix[:-1]


def _targets(node: object):
    """Every ``_target_`` string of a resolved config."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield node["_target_"]
        for v in node.values():
            yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


# segmentation-only: DACS and the seed methods built on it (PiPa, RCCR, IR2F terms are seg terms)
SEG_ONLY_METHODS = {"dacs"} | {
    o for o in options("method") if o.rsplit("_", 1)[-1] in ("pipa", "rccr", "ir2f")
}
SHARED_METHODS = [o for o in options("method") if o not in SEG_ONLY_METHODS and task_of("method", o) is None]


@pytest.mark.parametrize("task", ["cls", "det"])
@pytest.mark.parametrize("method", SHARED_METHODS)
def test_shared_methods_compose_under_cls_and_det(task: str, method: str, make_cfg) -> None:
    cfg = make_cfg([f"task={task}", f"method={method}"], tiny=False)
    OmegaConf.to_container(cfg, resolve=True)
    assert parse_method(cfg.method).mix is None  # ClassMix is segmentation-only


def test_every_group_has_options() -> None:
    for g in GROUPS[:-2]:
        assert options(g), g


def test_recipe_follows_data_choice(make_cfg) -> None:
    assert make_cfg([], tiny=False).trainer.max_steps == 1000  # recipe/synthetic_seg.yaml
    paper = make_cfg(["data=gta2cs"], tiny=False)
    assert paper.trainer.max_steps == 40000 and paper.task.module.optimizer.lr == 6e-5
    assert paper.task.module.scheduler.warmup_steps == 1500


def test_unknown_option_lists_allowed_ones(make_cfg) -> None:
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as err:
        make_cfg(["method=mikc"])
    assert "mic" in str(err.value) and "dacs" in str(err.value)


def test_method_typo_fails_at_start_naming_the_key(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(["+method.mic.blok_size=3"])
    with pytest.raises(ValueError, match="blok_size"):
        train(cfg)


def test_missing_dataset_root_names_path_and_layout(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(["data=gta2cs", f"paths.data_dir={tmp_path / 'nowhere'}"], tiny=False)
    dm = build_datamodule(cfg)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "gta" / "images") in msg and "labels/*.png" in msg


def test_missing_weights_file_fails_before_training(make_cfg, tmp_path: Path) -> None:
    missing = tmp_path / "mit_b0.pth"
    with pytest.raises(FileNotFoundError, match=r"mit_b0\.pth.*Nothing is downloaded"):
        train(make_cfg([f"backbone.weights={missing}"]))


def test_evaluate_sees_camvid_detection_frames_as_training_did(make_cfg) -> None:
    """evaluate composes the data group without the training recipe: the frame size lives in the data."""
    trained = make_cfg(["experiment=camvid_det_day2dusk_source_only"], tiny=False)
    evaluated = make_cfg(["data=camvid_det_day2dusk", "ckpt_path=x.ckpt"], config_name="eval", tiny=False)
    assert list(trained.data.resize) == list(evaluated.data.resize) == [256, 192]
    assert (trained.backbone.min_size, trained.backbone.max_size) == (192, 256)
