"""Text classification data: single sentences, sentence pairs and regression scores, tokenised once in ``setup``.

Sources: ``"rotten_tomatoes"`` (packaged offline corpus), ``"files"`` (local csv/tsv/jsonl), ``"glue/<task>"``
(through the optional ``datasets`` package). Batches are dicts with ``input_ids``, ``attention_mask``
(``token_type_ids`` when the tokenizer makes them) and ``labels`` (long for classes, float for regression).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_lightning.data.base import TokenizedDataModule
from lora_lightning.data.collate import ClassificationCollator, EncodedDataset
from lora_lightning.data.files import check_file, read_table, require_columns
from lora_lightning.data.glue import GlueTask, get_glue_task
from lora_lightning.data.labels import (
    Label,
    LabelSpace,
    check_labels_seen_in_training,
    infer_label_space,
    is_missing,
    parse_label,
)
from lora_lightning.data.sources import ROTTEN_TOMATOES_LABELS, load_glue, load_rotten_tomatoes, require_datasets
from lora_lightning.data.splits import split_indices, subsample

SOURCES = ("rotten_tomatoes", "files", "glue/<task>")


@dataclass
class _Split:
    """Raw examples of one split: one tuple of texts per example (one or two fields) and parsed labels."""

    texts: list[tuple[str, ...]]
    labels: list[Label] | None

    def select(self, indices: list[int]) -> _Split:
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return _Split([self.texts[i] for i in indices], labels)


class TextClassificationDataModule(TokenizedDataModule):
    """Sequence classification and regression data for a Hugging Face tokenizer.

    Without ``validation_file`` (and for ``rotten_tomatoes``), a seeded ``validation_fraction`` of the training
    examples becomes the validation split. ``predict_dataloader``/``test_dataloader`` use ``test_file`` when given
    (its label column is optional), else the validation split. Integer labels are class ids; text labels are
    sorted to give ids; real-valued labels (or ``num_labels=1``) mean regression.

    Args:
        backbone: model alias or folder whose tokenizer is used (linked from ``model.init_args.backbone``).
        source: ``rotten_tomatoes`` (packaged), ``files`` (train_file/validation_file/test_file) or ``glue/<task>``.
        train_file: csv, tsv or jsonl (optionally .gz/.bz2) with the text and label columns; ``source: files`` only.
        validation_file: held-out labelled file; without it, ``validation_fraction`` of train_file is held out.
        test_file: file for ``test``/``predict``; its label column is optional.
        text_fields: one column (single sentence) or two (sentence pair); default ``[text]`` or the GLUE task's.
        label_field: the label column: class ids, class names or real-valued scores.
        num_labels: number of classes (1 = regression); inferred from the labels when unset.
        max_length: longest tokenised input; longer inputs are truncated.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size (default: batch_size).
        num_workers: DataLoader worker processes.
        max_train_samples: keep a seeded random subset of this many training examples.
        max_eval_samples: keep a seeded random subset of this many validation/test examples.
        validation_fraction: share of the training examples held out when there is no validation file.
        seed: seed of the validation split and the subsets.
    """

    def __init__(
        self,
        backbone: str = "minilm",
        source: str = "rotten_tomatoes",
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        text_fields: list[str] | None = None,
        label_field: str = "label",
        num_labels: int | None = None,
        max_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        validation_fraction: float = 0.1,
        seed: int = 42,
    ) -> None:
        super().__init__()
        # num_labels stays out of hparams: the model owns that hparam, and Lightning refuses differing duplicates.
        self.save_hyperparameters(ignore=["num_labels"])
        self.requested_num_labels = num_labels
        if text_fields is not None and not 1 <= len(text_fields) <= 2:
            raise ValueError(
                f"text_fields must name one column (single sentence) or two (sentence pair), got {text_fields}."
            )
        if num_labels is not None and num_labels < 1:
            raise ValueError(f"num_labels must be at least 1 (1 = regression), got {num_labels}.")
        if max_length < 2 or batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("max_length must be >= 2 and batch sizes >= 1.")
        self.glue_task: GlueTask | None = None
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        if source.startswith("glue/"):
            self.glue_task = get_glue_task(source.removeprefix("glue/"))
            require_datasets(f"source='{source}'")
        elif source not in ("rotten_tomatoes", "files"):
            raise ValueError(f"Unknown source '{source}'. Choose one of {SOURCES}.")
        if source == "files":
            if train_file is None:
                raise ValueError("source='files' needs train_file (a csv, tsv or jsonl file).")
            self.files = {split: check_file(path, split) for split, path in files.items()}
        elif any(files.values()):
            raise ValueError(
                f"train_file/validation_file/test_file are read only with source='files', not '{source}'."
            )
        else:
            self.files = {}
        self.text_fields = list(text_fields or (self.glue_task.text_fields if self.glue_task else ["text"]))
        self._splits: dict[str, _Split] | None = None
        self._space: LabelSpace | None = None
        self._all_labels: list[Label] = []
        self._restored_names: list[str] | None = None

    # ----------------------------------------------------------------------------------------- properties
    @property
    def num_labels(self) -> int:
        """Number of classes, 1 for regression; inferred from the data when not given."""
        if self.glue_task is not None and self._space is None:
            return self.requested_num_labels or self.glue_task.num_labels
        return self._label_space().num_labels

    @property
    def label_names(self) -> list[str] | None:
        """Class names by id, or ``None`` when the labels are plain ids or regression scores."""
        if self.glue_task is not None and self._space is None:
            return list(self.glue_task.label_names) if self.glue_task.label_names else None
        names = self._label_space().names
        return list(names) if names is not None else None

    @property
    def is_regression(self) -> bool:
        """True when the model should predict one real-valued score."""
        return self.num_labels == 1

    # ------------------------------------------------------------------------------------- raw data
    def _label_space(self) -> LabelSpace:
        if self._space is None:
            self._load_raw()
        assert self._space is not None
        return self._space

    def _fixed_names(self) -> tuple[str, ...] | None:
        """Label names that come with the source (Rotten Tomatoes, GLUE) rather than from the data."""
        if self.hparams.source == "rotten_tomatoes":
            return ROTTEN_TOMATOES_LABELS
        return self.glue_task.label_names if self.glue_task else None

    def _load_raw(self) -> None:
        """Read every split, check fields and labels, fix the label space, subsample. No tokenisation."""
        hp = self.hparams
        if hp.source == "rotten_tomatoes":
            texts, labels = load_rotten_tomatoes()
            splits = {"train": _Split([(text,) for text in texts], list(labels))}
        elif self.glue_task is not None:
            task = self.glue_task
            rows = load_glue(task, ("train", task.validation_split))
            splits = {
                "train": self._rows_to_split(rows["train"], f"GLUE {task.name} train", require_label=True),
                "validation": self._rows_to_split(
                    rows[task.validation_split], f"GLUE {task.name} {task.validation_split}", require_label=True
                ),
            }
        else:
            splits = {}
            for split, path in self.files.items():
                if path is not None:
                    rows, columns = read_table(path)
                    require_columns(columns, self.text_fields, path, "text_fields")
                    require_label = split != "test" or hp.label_field in columns
                    if require_label:
                        require_columns(columns, [hp.label_field], path, "label_field")
                    splits[split] = self._rows_to_split(rows, str(path), require_label)
        derived_validation = "validation" not in splits
        if derived_validation:
            train_ids, validation_ids = split_indices(len(splits["train"].texts), hp.validation_fraction, hp.seed)
            splits["validation"] = splits["train"].select(validation_ids)
            splits["train"] = splits["train"].select(train_ids)
        self._all_labels = [label for split in splits.values() for label in (split.labels or [])]
        num_labels = self.requested_num_labels or (self.glue_task.num_labels if self.glue_task else None)
        if num_labels != 1:  # evaluation splits of their own (one drawn from the training data is left alone)
            given = {name: raw.labels for name, raw in splits.items() if name != "validation" or not derived_validation}
            origins = {split: f"'{path}'" for split, path in self.files.items() if path is not None}
            check_labels_seen_in_training(given, origins)
        names = self._fixed_names() or self._restored_names
        self._space = infer_label_space(self._all_labels, num_labels, names)
        limits = {"train": hp.max_train_samples, "validation": hp.max_eval_samples, "test": hp.max_eval_samples}
        for split, limit in limits.items():
            if split in splits and limit is not None:
                kept = subsample(range(len(splits[split].texts)), limit, hp.seed)
                splits[split] = splits[split].select(kept)
        self._splits = splits

    def _rows_to_split(self, rows: list[dict[str, Any]], where: str, require_label: bool) -> _Split:
        """Texts and parsed labels of table rows; a row missing a value is an error naming the row."""
        texts, labels = [], []
        for number, row in enumerate(rows, start=1):
            for field in self.text_fields:
                if is_missing(row.get(field)):
                    raise ValueError(
                        f"Row {number} of {where}, column '{field}': the text is missing (empty, null or NaN). "
                        "Fill it in or drop the row."
                    )
            texts.append(tuple(str(row[field]) for field in self.text_fields))
            if require_label:
                try:
                    labels.append(parse_label(row.get(self.hparams.label_field, "")))
                except ValueError as error:
                    raise ValueError(f"Row {number} of {where}: {error}") from error
        if not texts:
            raise ValueError(f"{where} has no examples.")
        return _Split(texts, labels if require_label else None)

    # ------------------------------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Download GLUE into the ``datasets`` cache once per node (nothing to do for local sources)."""
        if self.glue_task is not None:
            load_glue(self.glue_task, ())

    def setup(self, stage: str | None = None) -> None:
        """Check the data and tokenise each split once (repeated calls reuse the tokenised splits)."""
        if self._splits is None:
            self._load_raw()
        assert self._splits is not None and self._space is not None
        for split, raw in self._splits.items():
            if split not in self.datasets:
                self.datasets[split] = self._encode(raw)

    def _encode(self, raw: _Split) -> EncodedDataset:
        fields = [list(column) for column in zip(*raw.texts)]
        encoded = self.tokenizer(*fields, truncation=True, max_length=self.hparams.max_length)
        labels = self._space.encode(raw.labels) if raw.labels is not None else None
        return EncodedDataset({key: list(values) for key, values in encoded.items()}, labels)

    def collate_fn(self) -> ClassificationCollator:
        return ClassificationCollator(self.tokenizer, regression=self.is_regression)

    def held_out_split(self) -> str:
        """The test file's split when one was given, else validation."""
        return "test" if self.files.get("test") is not None else "validation"

    def example_texts(self, split: str) -> list[tuple[str, ...]]:
        """The raw text fields of every example of ``split``, in dataset order (the predictions file shows them)."""
        if self._splits is None:
            self._load_raw()
        return list(self._splits[split].texts)

    # ------------------------------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The label mapping, so a restored model reads its outputs with the names it was trained on."""
        return {"label_names": self.label_names, "num_labels": self.num_labels}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the label mapping; labels already tokenised are re-mapped to the restored ids."""
        names = state_dict.get("label_names")
        fixed = self._fixed_names()
        if fixed is not None:
            if names is not None and list(names) != list(fixed):
                raise ValueError(
                    f"The checkpoint's label names {list(names)} differ from this source's {list(fixed)}: "
                    "it was trained on other data."
                )
            return
        self._restored_names = list(names) if names is not None else None
        if self._space is not None:
            num_labels = self.requested_num_labels or state_dict.get("num_labels")
            self._space = infer_label_space(self._all_labels, num_labels, self._restored_names)
            for split, dataset in self.datasets.items():
                raw_labels = self._splits[split].labels
                if raw_labels is not None:
                    dataset.labels = self._space.encode(raw_labels)
