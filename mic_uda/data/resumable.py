"""Training loaders that resume exactly: the same batches, with the same augmentations, after a restart.

Lightning saves the ``state_dict()`` of every training DataLoader it finds to be stateful (lightning>=2.1:
``FitLoop.on_save_checkpoint`` -> ``CombinedLoader._state_dicts``) and hands it back before the first
batch of a resumed run. What makes that state small and exact:

* **Order.** :class:`ResumableSampler` is an endless stream of seeded permutations of the dataset (cycle
  ``c`` of the stream is ``randperm(n)`` drawn from ``(seed, stream, c)``); rank ``r`` of ``W`` takes the
  stream positions ``r, r + W, r + 2W, ...`` (as DistributedSampler, without padding). Every
  ``iter(loader)`` continues the stream where the last *delivered* batch ended, so Lightning's epochs,
  the max-size-cycle restarts of the shorter loader and DataLoader workers' prefetching change nothing:
  the state is the number of samples delivered.
* **Augmentation.** The sampler yields ``(index, seed)`` keys; :class:`SeededSamples` runs
  ``dataset[index]`` with torch's CPU generator, ``random`` and ``numpy.random`` seeded from the stream
  position (:func:`seeded_sample`) and restores them afterwards. Every random crop/flip/RCS draw of a
  dataset that uses the global RNGs is thus a function of (seed, stream, position), identical after a
  resume, in any worker process, and the training loop's own global RNG (dropout) is left untouched.
* **Worker seeds.** Every loader gets its own ``torch.Generator``, so creating an iterator does not
  draw from the global RNG (DataLoader does otherwise, once per ``iter``).

Compared with shuffling by ``RandomSampler`` and ``drop_last``: the order is still a uniformly random
permutation per pass over the data, but drawn from the run seed, and no sample is dropped at the end
of an epoch (epochs are windows on the stream).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)
STATE_VERSION = 1
_MASK64 = (1 << 64) - 1
_current_seed: int | None = None  # the per-sample seed in force in this process, if any


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 chained; stable across processes and runs)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def current_sample_seed() -> int | None:
    """The seed of the sample being loaded (inside :func:`seeded_sample`), else ``None``."""
    return _current_seed


@contextmanager
def seeded_sample(seed: int) -> Iterator[None]:
    """torch's CPU generator, ``random`` and ``numpy.random`` seeded with ``seed`` inside, restored after.

    Only the CPU generator: CUDA generators (dropout on the GPU) are never touched by data loading.
    """
    global _current_seed
    py_state, np_state, previous = random.getstate(), np.random.get_state(), _current_seed
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFF_FFFF)
        _current_seed = seed
        try:
            yield
        finally:
            _current_seed = previous
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededSamples(Dataset):
    """``dataset[index]`` under the key's per-sample seed (keys from :class:`ResumableSampler`).

    Plain integer indices (e.g. a sampler Lightning substituted) are passed through unseeded.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            with seeded_sample(seed):
                return self.dataset[index]
        return self.dataset[key]


class ResumableSampler(DistributedSampler):
    """An endless seeded permutation stream, shard ``rank`` of ``num_replicas``, read from ``start``.

    One iteration yields ``len(self)`` keys ``(index, sample seed)``: ``batches_per_pass`` whole batches
    (``(n // num_replicas) // batch_size``) from per-rank position ``start`` on. A DistributedSampler
    subclass so that Lightning keeps it under DDP instead of substituting its own; ``set_epoch`` is a
    no-op (the stream does not restart with Lightning's epochs).
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        seed: int,
        stream: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        # DistributedSampler's attributes, for code that inspects them (its __init__ needs torch.distributed)
        self.dataset_len, self.num_replicas, self.rank = int(dataset_len), int(num_replicas), int(rank)
        self.batch_size, self.seed, self.stream = int(batch_size), int(seed), int(stream)
        self.shuffle, self.drop_last, self.epoch = True, True, 0
        self.batches_per_pass = (self.dataset_len // self.num_replicas) // self.batch_size
        self.num_samples = self.total_size = self.batches_per_pass * self.batch_size
        self.start = 0  # per-rank stream position of the next iteration's first sample
        self._perm_cycle, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # recorded only: the stream position, not the epoch, decides the samples

    def permutation(self, cycle: int) -> torch.Tensor:
        if cycle != self._perm_cycle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.stream, cycle))
            self._perm, self._perm_cycle = torch.randperm(self.dataset_len, generator=g), cycle
        return self._perm

    def key(self, position: int) -> tuple[int, int]:
        """(dataset index, sample seed) at per-rank stream ``position``."""
        q = position * self.num_replicas + self.rank  # position in the global stream
        cycle, offset = divmod(q, self.dataset_len)
        return int(self.permutation(cycle)[offset]), mix_seed(self.seed, self.stream, q, 1)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        start = self.start
        for position in range(start, start + self.num_samples):
            yield self.key(position)


class _CountingIterator:
    """Counts the batches the consumer actually received (not those workers prefetched)."""

    def __init__(self, iterator: Iterator[Any], loader: ResumableLoader) -> None:
        self.iterator, self.loader = iterator, loader

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.loader.position += self.loader.sampler.batch_size
        return batch

    def __len__(self) -> int:
        return len(self.iterator)  # type: ignore[arg-type]


class ResumableLoader(DataLoader):
    """A training DataLoader over :class:`SeededSamples` with a :class:`ResumableSampler`, whose
    ``state_dict`` (the samples delivered per rank) Lightning stores in checkpoints.

    Construct it with ``dataset`` (the plain dataset), ``batch_size``, ``seed``, ``stream`` (one per loader,
    e.g. 0 = source, 1 = target), ``num_replicas``/``rank`` and the usual DataLoader keyword arguments.
    """

    sampler: ResumableSampler

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        stream: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        **kwargs: Any,
    ) -> None:
        for taken in ("shuffle", "sampler", "batch_sampler", "drop_last"):
            kwargs.pop(taken, None)  # Lightning re-instantiation passes them back: ours are decided here
        seeded = dataset if isinstance(dataset, SeededSamples) else SeededSamples(dataset)
        sampler = ResumableSampler(len(seeded), batch_size, seed, stream, num_replicas, rank)
        kwargs.setdefault("generator", torch.Generator().manual_seed(mix_seed(seed, stream, 2)))
        super().__init__(seeded, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self.position = 0  # per-rank samples delivered since the start of training

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.sampler.start = self.position
        return _CountingIterator(super().__iter__(), self)

    def state_dict(self) -> dict[str, Any]:
        s = self.sampler
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "num_replicas": s.num_replicas,
            "batch_size": s.batch_size,
            "dataset_len": s.dataset_len,
            "seed": s.seed,
            "stream": s.stream,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.sampler
        position = int(state["position"])
        changed = {
            k: (state.get(k), getattr(s, k))
            for k in ("num_replicas", "batch_size", "dataset_len", "seed")
            if state.get(k) != getattr(s, k)
        }
        if changed:
            log.warning(
                "resuming the training loader (stream %d) with changed settings %s (checkpoint, now): "
                "the run continues at the same point of the data stream but not exactly as it would have",
                s.stream,
                changed,
            )
            if state.get("num_replicas") and state["num_replicas"] != s.num_replicas:
                position = position * int(state["num_replicas"]) // s.num_replicas
        self.position = position
