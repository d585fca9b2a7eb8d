"""Plot the curves of one or more training runs from their `metrics.jsonl` files into one PNG.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] --out=PNG [--metrics=loss,rewards/accuracies] [--smooth=K]

One panel per metric, one color per run (the legend names each run by its
directory). Training values are solid lines (moving average over K logged rows
with --smooth=K); the held-out `eval/` values of the same metric are dashed
lines with markers on the same panel. A metric logged as `.../mean` with
`.../lo` and `.../hi` siblings gets its interval as a shaded band. Without
--metrics the panels are the preference-tuning metrics present in any run (see
DEFAULT_METRICS), every metric whose name contains "kl", and the held-out
accuracies logged with an interval (`eval/accuracy/raw/mean`, ...); any other
logged metric (margin/raw, grad_norm, lr, ...) can be asked for by name. SFT
runs log the held-out NLL per token as `eval/nll`, the same quantity as their
training loss, so it is drawn on the loss panel.

A last line cut short by a kill is skipped with a warning. Errors (a run
directory without metrics.jsonl, nothing to plot, an unknown metric) are one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

METRICS_FILE = "metrics.jsonl"  # what cvxdpo.train.logs.MetricsWriter writes (not imported: it pulls in JAX)
EVAL_PREFIX = "eval/"
INTERVAL = ("/mean", "/lo", "/hi")
DEFAULT_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "preference_accuracy",
                   "convex/objective", "convex/accuracy", "convex/margin")
DEFAULT_INTERVALS = "accuracy/"  # cvxdpo.eval.metrics' accuracies with bootstrap intervals; not margins, lengths
EVAL_FALLBACK = {"loss": "nll"}  # SFT: eval/nll is the training loss's quantity (response NLL per token)
PANEL_W, PANEL_H, LEGEND_H = 5.0, 3.6, 0.5  # inches
MAX_COLS, DPI = 3, 100


class PlotError(Exception):
    """A problem the user can fix (a wrong directory or metric name): reported in one line, exit status 2."""


@dataclass(frozen=True)
class Run:
    name: str  # the legend's label
    path: str
    rows: list[dict]


@dataclass(frozen=True)
class Series:
    steps: np.ndarray
    values: np.ndarray
    lo: np.ndarray | None = None  # interval bounds, when the metric is logged as .../mean, .../lo, .../hi
    hi: np.ndarray | None = None


def read_rows(path: str) -> list[dict]:
    """The rows of one metrics.jsonl. A kill can cut the line being appended, so an unparseable last line
    is skipped with a warning; an unparseable line before it means a damaged file and is an error."""
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for n, line in lines:
        row = _parse(line)
        if row is not None:
            rows.append(row)
        elif n == lines[-1][0]:
            print(f"warning: {path}:{n}: skipped the unparseable last line (cut by a kill?)", file=sys.stderr)
        else:
            raise PlotError(f"{path}:{n}: not a JSON object with a step")
    return rows


def _parse(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def load_runs(run_dirs: list[str]) -> list[Run]:
    """One Run per directory, named by the directory's name (its path where two names clash)."""
    for d in run_dirs:
        if not os.path.isfile(os.path.join(d, METRICS_FILE)):
            raise PlotError(f"{d}: no {METRICS_FILE} in this run directory")
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(set(names)) < len(names):
        names = [os.path.normpath(d) for d in run_dirs]
    return [Run(name, d, read_rows(os.path.join(d, METRICS_FILE))) for name, d in zip(names, run_dirs)]


def metric_name(key: str, keys: set[str]) -> tuple[str, bool]:
    """The panel a logged key belongs to (without the eval/ prefix, and a `.../mean` family without its
    suffix) and whether that family has both interval bounds, so that a band can be drawn."""
    stem = next((key.removesuffix(s) for s in INTERVAL if key.endswith(s)), None)
    if stem is None or stem + "/mean" not in keys:
        return key.removeprefix(EVAL_PREFIX), False
    return stem.removeprefix(EVAL_PREFIX), all(stem + s in keys for s in INTERVAL[1:])


def available_metrics(runs: list[Run]) -> dict[str, bool]:
    """Every metric of any run, each with whether it is logged as an interval."""
    found = {}
    for run in runs:
        keys = {k for row in run.rows for k in row if k != "step"}
        for key in keys:
            name, band = metric_name(key, keys)
            found[name] = found.get(name, False) or band
    return found


def select_metrics(runs: list[Run], requested: list[str] | None = None) -> list[str]:
    """The panels to draw: the requested metrics (each must be in some run), else the defaults present."""
    found = available_metrics(runs)
    if requested:
        names = [name.removeprefix(EVAL_PREFIX).removesuffix("/mean") for name in requested]
        for given, name in zip(requested, names):
            if not _present(name, found):
                raise PlotError(f"unknown metric {given!r}: in no run (known: {', '.join(sorted(found))})")
        return list(dict.fromkeys(names))
    names = [m for m in DEFAULT_METRICS if _present(m, found)]
    names += sorted(m for m in found if "kl" in m)
    names += sorted(m for m, band in found.items() if band and m.startswith(DEFAULT_INTERVALS))
    if not names:
        raise PlotError(f"no metric to plot in {', '.join(run.path for run in runs)}")
    return list(dict.fromkeys(names))


