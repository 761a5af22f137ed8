"""`python -m mic_uda.convert <official.pth> --to <ours.ckpt> --preset <experiment> [overrides]`.

Turns a checkpoint of the official DAFormer / HRDA / MIC segmentation code (lhoyer/DAFormer, lhoyer/HRDA,
lhoyer/MIC ``seg/``: mmseg 0.16 + mmcv runner files, ``{"meta", "state_dict", "optimizer"}``) into a
Lightning checkpoint of :class:`~mic_uda.tasks.seg.SegUDAModule` that ``python -m mic_uda.evaluate`` loads,
so a user can check this project against the published numbers on their own copy of the target data.

The key maps are derived from the official module names (read at lhoyer/MIC 2f932a9, ``seg/mmseg/models``):

* UDA wrapper (``uda/uda_decorator.py``, ``uda/dacs.py``): ``model.*`` = the student (what the official
  ``tools/test.py`` evaluates), ``ema_model.*`` = the EMA teacher, ``imnet_model.*`` = the frozen ImageNet
  network of the Feature Distance (only its encoder is used here); a checkpoint of a plain segmentor
  (no wrapper: ``backbone.*``/``decode_head.*``) is the student alone.
* ``backbones/mix_transformer.py`` (MiT): the same names as segmentation-models-pytorch's MiT encoder
  (``patch_embed1.proj``, ``block1.0.attn.q``, ``norm1``, ...), so ``backbone.*`` -> ``encoder.*``.
* ``decode_heads/daformer_head.py`` + ``aspp_head.py`` / ``sep_aspp_head.py`` + mmcv ``ConvModule``
  (``conv``/``bn``) and ``DepthwiseSeparableConvModule`` (``depthwise_conv``/``pointwise_conv``):
  ``embed_layers.<i>.proj`` (a Linear, ``segformer_head.py`` MLP) -> our 1x1 conv ``head.embed.<i>``,
  ``fuse_layer.aspp_modules.<i>`` -> ``head.fusion.branches.<i>``, ``fuse_layer.bottleneck`` ->
  ``head.fusion.bottleneck``, ``conv_seg`` -> ``head.classifier``.
* HRDA (``decode_heads/hrda_head.py``): ``decode_head.head.*`` = the DAFormer head of both scales ->
  ``base.head.*``, ``decode_head.scale_attention.*`` = the attention head (a DAFormer head whose fusion
  is one 1x1 ``ConvModule``: ``fuse_layer.conv``/``fuse_layer.bn``) -> ``attention_head.*``,
  ``backbone.*`` -> ``base.encoder.*``.

Adding a network family is one more entry in :data:`NETWORK_MAPS` (prefix -> (our prefix, rule table)).
Every official tensor must land on one of ours and every one of ours must be filled, with the shapes
equal; otherwise the error lists the unmapped, missing and mismatched keys. No released checkpoint was
available where this was written: the maps are tested on state dicts built with the official names and
shapes (tests/test_convert.py), not on a released file.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from torch import Tensor, nn

from mic_uda.utils.checkpointing import atomic_torch_save

#: a rule: official key (regex, relative to the prefix) -> our key (template), optional tensor transform
Rule = tuple[str, str, Callable[[Tensor], Tensor] | None]


def linear_to_conv1x1(v: Tensor) -> Tensor:
    """An ``nn.Linear`` weight ``(out, in)`` as the equivalent 1x1 conv weight ``(out, in, 1, 1)``."""
    return v.reshape(*v.shape, 1, 1) if v.dim() == 2 else v


def _conv_module(official: str, ours: str) -> list[Rule]:
    """mmcv ``ConvModule`` (``conv`` + ``bn``) -> our ``nn.Sequential(conv, bn, relu)`` (``0``/``1``)."""
    return [
        (rf"{official}\.conv\.(?P<p>weight|bias)", rf"{ours}.0.\g<p>", None),
        (rf"{official}\.bn\.(?P<p>.+)", rf"{ours}.1.\g<p>", None),
    ]


#: SegFormer MiT (official mix_transformer.py) -> smp's MiT: the names are the same
MIT_ENCODER: list[Rule] = [(r"(.+)", r"\1", None)]

#: DAFormerHead (official daformer_head.py, context-aware fusion with separable ASPP, or HRDA's 1x1 fusion)
DAFORMER_HEAD: list[Rule] = [
    (r"embed_layers\.(\d+)\.proj\.weight", r"embed.\1.weight", linear_to_conv1x1),
    (r"embed_layers\.(\d+)\.proj\.bias", r"embed.\1.bias", None),
    *_conv_module(r"fuse_layer\.aspp_modules\.(\d+)", r"fusion.branches.\1"),  # dilation 1: a 1x1 ConvModule
    *_conv_module(r"fuse_layer\.aspp_modules\.(\d+)\.depthwise_conv", r"fusion.branches.\1.depthwise"),
    *_conv_module(r"fuse_layer\.aspp_modules\.(\d+)\.pointwise_conv", r"fusion.branches.\1.pointwise"),
    *_conv_module(r"fuse_layer\.bottleneck", r"fusion.bottleneck"),
    *_conv_module(r"fuse_layer", r"fusion"),  # HRDA's scale attention: fusion_cfg type 'conv', kernel 1
    (r"conv_seg\.(weight|bias)", r"classifier.\1", None),
]

#: network family -> {official prefix inside a segmentor: (our prefix inside the network, rules)};
#: the longest official prefix wins. An HRDA DeepLabV2 or a DAFormer DeepLabV2 entry is one more table.
NETWORK_MAPS: dict[str, dict[str, tuple[str, list[Rule]]]] = {
    "daformer": {
        "backbone.": ("encoder.", MIT_ENCODER),
        "decode_head.": ("head.", DAFORMER_HEAD),
    },
    "hrda_daformer": {
        "backbone.": ("base.encoder.", MIT_ENCODER),
        "decode_head.head.": ("base.head.", DAFORMER_HEAD),
        "decode_head.scale_attention.": ("attention_head.", DAFORMER_HEAD),
    },
}

#: official UDA wrapper attribute -> our LightningModule attribute (uda_decorator.py / dacs.py); the
#: ImageNet network is the frozen copy inside our Feature Distance term, found by its class (fd_prefix)
UDA_MODELS = {"model.": "student.", "ema_model.": "teacher.", "imnet_model.": "<fd>"}


def fd_prefix(module: nn.Module) -> str:
    """Where our Feature Distance term keeps its frozen ImageNet network (``<path>.imagenet.``)."""
    from mic_uda.uda.feature_distance import ImageNetFeatureDistance

    found = [n for n, m in module.named_modules() if isinstance(m, ImageNetFeatureDistance)]
    return f"{found[0]}.imagenet." if found else "<no method.fd in this preset>."


def network_family(network: nn.Module) -> str:
    """Which :data:`NETWORK_MAPS` entry fits our network (by class, never by preset name)."""
    from mic_uda.models.daformer import DAFormerNet
    from mic_uda.models.hrda import HRDANet

    if isinstance(network, HRDANet) and isinstance(network.base, DAFormerNet):
        return "hrda_daformer"
    if isinstance(network, DAFormerNet) and str(network.encoder_name).startswith("mit_"):
        return "daformer"
    raise ValueError(
        f"no official key map for {type(network).__name__} "
        f"({getattr(network, 'encoder_name', '?')}): mic_uda.convert knows DAFormer (MiT) and HRDA(DAFormer, "
        f"MiT) checkpoints; add a table to mic_uda.convert.NETWORK_MAPS for another network"
    )


def map_network_key(key: str, family: str) -> str | None:
    """An official segmentor key (``backbone.*``/``decode_head.*``) -> ours inside the network, or None."""
    tables = NETWORK_MAPS[family]
    for prefix in sorted(tables, key=len, reverse=True):
        if key.startswith(prefix):
            ours, rules = tables[prefix]
            rest = key[len(prefix) :]
            for pattern, template, _ in rules:
                m = re.fullmatch(pattern, rest)
                if m:
                    return ours + m.expand(template)
            return None
    return None


def _transform(key: str, family: str) -> Callable[[Tensor], Tensor] | None:
    for prefix in sorted(NETWORK_MAPS[family], key=len, reverse=True):
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            return next((t for p, _, t in NETWORK_MAPS[family][prefix][1] if re.fullmatch(p, rest)), None)
    return None


def official_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """The tensors of an official checkpoint (mmcv runner ``{"state_dict": ...}`` or a bare state dict),
    ``module.`` (DataParallel) stripped."""
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not any(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"'{source}' holds no state dict (expected an mmseg/mmcv checkpoint)")
    return {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}


def convert_state_dict(
    official: Mapping[str, Tensor], module: nn.Module, source: str = "the checkpoint"
) -> tuple[dict[str, Tensor], list[str]]:
    """Official keys -> a full state dict of ``module`` (a SegUDAModule); returns it and the official keys
    deliberately dropped (the ImageNet network's decode head: FD uses its encoder only).

    Raises a ValueError listing every unmapped official key (with where it would have gone), every key of
    ours left unfilled and every shape mismatch."""
    family = network_family(module.get_submodule("student"))
    expected = module.state_dict()
    ours_of = {**UDA_MODELS, "imnet_model.": fd_prefix(module)}
    wrapped = any(k.startswith(tuple(UDA_MODELS)) for k in official)
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    dropped: list[str] = []
    for key, value in official.items():
        top = next((p for p in UDA_MODELS if key.startswith(p)), None) if wrapped else "model."
        rest = key[len(top) :] if wrapped and top else key
        if top is None:
            unmapped.append(f"{key} (not model./ema_model./imnet_model.)")
            continue
        if top == "imnet_model.":
            if not rest.startswith("backbone."):
                dropped.append(key)
                continue
            # FD's frozen copy is of the feature network (HRDA: its base) with the head dropped
            mapped, transform = "encoder." + rest[len("backbone.") :], None
        else:
            mapped = map_network_key(rest, family)
            transform = _transform(rest, family)
        if mapped is None:
            unmapped.append(f"{key} (no rule in NETWORK_MAPS['{family}'])")
            continue
        ours = ours_of[top] + mapped
        if ours not in expected:
            unmapped.append(f"{key} -> {ours} (no such key here)")
            continue
        out[ours] = transform(value) if transform is not None else value
    missing = [k for k in expected if k not in out]
    shapes = [
        f"{k}: official {tuple(v.shape)} vs ours {tuple(expected[k].shape)}"
        for k, v in out.items()
        if v.shape != expected[k].shape
    ]
    if unmapped or missing or shapes:
        lines = [f"'{source}' does not convert into this preset's network ({family}):"]
        for title, items in (
            ("unmapped official keys", unmapped),
            ("keys of ours not filled", missing),
            ("shape mismatches", shapes),
        ):
            if items:
                more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:10]) + more)
        if missing and all(k.startswith("teacher.") for k in missing):
            lines.append(
                "  (no ema_model.* in the file: a source-only run; use a preset with method=source_only)"
            )
        if missing and all(k.startswith(ours_of["imnet_model."]) for k in missing):
            lines.append("  (no imnet_model.* in the file: add method.fd=null to the overrides)")
        raise ValueError("\n".join(lines))
    return {k: out[k].to(expected[k].dtype).contiguous() for k in expected}, dropped


def build_preset_module(preset: str, overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """The SegUDAModule ``python -m mic_uda.train experiment=<preset> <overrides>`` would train, and its
    config (no ImageNet weights are read: the converted file carries every tensor)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mic_uda.utils.hydra_utils import CONFIG_DIR, instantiate_clearly, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}", *overrides])
    if cfg.task.name != "seg":
        raise ValueError(
            f"--preset {preset} is a {cfg.task.name} preset; mic_uda.convert converts segmentation"
        )
    return instantiate_clearly(cfg.task.module, _recursive_=False), cfg


