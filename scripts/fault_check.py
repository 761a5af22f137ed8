"""Inject each fault into a tiny CPU run and check that the run reacts as it should.

    python scripts/fault_check.py              # every fault but SIGTERM (~40 s on 2 cores)
    python scripts/fault_check.py --sigterm    # also SIGTERM to a real `python -m mic_uda.train` (+~20 s)
    python scripts/fault_check.py --keep /tmp/faults   # keep the generated data and run folders

Prints ``fault | expected behaviour | observed | pass/fail`` and exits with status 1 if any check
fails. Data faults use tiny generated data in the real folder layouts (data=folder, data=folder_cls);
every run is the real ``mic_uda.train.train`` on composed configs, in temporary folders.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mic_uda.utils.hydra_utils import CONFIG_DIR, register_resolvers  # noqa: E402

register_resolvers()

RUN = [  # a run small enough for seconds on a 2-core CPU (as tests/conftest.py TINY_SEG)
    "trainer=cpu",
    "logger=csv",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
]
SYNTHETIC_SEG = [
    "data.size=32",
    "data.datamodule.source.num_images=4",
    "data.datamodule.target.num_images=4",
    "data.datamodule.val.num_images=2",
    "data.datamodule.val_batch_size=2",
    "backbone.embed_dim=16",
]
NUM_CLASSES = 3  # conf/data/folder.yaml's example classes


# ------------------------------------------------------------------------------- tiny data on disk
def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_seg_folder(root: Path, n: int = 4, size: tuple[int, int] = (32, 48), seed: int = 0) -> Path:
    """``<root>/images/<i>.png`` + ``<root>/labels/<i>.png`` (train ids 0..2), data=folder's layout."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        _png(root / "images" / f"{i:03d}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        label = np.zeros(size, dtype=np.uint8)
        label[size[0] // 2 :] = 1
        label[:, : size[1] // 3] = 2
        _png(root / "labels" / f"{i:03d}.png", label)
    return root


def write_cls_folder(
    root: Path, classes: Sequence[str] = ("a", "b"), per_class: int = 4, seed: int = 0
) -> Path:
    """``<root>/<class>/<i>.png``, data=folder_cls's layout."""
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            _png(root / c / f"{i}.png", rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    return root


def corrupt(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return path


def folder_seg(root: Path) -> list[str]:
    """data=folder on ``root`` for all three splits, tiny model and crops."""
    return [
        "data=folder",
        *(f"data.datamodule.{s}.root={root}" for s in ("source", "target", "val")),
        "data.crop_size=32",
        "data.mask_block_size=4",
        "data.datamodule.num_workers=0",
        "data.datamodule.val_batch_size=2",
        "backbone.embed_dim=16",
        *RUN,
    ]


def folder_cls(root: Path) -> list[str]:
    return [
        "task=cls",
        "data=folder_cls",
        *(f"data.datamodule.{s}.root={root}" for s in ("source", "target", "val")),
        "data.class_names=[a,b]",
        "data.num_classes=2",
        "data.image_size=16",
        "data.pre_crop_size=null",
        "data.mask_block_size=4",
        "data.datamodule.num_workers=0",
        "data.datamodule.batch_size=2",
        "data.datamodule.target_batch_size=2",
        "data.datamodule.val_batch_size=4",
        "backbone.bottleneck_dim=16",
        *RUN,
    ]


# ------------------------------------------------------------------------------- running train()
def compose(overrides: Sequence[str], out: Path, config_name: str = "train") -> Any:
    """The config ``python -m mic_uda.train <overrides>`` (``config_name="eval"``: ``mic_uda.evaluate``)
    builds, with its run folder at ``out``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = str(out)
        del cfg["hydra"]
    return cfg


def run_train(overrides: Sequence[str], out: Path) -> dict[str, float]:
    from mic_uda.train import train

    with contextlib.redirect_stdout(io.StringIO()):
        return train(compose(overrides, out))


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def nan_after(calls: set[int] | None, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` whose result is NaN on the given call numbers (0-based; None = every call)."""
    count = [0]

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = fn(*args, **kwargs)
        i, count[0] = count[0], count[0] + 1
        return out * float("nan") if calls is None or i in calls else out

    return wrapped


# ------------------------------------------------------------------------------- the checks
Check = tuple[bool, str]


def short(text: str, work: Path, width: int = 110) -> str:
    text = " ".join(str(text).replace(str(work), "<tmp>").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def expect_error(work: Path, fn: Callable[[], Any], kind: type[BaseException], *needles: str) -> Check:
    try:
        fn()
    except kind as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        head = f"{type(e).__name__}: {msg}"
        return (not missing, short(head, work) + (f"  [missing: {missing}]" if missing else ""))
    except Exception as e:  # the wrong error
        return False, short(f"{type(e).__name__}: {e}", work)
    return False, "no error"


def check_corrupt_image(work: Path) -> Check:
    root = write_seg_folder(work / "corrupt_image")
    bad = corrupt(root / "images" / "001.png")
    return expect_error(
        work, lambda: run_train(folder_seg(root), work / "r1"), OSError, str(bad), "cannot read image"
    )


def check_missing_label(work: Path) -> Check:
    root = write_seg_folder(work / "missing_label")
    (root / "labels" / "002.png").unlink()
    return expect_error(
        work,
        lambda: run_train(folder_seg(root), work / "r2"),
        FileNotFoundError,
        "labels/002.png",
        "is missing",
    )


def check_size_mismatch(work: Path) -> Check:
    root = write_seg_folder(work / "size_mismatch")
    _png(root / "labels" / "003.png", np.zeros((28, 48), dtype=np.uint8))
    return expect_error(
        work,
        lambda: run_train(folder_seg(root), work / "r3"),
        ValueError,
        "003.png",
        "label size (28, 48) != image size (32, 48)",
    )


def check_label_ids(work: Path) -> Check:
    root = write_seg_folder(work / "label_ids")
    _png(root / "labels" / "000.png", np.full((32, 48), 7, dtype=np.uint8))
    return expect_error(
        work,
        lambda: run_train(folder_seg(root), work / "r4"),
        ValueError,
        "000.png",
        "label ids [7] outside 0..2",
    )


def check_empty_split(work: Path) -> Check:
    root = write_seg_folder(work / "empty_split")
    (root / "empty.txt").write_text("\n")
    overrides = [*folder_seg(root), "data.datamodule.target.split_file=empty.txt"]
    return expect_error(
        work, lambda: run_train(overrides, work / "r5"), ValueError, "empty.txt", "lists no images"
    )


def check_unknown_option(work: Path) -> Check:
    from hydra.errors import MissingConfigException

    return expect_error(
        work,
        lambda: compose(["method=mcx"], work / "r6"),
        MissingConfigException,
        "method/mcx",
        "Available options",
        "mic",
    )


def check_wrong_type(work: Path) -> Check:
    return expect_error(
        work,
        lambda: run_train([*SYNTHETIC_SEG, *RUN, "method.mic.ratio=abc"], work / "r7"),
        ValueError,
        "mic.ratio",
        "'abc'",
    )


def check_weights_missing(work: Path) -> Check:
    path = work / "nowhere" / "mit_b0.pth"
    return expect_error(
        work,
        lambda: run_train([*SYNTHETIC_SEG, *RUN, f"backbone.weights={path}"], work / "r8"),
        FileNotFoundError,
        str(path),
        "Nothing is downloaded",
    )


def check_weights_other_arch(work: Path) -> Check:
    path = work / "resnet_like.pth"
    torch.save(
        {"conv1.weight": torch.zeros(8, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3)}, path
    )
    return expect_error(
        work,
        lambda: run_train([*SYNTHETIC_SEG, *RUN, f"backbone.weights={path}"], work / "r9"),
        ValueError,
        "do not match encoder 'mit_b0'",
        "unexpected keys: conv1.weight",
        "missing keys",
    )


def check_weights_not_weights(work: Path) -> Check:
    path = work / "mit_b0.pth"
    path.write_text("<html>a download page saved instead of the file</html>\n")
    return expect_error(
        work,
        lambda: run_train([*SYNTHETIC_SEG, *RUN, f"backbone.weights={path}"], work / "r14"),
        ValueError,
        str(path),
        "is not a PyTorch/safetensors weights file",
    )


def run_evaluate(overrides: Sequence[str], out: Path) -> dict[str, float]:
    from mic_uda.evaluate import evaluate

    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate(
            compose([*overrides, "trainer=cpu", "+trainer.enable_progress_bar=false"], out, "eval")
        )


def check_ckpt_not_a_checkpoint(work: Path) -> Check:
    path = work / "notes.ckpt"
    path.write_text("todo: evaluate the good run\n")
    return expect_error(
        work,
        lambda: run_evaluate([f"ckpt_path={path}"], work / "e1"),
        ValueError,
        str(path),
        "is not a checkpoint",
    )


def check_ckpt_other_task(work: Path) -> Check:
    run_train([*SYNTHETIC_SEG, *RUN], work / "r15")  # a seg checkpoint of the embedded default
    ckpt = work / "r15" / "checkpoints" / "last.ckpt"
    return expect_error(
        work,
        lambda: run_evaluate([f"ckpt_path={ckpt}", "data=synthetic_cls"], work / "e2"),
        ValueError,
        "holds a seg model of 8 classes",
        "data=synthetic_cls asks for a cls model of 6 classes",
    )


def check_convert_unmapped(work: Path) -> Check:
    from mic_uda.convert import convert

    path = work / "official.pth"
    torch.save({"state_dict": {"model.backbone.foo.weight": torch.zeros(2)}, "meta": {"iter": 1}}, path)
    return expect_error(
        work,
        lambda: convert(path, work / "ours.ckpt", "synthetic_seg_table"),
        ValueError,
        "unmapped official keys: model.backbone.foo.weight -> student.encoder.foo.weight",
        "keys of ours not filled: student.encoder.patch_embed1.proj.weight",
    )


def check_cuda(work: Path) -> Check:
    if torch.cuda.is_available():
        return True, "skipped: this machine has a GPU (trainer=gpu is valid here)"
    return expect_error(
        work,
        lambda: run_train([*SYNTHETIC_SEG, *RUN, "trainer=gpu"], work / "r10"),
        RuntimeError,
        "no CUDA device",
        "trainer=cpu",
    )


def check_nonfinite(work: Path) -> Check:
    import mic_uda.models.seg_base as seg  # every seg network loss goes through it

    one = [*SYNTHETIC_SEG, *RUN, "method=source_only", "trainer.max_steps=3", "trainer.val_check_interval=3"]
    with patched(seg, "weighted_cross_entropy", nan_after({1}, seg.weighted_cross_entropy)):
        metrics = run_train(one, work / "r11")
    skipped = metrics.get("train/skipped_steps")
    ok, observed = expect_error(
        work,
        lambda: _with_nan(lambda: run_train([*one, "task.module.max_bad_steps=2"], work / "r11b")),
        FloatingPointError,
        "2 consecutive steps with a non-finite loss",
        "max_bad_steps=2",
    )
    return (
        skipped == 1.0 and ok,
        f"one NaN step: train/skipped_steps={skipped}, run finished; always NaN: {observed}",
    )


def _with_nan(fn: Callable[[], Any]) -> Any:
    import mic_uda.models.seg_base as seg  # every seg network loss goes through it

    with patched(seg, "weighted_cross_entropy", nan_after(None, seg.weighted_cross_entropy)):
        return fn()


def check_bad_sample_skip(work: Path) -> Check:
    root = write_seg_folder(work / "skip_seg")
    corrupt(root / "images" / "001.png")
    _png(root / "labels" / "003.png", np.zeros((28, 48), dtype=np.uint8))
    seg = run_train([*folder_seg(root), "data.on_bad_sample=skip"], work / "r12")
    croot = write_cls_folder(work / "skip_cls")
    corrupt(croot / "a" / "0.png")
    whole_pass = ["trainer.max_steps=4", "trainer.val_check_interval=4"]  # every training image once
    cls = run_train([*folder_cls(croot), *whole_pass, "data.on_bad_sample=skip"], work / "r13")
    counts = {
        k: v for k, v in {**seg, **{f"cls:{k}": v for k, v in cls.items()}}.items() if "bad_samples" in k
    }
    ok = all(
        counts.get(k, 0) >= 1 for k in ("train/bad_samples", "test/bad_samples", "cls:train/bad_samples")
    )
    return ok, "runs finished; " + ", ".join(f"{k}={v:g}" for k, v in sorted(counts.items()))


KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from mic_uda.utils.checkpointing import AtomicCheckpointIO
    path = sys.argv[1]
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"version": 1, "w": torch.arange(1000)}, path)
    real = torch.save
    def half_then_die(obj, f, *a, **k):
        import io as _io
        buf = _io.BytesIO(); real(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = half_then_die
    io_.save_checkpoint({"version": 2, "w": torch.arange(100000)}, path)
    """
)


def check_kill_during_save(work: Path) -> Check:
    path = work / "ckpt" / "last.ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, str(path)], cwd=ROOT, capture_output=True, timeout=120
    )
    killed = proc.returncode == -signal.SIGKILL
    try:
        state = torch.load(path, weights_only=True)
        intact = state["version"] == 1 and torch.equal(state["w"], torch.arange(1000))
    except Exception as e:  # a truncated file
        return False, short(f"killed={killed}; last.ckpt unreadable: {type(e).__name__}: {e}", work)
    return (
        killed and intact,
        f"killed by SIGKILL={killed}; last.ckpt is the previous, complete checkpoint={intact}",
    )


def check_sigterm(work: Path, timeout: float = 240.0) -> Check:
    """A real `python -m mic_uda.train` gets SIGTERM once training runs: last.ckpt, exit status 0."""
    run_dir = work / "sigterm_run"
    cmd = [
        sys.executable,
        "-m",
        "mic_uda.train",
        *SYNTHETIC_SEG,
        *[o for o in RUN if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))],
        "trainer.max_steps=100000",
        "trainer.val_check_interval=100000",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.save_last=false",  # last.ckpt can only come from the SIGTERM handling
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    start = time.monotonic()
    ckpts = run_dir / "checkpoints"
    while not list(ckpts.glob("step_*.ckpt")) and proc.poll() is None and time.monotonic() - start < timeout:
        time.sleep(0.2)
    if proc.poll() is not None:
        return False, short(
            f"exited before training ({proc.returncode}): {proc.communicate()[0][-300:]}", work
        )
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return False, "did not exit within the timeout after SIGTERM"
    last = ckpts / "last.ckpt"
    if not last.is_file():
        return False, short(f"exit status {proc.returncode}, no last.ckpt; {out[-300:]}", work)
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    ok = proc.returncode == 0 and "SIGTERM received" in out and 0 < step < 100000
    return (
        ok,
        f"exit status {proc.returncode}; last.ckpt at step {step}; "
        f"log says 'SIGTERM received': {'SIGTERM received' in out}",
    )


FAULTS: list[tuple[str, str, Callable[[Path], Check]]] = [
    ("corrupt image", "error naming the image file", check_corrupt_image),
    ("missing label file", "error naming the label file", check_missing_label),
    ("image/label size mismatch", "error naming the label and both sizes", check_size_mismatch),
    ("label ids outside the classes", "error naming the file and the ids", check_label_ids),
    ("empty split", "error naming the split file", check_empty_split),
    ("unknown config option", "error listing the allowed options", check_unknown_option),
    ("wrong type in config", "error naming the key and the value", check_wrong_type),
    ("weights file missing", "error naming the path, no download", check_weights_missing),
    ("weights of another architecture", "error listing mismatched keys", check_weights_other_arch),
    (
        "weights file that is not weights",
        "error naming the file: not a weights file",
        check_weights_not_weights,
    ),
    ("evaluate: not a checkpoint", "one-line error naming the file", check_ckpt_not_a_checkpoint),
    (
        "evaluate: checkpoint of another task",
        "one line: what it holds vs what is asked",
        check_ckpt_other_task,
    ),
    ("convert: unmapped official keys", "error listing unmapped and unfilled keys", check_convert_unmapped),
    ("CUDA without a GPU (trainer=gpu)", "error suggesting trainer=cpu", check_cuda),
    ("non-finite loss", "step skipped and counted; N in a row stop", check_nonfinite),
    ("kill during checkpoint save", "previous last.ckpt intact", check_kill_during_save),
    ("data.on_bad_sample=skip", "bad samples replaced, counted, run ends", check_bad_sample_skip),
]
SIGTERM_FAULT = ("SIGTERM", "last.ckpt written, clean exit (status 0)", check_sigterm)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "mic_uda", "mic_uda.data", "hydra"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger().setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sigterm", action="store_true", help="also send SIGTERM to a real training process")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a deleted temp folder)")
    parser.add_argument("--only", nargs="*", help="run only faults whose name contains one of these words")
    args = parser.parse_args(argv)
    quiet()
    faults = [*FAULTS, SIGTERM_FAULT] if args.sigterm else list(FAULTS)
    if args.only:
        faults = [f for f in faults if any(w.lower() in f[0].lower() for w in args.only)]
    rows: list[tuple[str, str, str, str]] = []
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fault_check_")))
        work.mkdir(parents=True, exist_ok=True)
        for name, expected, fn in faults:
            t0 = time.monotonic()
            try:
                ok, observed = fn(work)
            except Exception as e:
                ok, observed = False, short(f"check crashed: {type(e).__name__}: {e}", work)
                traceback.print_exc()
            observed = f"{short(observed, work, 130)} ({time.monotonic() - t0:.1f}s)"
            rows.append((name, expected, observed, "pass" if ok else "FAIL"))
    widths = [
        max(len(r[i]) for r in [("fault", "expected behaviour", "observed", "result"), *rows])
        for i in range(4)
    ]
    line = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    print(line.format("fault", "expected behaviour", "observed", "result"))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line.format(*r))
    failed = [r[0] for r in rows if r[3] != "pass"]
    print(
        f"\n{len(rows) - len(failed)}/{len(rows)} pass" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
