"""Checkpoint files that survive crashes, and the SLURM pre-emption plugin (trainer config ``plugins``).

Why :class:`AtomicCheckpointIO`: Lightning's own ``TorchCheckpointIO`` (lightning 2.6,
``lightning.fabric.utilities.cloud_io._atomic_save``) serialises the whole checkpoint into memory, then
writes it through an fsspec transaction whose temporary file is created in the *system* temp folder
(``tempfile.mkstemp()``) and moved over the target with ``shutil.move``. That is a rename, and so
atomic, only when ``$TMPDIR`` and the run folder are on the same filesystem; on a cluster (node-local
``/tmp``, shared run folder) it is a copy, and a job killed during the copy leaves a truncated
``last.ckpt`` behind. Nothing is fsynced either. Here the checkpoint is streamed into ``<path>.tmp``
next to the target, fsynced, and renamed over it with ``os.replace``: a crash at any point leaves
either the previous file or the new one, never a partial one. Remote paths (``s3://`` ...) keep
Lightning's behaviour.
"""

from __future__ import annotations

import os
import pickle
import signal
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mic_uda.models.weights import check_state_dict


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` writing local files through ``<path>.tmp`` + fsync + ``os.replace``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        atomic_torch_save(checkpoint, Path(str(path).removeprefix("file://")))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` such that ``path`` is always either the old or the complete new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def slurm_environment(auto_requeue: bool = True, requeue_signal: str = "SIGUSR1") -> SLURMEnvironment:
    """Lightning's ``SLURMEnvironment`` with the requeue signal given by name (configs cannot hold a
    ``signal.Signals``). With ``auto_requeue``, Lightning saves ``<run dir>/hpc_ckpt_<n>.ckpt`` on that
    signal and calls ``scontrol requeue``; submit with ``#SBATCH --signal=USR1@120`` (for SIGUSR1)."""
    try:
        sig = signal.Signals[requeue_signal]
    except KeyError:
        allowed = ", ".join(
            s.name for s in signal.Signals if s.name.startswith("SIGUSR") or s.name == "SIGTERM"
        )
        raise ValueError(f"requeue_signal={requeue_signal!r} is not a signal name (e.g. {allowed})") from None
    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=sig)


def init_student_from(model: torch.nn.Module, path: str | Path) -> int:
    """Start a run from another run's student weights (``init_from=...``): a source-only burn-in.

    Mean-teacher detection methods start self-training from a burned-in detector (a random-head
    teacher gives no boxes above the score threshold); the student's weights and BN buffers are
    loaded, everything else starts fresh: step 0, optimiser, schedule, discriminators, and the
    teacher, which copies the student in ``setup``. Returns the checkpoint's global step.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from={str(path)!r} does not exist (expected a run's .ckpt file)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    weights = ckpt.get("state_dict", {})
    state = {k.removeprefix("student."): v for k, v in weights.items() if k.startswith("student.")}
    if not state:
        raise ValueError(f"init_from={str(path)!r} holds no 'student.*' weights: not a mic_uda checkpoint")
    student = model.get_submodule("student")
    check_state_dict(  # missing/unexpected keys and shape mismatches, listed
        student,
        state,
        "student",
        str(path),
        header=f"init_from={str(path)!r} does not fit this run's network "
        "(same task.module and backbone as the run that wrote it?)",
    )
    student.load_state_dict(state)
    if hasattr(model, "student_from_init"):
        model.student_from_init = True  # setup must not load the ImageNet encoder weights over it
    return int(ckpt.get("global_step", 0))


#: the task of each LightningModule class a checkpoint names (``mic_uda_module``)
TASK_OF_MODULE = {"SegUDAModule": "seg", "ClsUDAModule": "cls", "DetUDAModule": "det"}


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """A checkpoint file's dict, or a one-line error naming ``key=path`` and what the file is instead.

    Memory-mapped where the file format allows it, so checking a large checkpoint costs little."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r} does not exist (expected a .ckpt written by training)")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise ValueError(
            f"{key}={str(path)!r} is not a checkpoint (it starts with {head!r}; a .ckpt is a zip/pickle "
            "file written by training or by python -m mic_uda.convert)"
        )
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
        except pickle.UnpicklingError as err:  # objects beyond tensors: a file this user wrote themselves
            if "weights_only" not in str(err).lower():
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{key}={str(path)!r} is not a readable checkpoint (truncated?): {first}") from None
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{key}={str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return dict(ckpt)


def data_task(data_cfg: Mapping[str, Any]) -> str | None:
    """The task a data config feeds, from its evaluation dataset's class (None: a class we do not know)."""
    target = str(((data_cfg.get("datamodule") or {}).get("val") or {}).get("_target_", ""))
    if not target.startswith("mic_uda.data."):
        return None
    if "Detection" in target:
        return "det"
    if target.startswith(("mic_uda.data.cls_files.", "mic_uda.data.synthetic_cls.")):
        return "cls"
    return "seg"


def _classes(names: Any, limit: int = 4) -> str:
    names = list(names or [])
    shown = ", ".join(str(n) for n in names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} classes [{shown}]"


def check_checkpoint_fits(path: str | Path, data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``python -m mic_uda.evaluate``'s first step: the file is a mic_uda checkpoint whose task and classes
    are those of the data config asked for; else a one-line error saying what it holds vs what is asked.
    Returns the checkpoint's hyper-parameters."""
    ckpt = read_checkpoint(path)
    module = ckpt.get("mic_uda_module")
    if module is None:
        raise ValueError(
            f"ckpt_path={str(path)!r} was not written by mic_uda (no 'mic_uda_module' entry); convert an "
            "official mmseg checkpoint first: python -m mic_uda.convert <file> --to <ours.ckpt> --preset ..."
        )
    hparams = dict(ckpt.get("hyper_parameters") or {})
    task = TASK_OF_MODULE.get(str(module).rsplit(".", 1)[-1])
    wanted_task = data_task(data_cfg)
    held = f"a {task or module} model of {_classes(hparams.get('class_names'))}"
    kind = f"a {wanted_task} model" if wanted_task else "a model"
    asked = f"data={data_cfg.get('name', '?')} asks for {kind} of {_classes(data_cfg.get('class_names'))}"
    if task and wanted_task and task != wanted_task:
        raise ValueError(
            f"ckpt_path={str(path)!r} holds {held}, but {asked}: pick the data config it was trained for"
        )
    names, wanted = list(hparams.get("class_names") or []), list(data_cfg.get("class_names") or [])
    if names and wanted and names != wanted:
        raise ValueError(
            f"ckpt_path={str(path)!r} holds {held}, but {asked}: pick the data config it was trained for"
        )
    return hparams
