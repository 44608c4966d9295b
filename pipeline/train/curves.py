"""The training log as columns, and its picture: loss terms per epoch and seconds per epoch.

The train stage draws `cache/model/train_curves.png` (what `dvc plots show` and the
report show; a PNG renders offline, where dvc's Vega plots need a CDN).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.errors import InputError
from pipeline.files import atomic_write

LOSS_TERMS = ("loss", "ce", "uncertainty", "diversity", "peer")


def read_train_log(path: Path) -> dict[str, np.ndarray]:
    """train_log.csv as columns (epoch, loss, ce, ...) of float arrays (NaN where empty)."""
    if not path.exists():
        raise InputError(path, "training log not found; run the train stage first")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = list(rows[0]) if rows else []
    return {name: np.array([_float(r.get(name)) for r in rows]) for name in names}


def _float(value: str | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def plot_training_curves(log_columns: dict[str, np.ndarray], path: Path) -> Path:
    """Loss terms per epoch (teacher updates dotted) and seconds per epoch, as a PNG."""
    epoch = log_columns.get("epoch", np.arange(len(next(iter(log_columns.values()), []))))
    fig = Figure(figsize=(10, 3.6))
    loss_ax, time_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    for name in LOSS_TERMS:
        if name in log_columns and np.isfinite(log_columns[name]).any():
            loss_ax.plot(epoch, log_columns[name], marker="o", markersize=3, label=name)
    for e in epoch[log_columns.get("teacher_update", np.zeros(len(epoch))) > 0]:
        loss_ax.axvline(e, color="grey", linestyle=":", linewidth=1)
    for ax in (loss_ax, time_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set_xlabel("epoch")
    loss_ax.set_title("training losses (dotted: teacher update)", fontsize=10)
    loss_ax.legend(fontsize=8)
    loss_ax.grid(alpha=0.3)
    if "seconds" in log_columns:
        time_ax.bar(epoch, log_columns["seconds"], color="#888")
    time_ax.set_xlabel("epoch")
    time_ax.set_title("seconds per epoch", fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
