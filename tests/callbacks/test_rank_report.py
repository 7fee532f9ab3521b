"""The rank heat map (matplotlib, with axes, colour bar and ranks in the cells) and the module-name rule it uses."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_lightning.adapters.names import module_position
from lora_lightning.callbacks.rank_report import (
    heatmap_figure,
    heatmap_image,
    log_rank_heatmap,
    rank_grid,
    rank_summary,
    write_rank_pattern,
)

RANKS = {
    "bert.encoder.layer.0.attention.self.query": 3,
    "bert.encoder.layer.0.output.dense": 0,
    "bert.encoder.layer.1.attention.self.query": 5,
    "bert.encoder.layer.10.output.dense": 2,
    "bert.pooler.dense": 1,
}


def test_module_position_one_rule():
    assert module_position("bert.encoder.layer.3.attention.self.query") == (3, "attention.self.query")
    assert module_position("bert.encoder.layer.3.attention.self.query").leaf == "query"
    assert module_position("model.layers.11.mlp.down_proj") == (11, "mlp.down_proj")
    assert module_position("bert.pooler.dense") == (None, "bert.pooler.dense")
    assert module_position("fc").leaf == "fc"
    assert module_position("transformer.h.2") == (2, "h")  # a numbered module itself


def test_rank_grid_layers_by_types():
    layers, types, grid = rank_grid(RANKS)
    assert layers == ["0", "1", "10", "-"]
    assert types == ["attention.self.query", "output.dense", "bert.pooler.dense"]
    assert grid[0].tolist()[:2] == [3.0, 0.0] and grid[2, 1] == 2.0 and grid[3, 2] == 1.0
    assert torch.isnan(grid[1, 1]) and torch.isnan(grid[2, 0])


def test_heatmap_has_axes_colour_bar_and_ranks():
    figure = heatmap_figure(RANKS, max_rank=5)
    axes, colour_bar = figure.axes
    assert axes.get_xlabel() == "module type" and axes.get_ylabel() == "layer"
    assert [t.get_text() for t in axes.get_xticklabels()] == ["attention.self.query", "output.dense",
                                                              "bert.pooler.dense"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["0", "1", "10", "-"]
    assert colour_bar.get_ylabel() == "rank" and colour_bar.get_ylim() == (0.0, 5.0)
    cells = sorted((t.get_position(), t.get_text()) for t in axes.texts)
    assert cells == [((0, 0), "3"), ((0, 1), "5"), ((1, 0), "0"), ((1, 2), "2"), ((2, 3), "1")]


def test_heatmap_image_is_readable_and_logged(tmp_path):
    image = heatmap_image(RANKS, max_rank=5)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] >= 200 and image.shape[1] >= 300  # not an 84-pixel thumbnail
    logger = TensorBoardLogger(tmp_path, name="tb")
    assert log_rank_heatmap(logger, RANKS, step=7)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir).Reload()
    (logged,) = events.Images("rank/heatmap")
    assert logged.step == 7 and (logged.height, logged.width) == image.shape[:2]


def test_rank_summary():
    text = rank_summary(RANKS, title="Kept")
    assert text.splitlines()[0] == "Kept: 5 modules, total 11, mean 2.20, min 0, max 5, pruned to 0: 1"
    assert "| 10 |  | 2 |  |" in text


def test_log_heatmap_and_write_pattern(tmp_path):
    calls = []
    logger = SimpleNamespace(experiment=SimpleNamespace(
        add_image=lambda tag, img, global_step, dataformats: calls.append((tag, img.shape, global_step, dataformats)),
        add_text=lambda tag, text, global_step: calls.append((tag, text[:7], global_step)),
    ))
    assert log_rank_heatmap(logger, RANKS, step=7)
    assert calls[0][0] == "rank/heatmap" and calls[0][1][2] == 3 and calls[0][2] == 7 and calls[1][0] == "rank/heatmap_table"
    assert not log_rank_heatmap(SimpleNamespace(experiment=object()), RANKS, step=7)
    path = write_rank_pattern(tmp_path / "sub" / "rank_pattern.json", RANKS, extra={"step": 3})
    assert json.loads(path.read_text()) == {"rank_pattern": RANKS, "step": 3}