def _present(metric: str, found: dict) -> bool:
    return metric in found or EVAL_FALLBACK.get(metric) in found


def series(rows: list[dict], key: str) -> Series | None:
    """The logged values of `key` (or of its interval family `key/mean`, `key/lo`, `key/hi`) by step;
    None if no row has it. Non-numeric values (lists) are left out; NaN stays, a gap in the line."""
    plain = [(row["step"], v) for row in rows if (v := _number(row.get(key))) is not None]
    if plain:
        steps, values = zip(*plain)
        return Series(np.asarray(steps), np.asarray(values))
    family = [(row["step"], *(_number(row.get(key + s)) for s in INTERVAL)) for row in rows]
    family = [f for f in family if f[1] is not None]
    if not family:
        return None
    steps, mean, lo, hi = zip(*family)
    bounds = () if None in lo or None in hi else (lo, hi)  # a band only where every point has both bounds
    return Series(*(np.asarray(c) for c in (steps, mean, *bounds)))


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def smooth(s: Series, k: int) -> Series:
    """A trailing moving average over the last `k` logged rows (fewer at the start, so no point is lost)."""
    if k <= 1:
        return s

    def average(v):
        return None if v is None else np.asarray([v[max(0, i - k + 1): i + 1].mean() for i in range(len(v))])

    return Series(s.steps, average(s.values), average(s.lo), average(s.hi))


def eval_series(rows: list[dict], metric: str) -> tuple[Series | None, str]:
    """The held-out counterpart of `metric` and the name it was found under (EVAL_FALLBACK for SFT)."""
    for name in filter(None, (metric, EVAL_FALLBACK.get(metric))):
        found = series(rows, EVAL_PREFIX + name)
        if found is not None:
            return found, name
    return None, metric


def draw(ax, s: Series, color: str, label: str, eval_style: bool) -> None:
    """One series: solid for training, dashed with markers for held-out evaluation; its band if any."""
    style = dict(linestyle="--", marker="o", markersize=4) if eval_style else dict(linestyle="-")
    ax.plot(s.steps, s.values, color=color, linewidth=1.5, label=label, **style)
    if s.lo is not None:
        ax.fill_between(s.steps, s.lo, s.hi, color=color, alpha=0.2, linewidth=0, label=f"{label} interval")


def draw_panel(ax, runs: list[Run], metric: str, k: int) -> bool:
    """One metric's panel over all runs; returns whether any held-out series was drawn."""
    drew_eval, eval_names = False, set()
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        train = series(run.rows, metric)
        if train is not None:
            draw(ax, smooth(train, k), color, f"{run.name} train", eval_style=False)
        held_out, name = eval_series(run.rows, metric)
        if held_out is not None:
            draw(ax, held_out, color, f"{run.name} eval", eval_style=True)
            drew_eval = True
            eval_names.add(name)
    others = sorted(eval_names - {metric})
    ax.set_title(metric + (f" (eval: {', '.join(others)})" if others else ""), fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return drew_eval


def plot_runs(runs: list[Run], metrics: list[str], smooth_k: int = 1) -> Figure:
    """The figure: one panel per metric in a grid of up to MAX_COLS columns, one legend above naming the
    runs by color and the line styles. Built without pyplot, so nothing global is touched (headless Agg)."""
    cols = min(MAX_COLS, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(PANEL_W * cols, PANEL_H * rows + LEGEND_H), layout="constrained")
    FigureCanvasAgg(fig)
    drew_eval = False
    for i, metric in enumerate(metrics):
        drew_eval |= draw_panel(fig.add_subplot(rows, cols, i + 1), runs, metric, smooth_k)
    handles = [Line2D([], [], color=f"C{i % 10}", linewidth=2, label=run.name) for i, run in enumerate(runs)]
    handles.append(Line2D([], [], color="black", label="train" + (f" (avg of {smooth_k})" if smooth_k > 1 else "")))
    if drew_eval:
        handles.append(Line2D([], [], color="black", linestyle="--", marker="o", markersize=4, label="held-out eval"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6), frameon=False, fontsize=9)
    return fig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training workdirs holding metrics.jsonl")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--metrics", type=lambda v: [m for m in v.split(",") if m],
                        help="comma-separated metric names (default: the preference metrics present)")
    parser.add_argument("--smooth", type=int, default=1, metavar="K",
                        help="moving average of the training curves over K logged rows (default 1: none)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = load_runs(args.runs)
        metrics = select_metrics(runs, args.metrics)
    except PlotError as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 2
    fig = plot_runs(runs, metrics, args.smooth)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=DPI)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
