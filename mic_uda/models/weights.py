"""Local weight files: existence and key checks shared by every network (nothing downloads)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn


def require_weights_file(path: Path, encoder_name: str) -> None:
    """Say which file is expected and that nothing will be fetched, rather than a bare errno."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Encoder weights file not found: '{path}'. Expected a local ImageNet checkpoint for encoder "
            f"'{encoder_name}' (e.g. the official SegFormer '{encoder_name}.pth', or a timm checkpoint). "
            "Nothing is downloaded: place the file there or fix the path."
        )


def check_state_dict(
    module: nn.Module,
    state: Mapping[str, Tensor],
    encoder_name: str,
    source: str,
    header: str | None = None,
) -> None:
    """Fail early, listing the offending keys, instead of torch's wall of text or a silent partial load.
    ``header`` replaces the first line of the error (default: encoder weights of another architecture)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    default = (
        f"Encoder weights in '{source}' do not match encoder '{encoder_name}'; it is probably a checkpoint "
        "for a different architecture (e.g. another MiT/ViT size)."
    )
    lines = [header or default]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            lines.append(f"  {len(items)} {title}: " + ", ".join(items[:10]) + more)
    raise ValueError("\n".join(lines))
