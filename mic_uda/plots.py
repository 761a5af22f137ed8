"""Result figures of a sweep: per-class bars and learning curves (``collect_results.py --plot``).

Input: the runs that ``scripts/collect_results.py`` loads, one dict per run folder (its
``metrics.json`` plus ``dir`` and ``overrides``). Runs are grouped by (task, data); within a group one
entry per method (plus the command-line overrides that tell runs apart beyond the seed, as the table's
``overrides`` column), averaged over seeds.

- :func:`class_bars`: per-class IoU (seg) / accuracy (cls) / AP50 (det) of each run's handed-over
  model (the network of its ``primary_metric``: ``test/recalibrated/*`` or ``test/student/*``), one
  group per class plus the mean (the table's metric), one bar per method, error bars = std over seeds
  (sample std, as the table).
- :func:`learning_curves`: the primary metric (``val/<student|teacher>/<mIoU|acc|...>``) against the
  training step from each run's ``csv/metrics.csv``: mean over seeds as a line, min-max over seeds as
  a band, student and teacher side by side.

Each function returns the numbers behind the figure (dataclasses) so they can be checked;
:func:`write_figures` draws them (matplotlib, Agg backend: no display) as one PNG + one SVG per figure,
at a fixed size readable at README width, with colours fixed per method across all figures.
matplotlib is imported only when drawing.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: per-class metric keys of each task: ``test/<net>/<prefix><class>``
CLASS_PREFIX = {"seg": "IoU_", "cls": "acc_", "det": "AP50_"}
CLASS_AXIS = {"seg": "IoU (%)", "cls": "accuracy (%)", "det": "AP50 (%)"}
#: primary metric of runs whose metrics.json predates the "primary_metric" entry
DEFAULT_PRIMARY = {"seg": "test/mIoU", "cls": "test/acc", "det": "test/mAP50"}

#: colours fixed per method name (every figure, every invocation): baselines grey/black, MIC red
METHOD_COLOURS = {
    "source_only": "#7f7f7f",
    "dacs": "#1f77b4",
    "mic": "#d62728",
    "sdat": "#2ca02c",
    "sdat_mic": "#9467bd",
    "sada": "#8c564b",
    "sada_mic": "#ff7f0e",
    "oracle": "#222222",
}
#: for variants (method + overrides) and unknown methods, in order of their label
SPARE_COLOURS = ["#e377c2", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5"]
#: the order of methods in legends and bar groups (the oracle, an upper bound, last)
METHOD_ORDER = ["source_only", "dacs", "mic", "sdat", "sdat_mic", "sada", "sada_mic"]

#: every figure: README width (about 900 px displayed), fixed so the PNG size is known
FIGSIZE = (10.0, 3.8)
DPI = 120
NETS = ("handover", "student", "teacher", "recalibrated")


# --------------------------------------------------------------------------- grouping
def _differing(runs: Sequence[dict]) -> list[list[str]]:
    sets = [set(r.get("overrides", [])) for r in runs]
    common = set.intersection(*sets) if sets else set()
    return [sorted(s - common) for s in sets]


def differing_overrides(runs: Sequence[dict]) -> list[str]:
    """Per run, its command-line overrides that not every run shares (space-joined, sorted): what
    tells an Optuna trial or a ``method.mic.ratio=0.5,0.7`` sweep apart beyond method and seed."""
    return [" ".join(d) for d in _differing(runs)]


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=")[0]


def method_labels(runs: Sequence[dict]) -> list[str]:
    """The legend entry of each run: its method, plus the overrides that set it apart. An override
    that only restates the method (one value per method of a (task, data), as
    ``-m experiment=camvid_day2dusk_dacs,camvid_day2dusk_mic``) is left out of the label."""
    diffs = _differing(runs)
    keys = {_override_key(o) for d in diffs for o in d}
    values: dict[tuple, set] = defaultdict(set)
    for r, d in zip(runs, diffs, strict=True):
        given = {_override_key(o): o for o in d}
        for k in keys:
            values[(r.get("task", "seg"), r.get("data", "?"), k, r.get("method", "?"))].add(given.get(k))
    split = {(task, data, k) for (task, data, k, _), v in values.items() if len(v) > 1}
    labels = []
    for r, d in zip(runs, diffs, strict=True):
        group = (r.get("task", "seg"), r.get("data", "?"))
        kept = [o for o in d if (*group, _override_key(o)) in split]
        labels.append(" ".join([str(r.get("method", "?")), *kept]))
    return labels


def method_order(labels: Sequence[str]) -> list[str]:
    """Distinct labels in a reader's order: source-only first, the methods, the oracle last."""

    def key(label: str) -> tuple[int, str]:
        base = label.split(" ")[0]
        if base == "oracle":
            return (len(METHOD_ORDER) + 1, label)
        return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), label)

    return sorted(dict.fromkeys(labels), key=key)


