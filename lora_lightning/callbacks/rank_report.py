"""Rank visibility shared by every adaptive-rank method: a ``{module_name: rank}`` dict becomes a layers × module-type
grid, a TensorBoard heat-map image, a short printed summary and a JSON rank pattern.

Module names are split at their first integer component: ``bert.encoder.layer.3.attention.self.query`` is layer 3,
type ``attention.self.query``; names without one go in a row of their own. No plotting library is needed: the heat
map is drawn as a plain image tensor (one cell per module, brighter = more rank kept).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

_LAYER = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


def split_module_name(name: str) -> tuple[str, str]:
    """``(layer, module type)`` of a module name; layer is ``"-"`` when the name has no index."""
    match = _LAYER.search(name)
    if match is None:
        return "-", name
    return match.group(1), match.group(2)


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], torch.Tensor]:
    """``(layers, module types, grid)``: grid[i, j] is the rank of layer i, type j (NaN where there is none)."""
    cells = {split_module_name(name): rank for name, rank in ranks.items()}
    layers = sorted({layer for layer, _ in cells}, key=lambda x: (x == "-", int(x) if x.isdigit() else 0))
    types = list(dict.fromkeys(kind for _, kind in cells))
    grid = torch.full((len(layers), len(types)), float("nan"))
    for (layer, kind), rank in cells.items():
        grid[layers.index(layer), types.index(kind)] = float(rank)
    return layers, types, grid


def heatmap_image(ranks: dict[str, int], max_rank: int | None = None, cell: int = 12) -> torch.Tensor:
    """A ``(3, H, W)`` float image in [0, 1]: rows are layers, columns module types; dark blue = rank 0, yellow =
    ``max_rank``; grey = no module."""
    _, _, grid = rank_grid(ranks)
    top = max_rank or max(1.0, float(torch.nan_to_num(grid, nan=0.0).max()))
    value = (grid / top).clamp(0, 1)
    low, high = torch.tensor([0.27, 0.0, 0.33]), torch.tensor([0.99, 0.91, 0.14])  # viridis ends
    rgb = low.view(1, 1, 3) + value.unsqueeze(-1) * (high - low).view(1, 1, 3)
    rgb = torch.where(torch.isnan(value).unsqueeze(-1), torch.full_like(rgb, 0.5), rgb)
    image = rgb.permute(2, 0, 1).repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    image[:, ::cell, :] = 1.0  # white grid lines
    image[:, :, ::cell] = 1.0
    return image


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
    experiment.add_image(tag, heatmap_image(ranks, max_rank), global_step=step, dataformats="CHW")
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
    """Write ``{"rank_pattern": {module: rank}, ...extra}`` as JSON (through a temporary file and a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"rank_pattern": dict(ranks), **(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path
