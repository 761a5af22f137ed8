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
import signal
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
