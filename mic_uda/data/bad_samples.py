"""``data.on_bad_sample``: what a corrupt or unreadable sample does to a run.

``error`` (default): the dataset's own error stops the run, naming the file (e.g. ``<path>: cannot read
image (...)``, ``<label>: label size (h, w) != image size ...``, ``<label>: label ids [..] outside 0..K-1``).

``skip``: :class:`SkipBadSamples` (applied by UDADataModule to every split) logs a warning naming the file
and returns the next readable index instead (index + 1, + 2, ... wrapping around); each item then carries
``bad_samples`` = how many bad samples were passed over to produce it, which
:class:`mic_uda.callbacks.BadSampleCounter` sums and logs (``train/bad_samples``, ``val/bad_samples``,
``test/bad_samples``). ``max_consecutive`` bad samples in a row still stop the run: that is a broken
dataset or configuration, not a few bad files. A replaced evaluation sample is counted twice in the
metrics; the warning says so.
"""

from __future__ import annotations

import logging
from typing import Any

from torch.utils.data import Dataset

log = logging.getLogger(__name__)

ON_BAD_SAMPLE = ("error", "skip")
#: what decoding a broken image/label raises (PIL: OSError, SyntaxError, ValueError), what the
#: datasets raise for size or id mismatches (ValueError), and truncated files (EOFError)
SAMPLE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError, RuntimeError)


def check_on_bad_sample(value: str) -> str:
    if value not in ON_BAD_SAMPLE:
        raise ValueError(f"data.on_bad_sample={value!r}; allowed: {', '.join(ON_BAD_SAMPLE)}")
    return value


class SkipBadSamples(Dataset):
    """Items of ``dataset``; an item that fails to load is logged and replaced by the next one that loads."""

    def __init__(self, dataset: Dataset, name: str, max_consecutive: int = 10) -> None:
        self.dataset, self.name, self.max_consecutive = dataset, name, max_consecutive

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, attr: str) -> Any:  # the wrapped dataset's attributes (class_names, ...)
        if attr == "dataset":  # not set yet (unpickling)
            raise AttributeError(attr)
        return getattr(self.dataset, attr)

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        failures: list[str] = []
        for k in range(min(self.max_consecutive, n)):
            j = (index + k) % n
            try:
                item = self.dataset[j]
            except SAMPLE_ERRORS as e:
                failures.append(f"#{j}: {e}")
                log.warning(
                    "data.on_bad_sample=skip: %s sample #%d is unreadable (%s: %s); using #%d instead%s",
                    self.name,
                    j,
                    type(e).__name__,
                    e,
                    (j + 1) % n,
                    "" if self.name in ("source", "target") else " (it counts twice in the evaluation)",
                )
                continue
            if isinstance(item, dict):
                item = {**item, "bad_samples": k}
            return item
        raise RuntimeError(
            f"data.{self.name}: {len(failures)} consecutive unreadable samples from #{index} on "
            f"(data.on_bad_sample=skip gives up after {self.max_consecutive}): " + "; ".join(failures[:3])
        )
