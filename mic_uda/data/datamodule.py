"""The one place where a labelled source and an unlabelled target are paired (task-agnostic)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, default_collate

from mic_uda.data.bad_samples import SkipBadSamples, check_on_bad_sample
from mic_uda.data.rcs import RareClassSampling, RCSConfig, parse_rcs
from mic_uda.data.resumable import ResumableLoader, mix_seed
from mic_uda.utils.hydra_utils import instantiate_clearly

# Evaluation loaders are shuffled on purpose, in a fixed order (see UDADataModule._loader).
warnings.filterwarnings("ignore", message=r".*dataloader`'s sampler has shuffling enabled")


class WithoutLabels(Dataset):
    """Hides every label key of a target training set, so UDA methods cannot read target labels."""

    def __init__(self, dataset: Dataset, label_keys: tuple[str, ...] = ("label", "boxes", "labels")) -> None:
        self.dataset, self.label_keys = dataset, label_keys

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v for k, v in self.dataset[i].items() if k not in self.label_keys}


def eval_collate(items: list[Any]) -> Any:
    """``default_collate`` of an evaluation batch, with a clear error when its items differ in size
    (labels kept at their native resolution, ``native_label``, of a split whose frames differ in size):
    the message names the key and the sizes; ``data.datamodule.val_batch_size=1`` evaluates such a split."""
    try:
        return default_collate(items)
    except RuntimeError as e:
        if not items or not isinstance(items[0], Mapping):
            raise
        for key in items[0]:
            shapes = sorted({tuple(it[key].shape) for it in items if torch.is_tensor(it.get(key))})
            if len(shapes) > 1:
                raise ValueError(
                    f"evaluation batch: '{key}' differs in size across its {len(items)} items ({shapes}); "
                    "set data.datamodule.val_batch_size=1 (or resize these items to one size)"
                ) from e
        raise


def _build(cfg: Any, key: str) -> Dataset:
    if isinstance(cfg, Dataset):
        return cfg
    if cfg is None:
        raise ValueError(f"data.{key} is not set: expected a dataset config with a _target_")
    cfg = OmegaConf.create(cfg) if not isinstance(cfg, DictConfig) else cfg
    if "_target_" not in cfg:
        raise ValueError(f"data.{key} has no _target_: expected a dataset class path, got keys {list(cfg)}")
    missing = sorted(k if k.startswith(f"{key}.") else f"{key}.{k}" for k in OmegaConf.missing_keys(cfg))
    if missing:
        names = ", ".join(f"data.datamodule.{k}" for k in missing)
        raise ValueError(
            f"{names} not set (???): give it on the command line, e.g. {names.split(',')[0]}=/path"
        )
    dataset = instantiate_clearly(cfg)  # the dataset's own clear error, not Hydra's wrapper
    if len(dataset) == 0:
        raise ValueError(f"data.{key} ({cfg._target_}) is empty: check its root and split")
    return dataset


class UDADataModule(L.LightningDataModule):
    """Train batches ``{"source": {...}, "target": {...}}`` (max-size-cycle over both loaders);
    validation/test on the labelled target evaluation split.

    ``target_labels=True`` keeps target labels in training batches: only for the oracle.
    ``rcs`` (``data.rcs``): rare class sampling of the source (mic_uda.data.rcs) when ``enabled``.
    ``seed`` (the run seed): the training loaders' order and per-sample augmentation, which resume exactly
    from a checkpoint (mic_uda.data.resumable). ``on_bad_sample`` (``data.on_bad_sample``): ``error`` or
    ``skip`` unreadable samples (mic_uda.data.bad_samples).
    """

    def __init__(
        self,
        source: Mapping[str, Any] | Dataset,
        target: Mapping[str, Any] | Dataset,
        val: Mapping[str, Any] | Dataset,
        test: Mapping[str, Any] | Dataset | None = None,
        batch_size: int = 2,
        target_batch_size: int | None = None,
        val_batch_size: int = 4,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        target_labels: bool = False,
        rcs: Mapping[str, Any] | RCSConfig | None = None,
        seed: int = 0,
        on_bad_sample: str = "error",
    ) -> None:
        super().__init__()
        self.cfgs = {
            "source": source,
            "target": target,
            "val": val,
            "test": test if test is not None else val,
        }
        self.batch_size, self.target_batch_size = batch_size, target_batch_size or batch_size
        self.val_batch_size, self.num_workers = val_batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers and num_workers > 0
        self.target_labels = target_labels
        self.rcs = parse_rcs(rcs)
        self.seed, self.on_bad_sample = int(seed), check_on_bad_sample(on_bad_sample)
        self.datasets: dict[str, Dataset] = {}

    @property
    def rcs_enabled(self) -> bool:
        return self.rcs is not None and self.rcs.enabled

    def prepare_data(self) -> None:
        """Once per node, before DDP ranks set up (training only): fills the RCS statistics cache, so
        the one-off pass over the source labels is not run by every rank at once."""
        fitting = self.trainer is None or self.trainer.state.fn in (None, TrainerFn.FITTING)
        if self.rcs_enabled and fitting and "source" not in self.datasets:
            source = _build(self.cfgs["source"], "source")
            if not isinstance(source, RareClassSampling):
                RareClassSampling(source, self.rcs)  # type: ignore[arg-type]  # checks the type, fills the cache

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["source", "target", "val"], "validate": ["val"], "test": ["test"]}.get(
            stage or "fit", ["source", "target", "val", "test"]
        )
        for key in wanted:
            self._ensure_dataset(key)

    def _ensure_dataset(self, key: str) -> Dataset:
        """Build ``key``'s dataset once, wrapped as training needs it (hidden target labels, RCS,
        bad-sample skipping)."""
        if key not in self.datasets:
            ds = self._build_target_with_labels() if key == "target" and self.target_labels else None
            ds = ds if ds is not None else _build(self.cfgs[key], key)
            if key == "target" and not self.target_labels:
                ds = WithoutLabels(ds)
            if key == "source" and self.rcs_enabled and not isinstance(ds, RareClassSampling):
                ds = RareClassSampling(ds, self.rcs)  # type: ignore[arg-type]
            if self.on_bad_sample == "skip":
                ds = SkipBadSamples(ds, key)
            self.datasets[key] = ds
        return self.datasets[key]

    def _build_target_with_labels(self) -> Dataset | None:
        """The oracle reads the target training labels: a file-based target config that says
        ``with_labels: false`` (every non-oracle run hides them anyway) is built with labels; a target
        split without labels on disk is a one-line error. None when the config has no such switch."""
        cfg = self.cfgs["target"]
        if isinstance(cfg, Dataset) or cfg is None or "with_labels" not in cfg:
            return None
        cfg = OmegaConf.merge(
            OmegaConf.create(cfg) if not isinstance(cfg, DictConfig) else cfg, {"with_labels": True}
        )
        try:
            return _build(cfg, "target")
        except (FileNotFoundError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            msg = "method=oracle trains on the target's labels, but data.datamodule.target has none here"
            raise ValueError(f"{msg}: {first}") from e

    def _loader(self, key: str, batch_size: int) -> DataLoader:
        """An evaluation loader in a fixed shuffled order (its own generator: the same order every
        epoch and run, ``iter()`` off the global RNG). Not in file order, because a teacher that
        normalises with batch statistics (``method.teacher.bn=batch``) depends on what shares its
        batch: class-folder sets list images class by class, and class-pure batches of 500 cut the
        teacher's MNIST-M accuracy from 46 to 32 %. Confusion-matrix metrics ignore the order.
        Items of different sizes in one batch are a clear error (:func:`eval_collate`)."""
        return DataLoader(
            self.datasets[key],
            batch_size=batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            generator=torch.Generator().manual_seed(mix_seed(self.seed, 99)),
            collate_fn=eval_collate,
        )

    def _train_loader(self, key: str, batch_size: int, stream: int) -> ResumableLoader:
        """Seeded, exactly resumable order and augmentation (mic_uda.data.resumable), sharded per rank."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        loader = ResumableLoader(
            self.datasets[key],
            batch_size=batch_size,
            seed=self.seed,
            stream=stream,
            num_replicas=world,
            rank=rank,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )
        if len(loader) == 0:
            raise ValueError(
                f"data.{key} has {len(self.datasets[key])} samples: fewer than one batch of {batch_size} "  # type: ignore[arg-type]
                f"per device ({world} device(s)); lower the batch size or add data"
            )
        return loader

    def train_dataloader(self) -> CombinedLoader:
        loaders = {
            "source": self._train_loader("source", self.batch_size, stream=0),
            "target": self._train_loader("target", self.target_batch_size, stream=1),
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_batch_size)

    def target_eval_dataloader(self) -> DataLoader:
        """The target training images (each once, the evaluation loaders' fixed order), at the training
        target batch size: what evaluation-time BN re-estimation (``evaluate bn_stats=target``) reads;
        builds only that set. Items are as training sees them (the target set's own random crop/flip,
        drawn from the global RNG, which ``evaluate`` seeds)."""
        self._ensure_dataset("target")
        return self._loader("target", self.target_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size)