def method_colours(labels: Sequence[str]) -> dict[str, str]:
    """A colour per label: the method's fixed colour, the spare ones (in label order) for variants and
    unknown methods; the same for every figure drawn from the same runs."""
    colours: dict[str, str] = {}
    spare = iter(SPARE_COLOURS * (1 + len(labels) // len(SPARE_COLOURS)))
    for label in sorted(dict.fromkeys(labels)):
        colours[label] = METHOD_COLOURS.get(label) or next(spare)
    return colours


def run_primary(run: dict) -> str:
    """The run's own primary metric, else the task's default, else whichever known key it has."""
    if run.get("primary_metric"):
        return str(run["primary_metric"])
    if run.get("task") in DEFAULT_PRIMARY:
        return DEFAULT_PRIMARY[run["task"]]
    return next((m for m in DEFAULT_PRIMARY.values() if m in run.get("metrics", {})), "test/mIoU")


def run_net(run: dict, net: str = "handover") -> str:
    """The network whose test numbers stand for the run: its primary metric's (``handover``) or the
    named one. ``test/mIoU`` (no network in the key) is the student's."""
    if net != "handover":
        return net
    parts = run_primary(run).split("/")
    return parts[1] if len(parts) == 3 else "student"


def class_names(run: dict) -> list[str]:
    """The dataset's class order from the run's ``.hydra/config.yaml`` (``data.class_names``), else
    the order of the per-class keys in its metrics."""
    path = Path(run.get("dir", "")) / ".hydra" / "config.yaml"
    if path.is_file():
        cfg = yaml.safe_load(path.read_text()) or {}
        names = (cfg.get("data") or {}).get("class_names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    prefix = f"test/{run_net(run)}/{CLASS_PREFIX.get(run.get('task', 'seg'), 'IoU_')}"
    return [k[len(prefix) :] for k in run.get("metrics", {}) if k.startswith(prefix)]


def groups(runs: Sequence[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """``{(task, data): {label: [runs over seeds]}}``, labels in :func:`method_order`."""
    out: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(dict)
    labelled = defaultdict(list)
    for run, label in zip(runs, method_labels(runs), strict=True):
        labelled[(run.get("task", "seg"), run.get("data", "?"), label)].append(run)
    for (task, data, label), rs in labelled.items():
        out[(task, data)][label] = rs
    return {k: {label: v[label] for label in method_order(list(v))} for k, v in sorted(out.items())}


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample std (0 for one value) of the finite values, and how many there are."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


# --------------------------------------------------------------------------- the numbers
@dataclass
class ClassBars:
    """One bar figure: ``mean[m][c]`` / ``std[m][c]`` / ``n[m][c]`` for method ``methods[m]`` and
    group ``groups[c]`` (the classes, then the mean metric, e.g. ``mIoU``)."""

    task: str
    data: str
    axis: str
    groups: list[str]
    methods: list[str]
    nets: list[str]  # per method: the network of its numbers (recalibrated / student / teacher)
    mean: list[list[float]]
    std: list[list[float]]
    n: list[list[int]]
    colours: dict[str, str] = field(default_factory=dict)


@dataclass
class Curve:
    """One line + band: the mean / min / max over the seeds that logged each step."""

    method: str
    net: str
    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    seeds: int


@dataclass
class LearningCurves:
    task: str
    data: str
    metric: str  # e.g. mIoU: the csv columns val/student/mIoU and val/teacher/mIoU
    panels: dict[str, list[Curve]]  # "student" / "teacher" -> one curve per method
    colours: dict[str, str] = field(default_factory=dict)


def class_bars(runs: Sequence[dict], net: str = "handover") -> list[ClassBars]:
    """Per (task, data): the per-class metric and the mean metric of each method, over seeds."""
    labels = method_labels(runs)
    colours = method_colours(labels)
    out = []
    for (task, data), by_method in groups(runs).items():
        prefix = CLASS_PREFIX.get(task, "IoU_")
        first = next(iter(by_method.values()))[0]
        names = class_names(first)
        leaf = run_primary(first).split("/")[-1]
        bars = ClassBars(task, data, CLASS_AXIS.get(task, "%"), [*names, leaf], [], [], [], [], [], colours)
        for label, rs in by_method.items():
            nets = sorted({run_net(r, net) for r in rs})
            row = []
            for name in names:
                row.append(mean_std([r["metrics"].get(f"test/{run_net(r, net)}/{prefix}{name}") for r in rs]))
            row.append(mean_std([summary_value(r, net) for r in rs]))
            bars.methods.append(label)
            bars.nets.append("/".join(nets))
            bars.mean.append([m for m, _, _ in row])
            bars.std.append([s for _, s, _ in row])
            bars.n.append([k for _, _, k in row])
        out.append(bars)
    return out


def summary_value(run: dict, net: str = "handover") -> float | None:
    """The run's mean metric for the chosen network: its primary metric for ``handover``."""
    m = run.get("metrics", {})
    if net == "handover":
        return m.get(run_primary(run))
    return m.get(f"test/{net}/{run_primary(run).split('/')[-1]}")


def read_curve(run_dir: Path, column: str) -> dict[int, float]:
    """``{step: value}`` of one column of the run's ``csv/metrics.csv`` (the last value of a step that
    was logged twice, e.g. by a resumed run); empty when the file or column is missing."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return {}
    out: dict[int, float] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            value, step = row.get(column), row.get("step")
            if value not in (None, "") and step not in (None, ""):
                out[int(float(step))] = float(value)
    return out


def learning_curves(runs: Sequence[dict]) -> list[LearningCurves]:
    """Per (task, data): student and teacher validation metric against the step, per method, over the
    steps that every seed of that method logged."""
    colours = method_colours(method_labels(runs))
    out = []
    for (task, data), by_method in groups(runs).items():
        metric = run_primary(next(iter(by_method.values()))[0]).split("/")[-1]
        panels: dict[str, list[Curve]] = {"student": [], "teacher": []}
        for label, rs in by_method.items():
            for net, curves in panels.items():
                per_seed = [read_curve(Path(r["dir"]), f"val/{net}/{metric}") for r in rs]
                per_seed = [c for c in per_seed if c]
                if not per_seed:
                    continue
                steps = sorted(set.intersection(*(set(c) for c in per_seed)))
                vals = [[c[s] for c in per_seed] for s in steps]
                curves.append(
                    Curve(
                        label,
                        net,
                        steps,
                        [statistics.fmean(v) for v in vals],
                        [min(v) for v in vals],
                        [max(v) for v in vals],
                        len(per_seed),
                    )
                )
        panels = {k: v for k, v in panels.items() if v}
        if panels:
            out.append(LearningCurves(task, data, metric, panels, colours))
    return out


# --------------------------------------------------------------------------- drawing
def new_figure(figsize: tuple[float, float] = FIGSIZE) -> Any:
    """A matplotlib Figure on the Agg canvas, outside pyplot: no display, no global backend switch
    (a notebook's own backend is left alone), nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, stem: Path) -> list[Path]:
    """PNG + SVG; the same runs give the same files (no date in the SVG, fixed SVG ids), so
    regenerated figures committed to the README do not change for nothing."""
    import matplotlib

    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=DPI)
    with matplotlib.rc_context({"svg.hashsalt": "mic_uda"}):
        fig.savefig(paths[1], metadata={"Date": None})
    return paths


def draw_class_bars(bars: ClassBars, stem: Path) -> list[Path]:
    """Grouped bars with std error bars; the mean group set off by a dotted line."""
    fig = new_figure()
    ax = fig.subplots()
    k, g = len(bars.methods), len(bars.groups)
    width = 0.8 / max(k, 1)
    for m, label in enumerate(bars.methods):
        xs = [c + (m - (k - 1) / 2) * width for c in range(g)]
        legend = label if len(set(bars.nets)) == 1 else f"{label} ({bars.nets[m]})"
        n_seeds = max(bars.n[m], default=0)
        legend += f", {n_seeds} seed{'s' if n_seeds != 1 else ''}"
        ax.bar(
            xs,
            bars.mean[m],
            width,
            yerr=bars.std[m],
            color=bars.colours.get(label),
            label=legend,
            error_kw={"elinewidth": 0.8, "capsize": 1.5},
        )
    if g > 1:
        ax.axvline(g - 1.5, color="0.6", linestyle=":", linewidth=1)
    ax.set_xticks(range(g), bars.groups, rotation=30 if g > 8 else 0, ha="right" if g > 8 else "center")
    ax.set_xlim(-0.6, g - 0.4)
    ax.set_ylabel(bars.axis)
    ax.set_ylim(0, 100 if all(v <= 100 for row in bars.mean for v in row if not math.isnan(v)) else None)
    net = bars.nets[0] if len(set(bars.nets)) == 1 else "per method"
    what = bars.axis.split(" ")[0]
    ax.set_title(f"{bars.data}: per-class {what} on the target ({net}; mean ± std over seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(ncols=min(k, 4), fontsize=8, loc="outside lower center", frameon=False)
    return _save(fig, stem)


def draw_learning_curves(curves: LearningCurves, stem: Path) -> list[Path]:
    """Student | teacher panels, shared y: mean line, min-max band over seeds."""
    names = list(curves.panels)
    fig = new_figure()
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)
    for ax, net in zip(axes[0], names, strict=True):
        for c in curves.panels[net]:
            colour = curves.colours.get(c.method)
            label = f"{c.method} ({c.seeds} seed{'s' * (c.seeds != 1)})"
            marker = "o" if len(c.steps) <= 20 else None  # sparse validation: show where it was measured
            ax.plot(c.steps, c.mean, color=colour, label=label, marker=marker, markersize=4)
            if c.seeds > 1:
                ax.fill_between(c.steps, c.low, c.high, color=colour, alpha=0.2, linewidth=0)
        ax.set_title(f"{net}")
        ax.set_xlabel("training step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    axes[0][0].set_ylabel(f"target val {curves.metric}")
    fig.suptitle(f"{curves.data}: target validation {curves.metric} (mean, min-max over seeds)", fontsize=10)
    return _save(fig, stem)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def write_figures(runs: Sequence[dict], out_dir: Path, net: str = "handover") -> dict[str, Any]:
    """Draw every figure of ``runs`` into ``out_dir`` (``class_bars_<task>_<data>.png|svg`` and
    ``learning_curves_<task>_<data>.png|svg``) and the numbers behind them (``figures.json``).
    Returns ``{file stem: ClassBars | LearningCurves}``."""
    if net not in NETS:
        raise ValueError(f"--plot-net {net!r} is not one of {list(NETS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, Any] = {}
    for bars in class_bars(runs, net):
        stem = f"class_bars_{_slug(bars.task)}_{_slug(bars.data)}"
        draw_class_bars(bars, out_dir / stem)
        drawn[stem] = bars
    for curves in learning_curves(runs):
        stem = f"learning_curves_{_slug(curves.task)}_{_slug(curves.data)}"
        draw_learning_curves(curves, out_dir / stem)
        drawn[stem] = curves
    payload = {k: asdict(v) for k, v in drawn.items()}
    (out_dir / "figures.json").write_text(_json(payload))
    return drawn


def _json(payload: Any) -> str:
    import json

    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(payload), indent=1) + "\n"