def load_official(path: Path) -> Any:
    """An official file, read as data only (mmcv checkpoints hold tensors, dicts, strings and numbers)."""
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist (expected an official .pth checkpoint)")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise ValueError(f"'{path}' is not a PyTorch checkpoint file (it starts with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(
            f"'{path}' holds more than tensors and plain data ({first}); if you trust the file, re-save "
            "its weights first: torch.save(torch.load(f, weights_only=False)['state_dict'], 'weights.pth')"
        ) from None


def convert(src: str | Path, dst: str | Path, preset: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Convert ``src`` (official) into ``dst`` (ours) for ``experiment=<preset> <overrides>``; returns a
    summary (counts per network, dropped keys, the data config to evaluate with)."""
    src, dst = Path(src), Path(dst)
    raw = load_official(src)
    official = official_state_dict(raw, str(src))
    module, cfg = build_preset_module(preset, overrides)
    state, dropped = convert_state_dict(official, module, str(src))
    meta = raw.get("meta", {}) if isinstance(raw, Mapping) else {}
    classes = list(meta.get("CLASSES") or []) if isinstance(meta, Mapping) else []
    ours = list(module.hparams["class_names"])
    if classes and [str(c).lower() for c in classes] != [str(c).lower() for c in ours]:
        raise ValueError(
            f"'{src}' was trained on the classes {classes}; --preset {preset} has {ours} "
            f"(data={cfg.data.name})"
        )
    step = int(meta.get("iter", 0) or 0) if isinstance(meta, Mapping) else 0
    checkpoint = {
        "epoch": 0,
        "global_step": step,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": state,
        "hyper_parameters": dict(module.hparams),
        "mic_uda_module": f"{type(module).__module__}.{type(module).__qualname__}",
        "mic_uda_converted_from": {"file": str(src), "preset": preset, "overrides": list(overrides)},
    }
    atomic_torch_save(checkpoint, dst)
    counts = {
        name: sum(k.startswith(p) for k in state)
        for name, p in (("student", "student."), ("teacher", "teacher."), ("fd", fd_prefix(module)))
    }
    return {"tensors": counts, "dropped": dropped, "data": cfg.data.name, "step": step, "to": str(dst)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mic_uda.convert",
        description="Convert an official DAFormer/HRDA/MIC (mmseg) segmentation checkpoint into a mic_uda "
        "checkpoint that `python -m mic_uda.evaluate ckpt_path=...` loads.",
        epilog="example: python -m mic_uda.convert mic_hrda_gta2cs.pth --to mic_hrda.ckpt --preset "
        "mic_hrda_gta2cs  (then: python -m mic_uda.evaluate ckpt_path=mic_hrda.ckpt data=gta2cs ...)",
    )
    parser.add_argument("official", type=Path, help="the official .pth (mmcv runner checkpoint)")
    parser.add_argument("--to", required=True, type=Path, help="where to write our .ckpt")
    parser.add_argument(
        "--preset", required=True, help="the experiment config it corresponds to (conf/experiment)"
    )
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. method.fd=null")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; config overrides may come before or after the options."""
    return build_parser().parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = convert(args.official, args.to, args.preset, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    tensors = ", ".join(f"{k} {v}" for k, v in summary["tensors"].items() if v)
    print(f"wrote {summary['to']} (step {summary['step']}; tensors: {tensors})")
    if summary["dropped"]:
        print(
            f"dropped {len(summary['dropped'])} tensors of the frozen ImageNet network's decode head (unused)"
        )
    print(f"evaluate: python -m mic_uda.evaluate ckpt_path={summary['to']} data={summary['data']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
