"""Generators owned by a module, one stream per rank (masks must differ across DDP ranks)."""

from __future__ import annotations

import torch


def rank_generator(seed: int, rank: int, stream: int = 0) -> torch.Generator:
    """CPU generator seeded from (seed, rank, stream) so every rank and purpose has its own draws."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + rank * 7919 + stream * 104_729) % (2**63 - 1))
    return g
