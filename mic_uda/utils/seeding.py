"""Generators owned by a module, one stream per rank (masks must differ across DDP ranks), and the
global RNG states that checkpoints carry for exact resumption."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rank_generator(seed: int, rank: int, stream: int = 0) -> torch.Generator:
    """CPU generator seeded from (seed, rank, stream) so every rank and purpose has its own draws."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + rank * 7919 + stream * 104_729) % (2**63 - 1))
    return g


def global_rng_states() -> dict[str, Any]:
    """The global RNG states a training step draws from (dropout, drop-path): torch CPU, the current CUDA
    device (if initialised), numpy and ``random``; saved in checkpoints so a resumed run continues them."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _plain_numpy_state(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_global_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`global_rng_states` (a CUDA state is restored only where CUDA is in use)."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(states["cuda"])


def _plain_numpy_state(state: tuple) -> tuple:
    """numpy's state with the key array as a list: checkpoints load with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, gauss = state
    return (str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(gauss))
