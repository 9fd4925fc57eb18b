"""Sweep figures: a box plot per metric with one box per arm and every seed as a dot (RETINA Fig. 3b), and
the metric against iteration per arm, mean over seeds with the min-max spread shaded (Fig. 3a).

Each function returns what it drew (e.g. the number of boxes), read from the matplotlib artists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vemscale.io.atomic import save_figure


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def box_plot(by_arm: dict[str, Sequence[float]], path: Path, ylabel: str, title: str) -> dict[str, Any]:
    """One box per arm that has values (arms without any are named on the axis with n=0, no box)."""
    plt = _plt()
    arms = list(by_arm)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(arms), 4))
    with_values = [i for i, a in enumerate(arms) if len(by_arm[a])]
    drawn = ax.boxplot([list(by_arm[arms[i]]) for i in with_values], positions=[i + 1 for i in with_values],
                       widths=0.55, showfliers=False) if with_values else {"boxes": []}
    rng = np.random.default_rng(0)
    for i in with_values:
        ys = list(by_arm[arms[i]])
        ax.scatter(i + 1 + rng.uniform(-0.12, 0.12, len(ys)), ys, s=22, zorder=3, color="black", alpha=0.8)
    ax.set_xticks(range(1, len(arms) + 1), [f"{a}\n(n={len(by_arm[a])})" for a in arms])
    ax.set_xlim(0.4, len(arms) + 0.6)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return {"path": str(path), "boxes": len(drawn["boxes"]), "arms": arms}


def curves_plot(curves: dict[str, list[list[tuple[int, float]]]], path: Path, ylabel: str, title: str) -> dict[str, Any]:
    """Per arm: each trial as a thin line, the mean over trials as a thick one, the min-max spread shaded.

    The mean at an iteration is over the trials that reached it (a scheduler may stop some early).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    lines = 0
    for k, (arm, trials) in enumerate(curves.items()):
        trials = [t for t in trials if t]
        if not trials:
            continue
        color = f"C{k % 10}"
        for t in trials:
            ax.plot(*zip(*t), color=color, alpha=0.25, lw=0.8)
        its = sorted({i for t in trials for i, _ in t})
        at = [[v for t in trials for i2, v in t if i2 == i] for i in its]
        mean = [float(np.mean(v)) for v in at]
        ax.plot(its, mean, color=color, lw=2, marker="o", ms=3, label=f"{arm} (n={len(trials)})")
        ax.fill_between(its, [min(v) for v in at], [max(v) for v in at], color=color, alpha=0.15)
        lines += 1
    ax.set(xlabel="iteration", ylabel=ylabel, title=title)
    if lines:
        ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return {"path": str(path), "arms_drawn": lines}


def heatmap(values: dict[str, Sequence[float | None]], columns: list[str], path: Path, title: str) -> dict[str, Any]:
    """Rows (arms) x columns, each cell its value written in it; a missing value is a blank cell."""
    plt = _plt()
    rows = list(values)
    grid = np.array([[np.nan if v is None else float(v) for v in values[r]] for r in rows], np.float64)
    fig, ax = plt.subplots(figsize=(2.5 + 1.3 * len(columns), 1.2 + 0.45 * len(rows)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="white" if grid[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return {"path": str(path), "cells": int(np.isfinite(grid).sum()), "rows": rows}
