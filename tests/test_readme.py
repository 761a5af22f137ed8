"""README snippets cannot drift (issue 18): the "Use MIC in your own loop" block runs as written, every
``python -m mic_uda.train|evaluate`` command of the README composes (Hydra's compose API, as the entry
point would; sweeps one value at a time; the ``--config-dir my_conf`` commands with the README's own
``my_conf/`` files) and its method config validates, and every ``python -m mic_uda.convert`` line parses
and names an existing preset."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from mic_uda.convert import parse_args
from mic_uda.tasks.method import parse_method
from mic_uda.utils.hydra_utils import CONFIG_DIR

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
ENTRY = re.compile(r"(python -m mic_uda\.(train|evaluate|convert)|mic-uda-(train|eval))\b")


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


@dataclass
class Command:
    line: int
    text: str
    entry: str  # train | evaluate | convert
    args: list[str] = field(default_factory=list)


def readme_commands() -> list[Command]:
    """Every command line in bash blocks and inline code spans, continuation lines joined."""
    found: list[tuple[int, str]] = []
    for m in FENCE.finditer(README):
        if m.group(1) not in ("bash", "sh", "shell", ""):
            continue
        first = README.count("\n", 0, m.start(2)) + 1
        joined, start = "", first
        for i, raw in enumerate(m.group(2).splitlines()):
            if not joined:
                start = first + i
            joined += raw.rstrip().removesuffix("\\") + " "
            if not raw.rstrip().endswith("\\"):
                found.append((start, joined))
                joined = ""
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), README)
    for m in re.finditer(r"`([^`\n]*(?:\n[^`\n]*)?)`", prose):
        found.append((prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())))
    commands = []
    for line, text in found:
        for hit in ENTRY.finditer(text):
            chunk = text[hit.start() :].split(" && ")[0].split(" | ")[0]
            tokens = shlex.split(chunk, comments=True)
            if tokens[0] == "python":
                n, entry = 3, tokens[2].removeprefix("mic_uda.")
            else:
                n, entry = 1, {"mic-uda-train": "train", "mic-uda-eval": "evaluate"}[tokens[0]]
            commands.append(Command(line, chunk.strip(), entry, tokens[n:]))
    return commands


def split_flags(args: list[str]) -> tuple[list[str], bool, str | None]:
    """Overrides, multirun?, --config-dir; other Hydra flags (--help, --cfg job) are dropped."""
    overrides, multirun, config_dir, skip = [], False, None, False
    for i, a in enumerate(args):
        if skip:
            skip = False
        elif a in ("-m", "--multirun"):
            multirun = True
        elif a in ("--config-dir", "-cd"):
            config_dir, skip = args[i + 1], True
        elif a in ("--cfg", "-c", "--package", "-p"):
            skip = True
        elif a.startswith("-"):
            continue
        else:
            overrides.append(a)
    return overrides, multirun, config_dir


def concrete(overrides: list[str]) -> list[list[str]]:
    """Placeholders made concrete (``...`` dropped, ``<x>`` -> a name, ``seed=S`` -> 0) and each sweep
    expanded one parameter at a time (the others at their first value); sweeper params are the sweeper's."""
    fixed = []
    for o in overrides:
        key, _, value = o.partition("=")
        if value == "..." or value.endswith("=..."):
            continue
        value = re.sub(r"<[^>]*>", "placeholder", value)
        fixed.append(f"{key}={'0' if key == 'seed' and value == 'S' else value}" if _ else o)
    parsed = OverridesParser.create().parse_overrides(fixed)
    plain, sweeps = [], []
    for o, text in zip(parsed, fixed):
        if o.is_sweep_override():
            if not o.key_or_group.startswith("hydra.sweeper.params."):
                sweeps.append((o.get_key_element(), list(o.sweep_string_iterator())))
        else:
            plain.append(text)
    if not sweeps:
        return [plain]
    first = [f"{k}={v[0]}" for k, v in sweeps]
    runs = []
    for i, (key, values) in enumerate(sweeps):
        for value in values:
            runs.append([*plain, *first[:i], f"{key}={value}", *first[i + 1 :]])
    return runs


def write_my_conf(root: Path) -> Path:
    """The README's ``my_conf/...yaml`` blocks, at the paths named right before each block."""
    written = 0
    for m in FENCE.finditer(README):
        if m.group(1) != "yaml":
            continue
        names = re.findall(r"`(my_conf/[\w/]+\.yaml)`", README[max(0, m.start() - 600) : m.start()])
        if names:
            path = root / names[-1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(m.group(2))
            written += 1
    assert written == 3, "the README's --config-dir section shows data/, recipe/ and experiment/ files"
    return root / "my_conf"


def test_use_mic_in_your_own_loop_runs_as_written() -> None:
    blocks = [
        m.group(2) for m in FENCE.finditer(section("Use MIC in your own loop")) if m.group(1) == "python"
    ]
    assert len(blocks) == 1
    assert 15 <= len(blocks[0].strip().splitlines()) <= 30  # "a complete ~20-line example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md: Use MIC in your own loop", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["step"] == 2
    t, s = dict(scope["teacher"].named_parameters()), dict(scope["student"].named_parameters())
    assert not any(p.requires_grad for p in t.values())
    assert all(not torch.equal(t[k], s[k]) for k in t)  # the teacher moved by EMA, not a copy


def test_every_readme_command_composes(tmp_path: Path) -> None:
    commands = readme_commands()
    runs = [c for c in commands if c.entry in ("train", "evaluate")]
    assert len(runs) >= 50, f"found only {len(runs)} train/evaluate commands: the extraction broke"
    assert any("--config-dir" in c.args for c in runs)
    my_conf = write_my_conf(tmp_path)
    failures, composed, seen = [], 0, set()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for c in runs:
            overrides, _, config_dir = split_flags(c.args)
            if config_dir is not None:
                assert config_dir == "my_conf", c.text
                overrides = [f"hydra.searchpath=[file://{my_conf}]", *overrides]
            for ov in concrete(overrides):
                if (c.entry, *ov) in seen:  # the same command elsewhere in the README
                    composed += 1
                    continue
                seen.add((c.entry, *ov))
                try:
                    cfg = compose(
                        "train" if c.entry == "train" else "eval", overrides=ov, return_hydra_config=True
                    )
                    if c.entry == "train":
                        parse_method(OmegaConf.to_container(cfg.method, resolve=True))
                    HydraConfig().set_config(cfg)
                    with open_dict(cfg):
                        cfg.paths.output_dir = str(tmp_path / "run")
                        del cfg["hydra"]
                    OmegaConf.to_container(cfg.get("data"), resolve=True)  # the interpolations resolve
                    composed += 1
                except Exception as e:  # every broken command is listed, not only the first
                    failures.append(f"README.md:{c.line}: {c.text!r} -> {ov}: {type(e).__name__}: {e}")
    GlobalHydra.instance().clear()
    assert not failures, "\n".join(failures)
    assert composed >= len(runs)


def test_readme_convert_commands_parse_and_name_a_preset() -> None:
    converts = [c for c in readme_commands() if c.entry == "convert" and "--preset" in c.args]
    assert len(converts) >= 2  # (a bare `python -m mic_uda.convert` in prose names the tool only)
    presets = {p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")}
    for c in converts:
        args = parse_args(c.args)
        assert args.preset in presets, c.text
