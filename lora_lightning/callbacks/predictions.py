"""``predict`` results on disk: one row per example in ``predictions.csv`` (or ``.jsonl``) in the run folder.

Columns: ``index`` (position in the predicted split), ``text`` (and ``text_pair`` for sentence pairs), then
- classification: ``label`` (the class name the model was trained with, else the class id), ``score`` (its
  probability) and one probability per class (``prob_<label>`` columns in csv, a ``probabilities`` object in jsonl);
- regression: ``score``;
- causal LM: ``loss`` (mean next-token loss over the example's target tokens: the response for instruction data,
  the whole block for plain text), ``perplexity`` (its exp) and ``tokens`` (how many were scored). The model scores
  the given text; it does not generate.

The file is written through :func:`lora_lightning.atomic.atomic_file`: it appears complete when ``predict`` ends, or
not at all. With several processes each writes its own ``predictions.rank<k>.<format>``.
"""
from __future__ import annotations

import csv
import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, Literal, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from lora_lightning.atomic import atomic_file
from lora_lightning.backbone import load_tokenizer

FORMATS = ("csv", "jsonl")


class PredictionWriter(BasePredictionWriter):
    """Write what ``predict_step`` returns, with each example's text, to a file and print its path.

    Args:
        output_dir: folder of the file; default: the run folder (``trainer.log_dir``).
        format: ``csv`` or ``jsonl``.
        filename: file name without suffix.
    """

    def __init__(self, output_dir: str | None = None, format: Literal["csv", "jsonl"] = "csv",
                 filename: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        if format not in FORMATS:
            raise ValueError(f"Unknown predictions format '{format}'; choose one of {FORMATS}.")
        self.output_dir, self.format, self.filename = output_dir, format, filename
        self.path: Path | None = None
        self._stack: ExitStack | None = None
        self._handle: IO[str] | None = None
        self._csv: csv.DictWriter | None = None
        self._texts: Sequence[tuple[str, ...]] | None = None
        self._next_index = self._rows = 0

    def _file_path(self, trainer: L.Trainer) -> Path:
        folder = self.output_dir or trainer.log_dir or trainer.default_root_dir
        rank = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        return Path(folder) / f"{self.filename}{rank}.{self.format}"

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = self._file_path(trainer)
        datamodule = getattr(trainer, "datamodule", None)
        texts = getattr(datamodule, "example_texts", None)
        self._texts = texts(datamodule.held_out_split()) if texts is not None else None
        self._stack = ExitStack()
        self._handle = self._stack.enter_context(atomic_file(self.path, newline="" if self.format == "csv" else None))
        self._csv, self._next_index, self._rows = None, 0, 0

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Tensor],
                           batch_indices: Sequence[int] | None, batch: dict[str, Tensor], batch_idx: int,
                           dataloader_idx: int) -> None:
        size = len(next(iter(prediction.values())))
        indices = list(batch_indices) if batch_indices else list(range(self._next_index, self._next_index + size))
        self._next_index = indices[-1] + 1
        texts = self._batch_texts(pl_module, batch, indices)
        for row, (index, text) in enumerate(zip(indices, texts)):
            self._write({"index": index, **text, **self._values(pl_module, prediction, row)})
        self._rows += len(indices)

    def _batch_texts(self, pl_module: L.LightningModule, batch: dict[str, Tensor],
                     indices: list[int]) -> list[dict[str, str]]:
        """Each example's raw text when the data module keeps it, else its decoded non-padding tokens."""
        if self._texts is not None:
            fields = [self._texts[i] for i in indices]
        else:
            tokenizer = load_tokenizer(pl_module.hparams.backbone, pl_module.hparams.trust_remote_code)
            mask = batch.get("attention_mask")
            rows = [ids if mask is None else ids[mask[i].bool()] for i, ids in enumerate(batch["input_ids"].cpu())]
            fields = [(tokenizer.decode(ids, skip_special_tokens=True),) for ids in rows]
        return [dict(zip(("text", "text_pair"), example)) for example in fields]

    @staticmethod
    def _values(pl_module: L.LightningModule, prediction: dict[str, Tensor], row: int) -> dict[str, Any]:
        if "probabilities" in prediction:
            probabilities = prediction["probabilities"][row].tolist()
            names = pl_module.label_names or [str(i) for i in range(len(probabilities))]
            label_id = int(prediction["label_id"][row])
            return {"label": names[label_id], "score": probabilities[label_id],
                    "probabilities": dict(zip(names, probabilities))}
        if "score" in prediction:
            return {"score": float(prediction["score"][row])}
        loss = float(prediction["loss"][row])
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(prediction["tokens"][row])}

    def _write(self, row: dict[str, Any]) -> None:
        if self.format == "jsonl":
            self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        flat = {key: value for key, value in row.items() if key != "probabilities"}
        flat.update({f"prob_{name}": p for name, p in row.get("probabilities", {}).items()})
        if self._csv is None:
            self._csv = csv.DictWriter(self._handle, fieldnames=list(flat))
            self._csv.writeheader()
        self._csv.writerow(flat)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(None)
        print(f"Predictions ({self._rows} rows) written to {self.path}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close(exception)  # the partial file is removed

    def _close(self, exception: BaseException | None) -> None:
        if self._stack is None:
            return
        stack, self._stack, self._handle, self._csv = self._stack, None, None, None
        if exception is None:
            stack.close()
        else:
            stack.__exit__(type(exception), exception, exception.__traceback__)

