"""Local weight files: existence and key checks shared by every network (nothing downloads)."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: first bytes of what torch.save writes: a zip archive (torch >= 1.6) or a bare pickle (legacy format)
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def require_weights_file(path: Path, encoder_name: str) -> None:
    """Say which file is expected and that nothing will be fetched, rather than a bare errno."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Encoder weights file not found: '{path}'. Expected a local ImageNet checkpoint for encoder "
            f"'{encoder_name}' (e.g. the official SegFormer '{encoder_name}.pth', or a timm checkpoint). "
            "Nothing is downloaded: place the file there or fix the path."
        )


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header starting with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def weights_file_format(path: str | Path, name: str) -> str:
    """``"safetensors"`` or ``"torch"`` from the file's first bytes (cheap: nothing is loaded), else a
    ValueError naming the file: a missing file, a text file, an image, an HTML page saved as .pth."""
    path = Path(path)
    require_weights_file(path, name)
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return "safetensors"
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(_TORCH_MAGIC):
        raise ValueError(
            f"'{path}' is not a PyTorch/safetensors weights file (it starts with {head!r}); backbone.weights "
            f"({name}) must be a state dict saved with torch.save (.pth/.pt/.bin) or safetensors"
        )
    return "torch"


def read_weights_file(path: str | Path, name: str) -> Any:
    """What a local weights file holds (a state dict, or a checkpoint dict around one), never pickled code.

    A safetensors file (by suffix or header) is read with safetensors, anything else with
    ``torch.load(weights_only=True)``. A file that is neither (a text file, an image, a truncated
    download) is a ValueError saying so and naming the file, instead of torch's unpickling traceback.
    ``name``: the encoder/network the file is for (the messages name it, e.g. ``"mit_b0"``).
    """
    path = Path(path)
    if weights_file_format(path, name) == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise ValueError(
                f"'{path}' is not a readable safetensors weights file ({err}); backbone.weights "
                f"({name}) must be a state dict saved with torch.save or safetensors"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"Could not read '{path}' with torch.load(weights_only=True): {first}. It is not a plain "
            "PyTorch weights file (truncated, or it pickles objects besides tensors); re-save only the "
            "state dict (a dict of tensors), e.g. torch.save(ckpt['state_dict'], new_path)."
        ) from None


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
