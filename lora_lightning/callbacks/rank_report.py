"""Rank visibility shared by every adaptive-rank method: a ``{module_name: rank}`` dict becomes a layers × module-type
grid, a TensorBoard heat map (matplotlib, Agg backend), a short printed summary and a JSON rank pattern.

Names are read by :func:`lora_lightning.adapters.names.module_position`: ``bert.encoder.layer.3.attention.self.query``
is layer 3, type ``attention.self.query``; names without a layer index go in a row of their own (``-``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lora_lightning.adapters.names import module_position
from lora_lightning.atomic import atomic_write_text

NO_LAYER = "-"


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], torch.Tensor]:
    """``(layers, module types, grid)``: grid[i, j] is the rank of layer i, type j (NaN where there is none)."""
    positions = {name: module_position(name) for name in ranks}
    cells = {(NO_LAYER if p.layer is None else str(p.layer), p.kind): ranks[name] for name, p in positions.items()}
    layers = sorted({layer for layer, _ in cells}, key=lambda x: (x == NO_LAYER, int(x) if x.isdigit() else 0))
    types = list(dict.fromkeys(kind for _, kind in cells))
    grid = torch.full((len(layers), len(types)), float("nan"))
    for (layer, kind), rank in cells.items():
        grid[layers.index(layer), types.index(kind)] = float(rank)
    return layers, types, grid


def heatmap_figure(ranks: dict[str, int], max_rank: int | None = None, title: str = "Rank per module") -> Figure:
    """A matplotlib figure of the grid: layers down, module types across, the rank written in each cell, a colour
    bar from 0 to ``max_rank`` (default: the largest rank); blank cells have no module."""
    layers, types, grid = rank_grid(ranks)
    values = grid.numpy()
    top = max_rank or max(1.0, float(np.nan_to_num(values, nan=0.0).max()))
    figure = Figure(figsize=(2.0 + 1.1 * len(types), 1.2 + 0.32 * len(layers)), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=top, aspect="auto")
    axes.set_xticks(range(len(types)), types, rotation=30, ha="right", fontsize=8)
    axes.set_yticks(range(len(layers)), layers, fontsize=8)
    axes.set_xlabel("module type")
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=10)
    if len(layers) * len(types) <= 400:  # numbers stay readable up to ~20 x 20 cells
        for (i, j), value in np.ndenumerate(values):
            if not np.isnan(value):
                colour = "black" if value > 0.6 * top else "white"
                axes.text(j, i, str(int(value)), ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axes, label="rank")
    return figure


def heatmap_image(ranks: dict[str, int], max_rank: int | None = None) -> np.ndarray:
    """:func:`heatmap_figure` rendered off-screen (Agg, no display) as an ``(H, W, 3)`` uint8 RGB image."""
    canvas = FigureCanvasAgg(heatmap_figure(ranks, max_rank))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def rank_table(ranks: dict[str, int]) -> str:
    """The grid as a Markdown table (layers × module types)."""
    layers, types, grid = rank_grid(ranks)
    lines = ["| layer | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
    for i, layer in enumerate(layers):
        cells = ["" if torch.isnan(v) else str(int(v)) for v in grid[i]]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rank_summary(ranks: dict[str, int], title: str = "Ranks") -> str:
    """A few lines: total, mean/min/max, and the layers × types table."""
    values = list(ranks.values())
    if not values:
        return f"{title}: no modules."
    head = (
        f"{title}: {len(values)} modules, total {sum(values)}, mean {sum(values) / len(values):.2f}, "
        f"min {min(values)}, max {max(values)}, pruned to 0: {sum(v == 0 for v in values)}"
    )
    return head + "\n" + rank_table(ranks)


def log_rank_heatmap(logger: Any, ranks: dict[str, int], step: int, tag: str = "rank/heatmap",
                     max_rank: int | None = None) -> bool:
    """Add the heat map (and the table as text) to a TensorBoard logger; other loggers are left alone."""
    experiment = getattr(logger, "experiment", None)
    if experiment is None or not hasattr(experiment, "add_image"):
        return False
    experiment.add_image(tag, heatmap_image(ranks, max_rank), global_step=step, dataformats="HWC")
    if hasattr(experiment, "add_text"):
        experiment.add_text(f"{tag}_table", rank_table(ranks), global_step=step)
    return True


def report_folder(trainer: Any) -> str | None:
    """Where a run's rank outputs go: beside its checkpoints, else in its logger's folder, else nowhere (never the
    working directory by default)."""
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.dirpath:
        return checkpoint.dirpath
    if trainer.loggers and trainer.log_dir:
        return trainer.log_dir
    return None


def write_rank_pattern(path: str | os.PathLike, ranks: dict[str, int], extra: dict[str, Any] | None = None) -> Path:
    """Write ``{"rank_pattern": {module: rank}, ...extra}`` as JSON, atomically."""
    payload = {"rank_pattern": dict(ranks), **(extra or {})}
    return atomic_write_text(path, json.dumps(payload, indent=2))
