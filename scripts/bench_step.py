"""Speed of mic_uda's real MIC training iteration vs the naive plain-PyTorch anchor, same process.

The anchor (``../shared/bench/mic_step_anchor.py``) times a bare MIC-style step on smp's SegFormer.
We time ``SegUDAModule``'s training step driven by a real Lightning ``Trainer`` (augmentation,
ClassMix, masking, EMA, optimiser and scheduler step, logging) on the *same network and shapes*
(``backbone=smp_segformer_b0``-style ``SmpSegNet``, 19 classes, data already in memory), and print
both times, peak memory and the ratio (target <= 1.15).

    python scripts/bench_step.py                      # CPU: MiT-B0, 192x192, batch 2 + 2, fp32
    python scripts/bench_step.py --encoder mit_b5 --size 512 --precision bf16-mixed   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mic_uda.tasks.seg import SegUDAModule

ANCHOR = Path(__file__).resolve().parents[1] / ".." / "shared" / "bench" / "mic_step_anchor.py"


class Repeat(Dataset):
    """The same in-memory sample forever (no data loading cost, like the anchor)."""

    def __init__(self, sample: dict[str, torch.Tensor], n: int) -> None:
        self.sample, self.n = sample, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.sample


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t = warmup, [], 0.0

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(trainer)
        if batch_idx == self.warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)


def time_mic_uda(args: argparse.Namespace, device: str) -> tuple[list[float], float]:
    b, s, c = args.batch, args.size, 19
    g = torch.Generator().manual_seed(0)
    src = {"image": torch.rand(3, s, s, generator=g), "label": torch.randint(0, c, (s, s), generator=g)}
    tgt = {"image": torch.rand(3, s, s, generator=g)}
    steps = args.warmup + args.steps
    from lightning.pytorch.utilities import CombinedLoader

    loader = CombinedLoader(
        {
            "source": DataLoader(Repeat(src, steps * b), batch_size=b),
            "target": DataLoader(Repeat(tgt, steps * b), batch_size=b),
        },
        mode="max_size_cycle",
    )
    module = SegUDAModule(
        net={
            "_target_": "mic_uda.models.smp_net.SmpSegNet",
            "arch": "Segformer",
            "encoder_name": args.encoder,
        },
        method={
            "name": "mic",
            "mix": {"weight": 1.0},
            "mic": {"block_size": 64, "ratio": 0.7, "weight": 1.0},
            "teacher": {"alpha": 0.999, "bn": args.teacher_bn},
            "student_bn": args.student_bn,
        },
        num_classes=c,
        class_names=[f"c{i}" for i in range(c)],
        optimizer={"_target_": "torch.optim.AdamW", "lr": 6e-5, "weight_decay": 0.01},
        scheduler={"warmup_steps": 10, "max_steps": steps},
        param_group_keys={},
        seed=0,
    )
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=args.precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return timer.times, peak


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="mit_b5" if gpu else "mit_b0")
    p.add_argument("--size", type=int, default=512 if gpu else 192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--precision", default="bf16-mixed" if gpu else "32-true")
    p.add_argument("--steps", type=int, default=20 if gpu else 12)
    p.add_argument("--warmup", type=int, default=5 if gpu else 2)
    p.add_argument("--teacher-bn", default="batch")
    p.add_argument("--student-bn", default="source")
    p.add_argument("--anchor", default=str(ANCHOR))
    args = p.parse_args()
    device = "cuda" if gpu else "cpu"
    os.environ.update({"ENCODER": args.encoder, "SIZE": str(args.size), "B": str(args.batch)})

    print(f"== anchor: {args.anchor}")
    anchor = runpy.run_path(args.anchor, run_name="anchor")  # prints its own JSON (fwd/bwd/FLOPs)
    anchor_ms_before = anchor["timeit"](anchor["uda_step"]) * 1e3
    print("== mic_uda SegUDAModule (Trainer-driven) ...")
    times, peak = time_mic_uda(args, device)
    anchor_ms_after = anchor["timeit"](anchor["uda_step"]) * 1e3
    ours_ms = statistics.median(times) * 1e3
    anchor_runs = (anchor["res"]["uda_ms"], anchor_ms_before, anchor_ms_after)
    anchor_ms = statistics.median(anchor_runs)  # like for like: median vs median, min vs min
    result = {
        "device": torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()} threads",
        "encoder": args.encoder,
        "size": args.size,
        "batch": f"{args.batch}+{args.batch}",
        "precision": args.precision,
        "anchor_uda_ms_median": round(anchor_ms, 1),
        "ratio_min_over_min": round(min(times) * 1e3 / min(anchor_runs), 3),
        "anchor_uda_ms_runs": [
            round(x, 1) for x in (anchor["res"]["uda_ms"], anchor_ms_before, anchor_ms_after)
        ],
        "mic_uda_ms_median": round(ours_ms, 1),
        "mic_uda_ms_min": round(min(times) * 1e3, 1),
        "ratio_median_over_median": round(ours_ms / anchor_ms, 3),
        "anchor_peak_GiB": anchor["res"]["uda_peak_GiB"],
        "mic_uda_peak_GiB": peak,
        "process_max_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(result, indent=1))
    print(
        f"ratio mic_uda / anchor: median {result['ratio_median_over_median']:.3f}, "
        f"min {result['ratio_min_over_min']:.3f} (target <= 1.15)"
    )


if __name__ == "__main__":
    main()
