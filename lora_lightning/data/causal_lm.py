"""Causal language modelling data: plain text cut into fixed blocks, prompt/response pairs, or chat conversations.

Plain text (the packaged Hamlet, a ``.txt`` file, or a ``datasets`` text column) is tokenised once and cut into
``block_size`` blocks whose labels are their ``input_ids`` (the model shifts them). Instruction data gives
``prompt + response + eos`` with the loss on the response and eos only. Chat data (``messages: [{role, content}]``)
is rendered through the tokenizer's chat template with the loss on assistant turns only (see
:mod:`lora_lightning.data.chat`). Instruction and chat examples may be packed into ``block_size`` rows
(:mod:`lora_lightning.data.packing`). Labels are -100 wherever no loss is taken, padding included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lora_lightning.assets import packaged_file
from lora_lightning.data.base import TokenizedDataModule
from lora_lightning.data.chat import chat_examples, check_conversation, resolve_chat_template
from lora_lightning.data.collate import IGNORE_INDEX, CausalLMCollator, EncodedDataset
from lora_lightning.data.files import check_file, read_table, read_text, require_columns
from lora_lightning.data.packing import pack_examples
from lora_lightning.data.sources import require_datasets
from lora_lightning.data.splits import split_indices, subsample

SOURCES = ("hamlet", "files", "datasets")
FORMATS = {"text": (".txt",), "instruction": (".jsonl", ".json"), "chat": (".jsonl", ".json")}


def chunk_blocks(token_ids: list[int], block_size: int) -> list[list[int]]:
    """Consecutive ``block_size`` blocks of a token stream; the incomplete tail is dropped."""
    return [token_ids[start : start + block_size] for start in range(0, len(token_ids) - block_size + 1, block_size)]


def instruction_example(prompt_ids: list[int], response_ids: list[int], eos_id: int, block_size: int) -> dict:
    """``prompt + response + eos`` cut to ``block_size``, with labels -100 on the prompt tokens."""
    input_ids = (prompt_ids + response_ids + [eos_id])[:block_size]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids + [eos_id])[:block_size]
    return {"input_ids": input_ids, "labels": labels}


def keep_trained(examples: list[dict], block_size: int, kind: str) -> list[dict]:
    """Examples cut to ``block_size``; those left without a trained token are dropped with a warning counting them."""
    cut = [{key: values[:block_size] for key, values in example.items()} for example in examples]
    kept = [example for example in cut if any(label != IGNORE_INDEX for label in example["labels"])]
    if len(kept) < len(cut):
        rank_zero_warn(
            f"Dropped {len(cut) - len(kept)} {kind} examples with no trained token (response or assistant turn) within "
            f"block_size={block_size} tokens. Raise block_size to keep them."
        )
    return kept


@dataclass
class Rows:
    """Data rows and where they came from, to name a bad one ("line 3 of 'chat.jsonl'")."""

    rows: list[dict[str, Any]]
    columns: list[str]
    origin: str
    unit: str = "Line"

    def where(self, number: int) -> str:
        return f"{self.unit} {number} of {self.origin}"


class CausalLMDataModule(TokenizedDataModule):
    """Next-token prediction data for a decoder-only backbone.

    Sources: ``"hamlet"`` (packaged corpus, ``format="text"``); ``"files"`` (``train_file`` and optional
    ``validation_file``: ``.txt`` for ``format="text"``, JSONL for ``"instruction"`` and ``"chat"``); ``"datasets"``
    (``datasets.load_dataset(dataset, dataset_config, data_files=...)``: a hub id, a local folder, or a builder
    such as ``"json"`` with ``data_files``; needs ``pip install datasets``), splits ``train_split`` and optional
    ``validation_split``. Formats: ``text`` (``text_field`` for datasets rows), ``instruction``
    (``prompt_field``/``response_field``) and ``chat`` (``messages_field`` holding ``[{role, content}]``, rendered
    with the tokenizer's chat template or ``chat_template``). Without a validation file/split a seeded
    ``validation_fraction`` is held out. ``max_*_samples`` count examples before packing. ``packing`` joins
    instruction/chat examples into ``block_size`` rows that attend only within each example (docs/data.md).
    ``predict_dataloader`` uses the validation split.

    Args:
        backbone: model alias or folder whose tokenizer is used (linked from ``model.init_args.backbone``).
        source: ``hamlet`` (packaged), ``files`` (train_file/validation_file) or ``datasets`` (``pip install datasets``).
        train_file: ``.txt`` (format text) or JSONL (formats instruction and chat); ``source: files`` only.
        validation_file: held-out file of the same format; without it ``validation_fraction`` is held out.
        format: ``text`` (blocks of running text), ``instruction`` (prompt/response pairs) or ``chat`` (messages).
        prompt_field: instruction JSONL field holding the prompt.
        response_field: instruction JSONL field holding the response (the only tokens trained on).
        messages_field: chat JSONL field holding ``[{role, content}, ...]`` (loss on assistant turns only).
        text_field: field of a ``datasets`` row holding the text (format text).
        chat_template: a Jinja chat template (text or a ``.jinja`` path) for a tokenizer without one.
        dataset: ``datasets.load_dataset`` name: a hub id, a local folder or a builder such as ``json``.
        dataset_config: its configuration name.
        data_files: files for a builder (one path, a list, or a dict split -> paths).
        train_split: the ``datasets`` split to train on.
        validation_split: the ``datasets`` split to validate on (default: hold out ``validation_fraction``).
        packing: join short instruction/chat examples into ``block_size`` rows, each attending only to itself.
        block_size: tokens per training row (longer examples are cut).
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size (default: batch_size).
        num_workers: DataLoader worker processes.
        max_train_samples: keep a seeded random subset of this many training examples.
        max_eval_samples: keep a seeded random subset of this many validation examples.
        validation_fraction: share of the training examples held out when there is no validation file or split.
        seed: seed of the validation split, the subsets and the shuffling.
    """

    def __init__(
        self,
        backbone: str = "smollm2",
        source: str = "hamlet",
        train_file: str | None = None,
        validation_file: str | None = None,
        format: str = "text",
        prompt_field: str = "prompt",
        response_field: str = "response",
        messages_field: str = "messages",
        text_field: str = "text",
        chat_template: str | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        train_split: str = "train",
        validation_split: str | None = None,
        packing: bool = False,
        block_size: int = 128,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        validation_fraction: float = 0.1,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if format not in FORMATS:
            raise ValueError(f"Unknown format '{format}'. Choose one of {list(FORMATS)}.")
        if source not in SOURCES:
            raise ValueError(f"Unknown source '{source}'. Choose one of {list(SOURCES)}.")
        if block_size < 2 or batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("block_size must be >= 2 and batch sizes >= 1.")
        if packing and format == "text":
            raise ValueError("packing joins short instruction/chat examples; format='text' blocks are already full.")
        if source != "datasets" and (dataset or data_files or validation_split):
            raise ValueError("dataset/data_files/validation_split are read only with source='datasets'.")
        self.files = {"train": None, "validation": None}
        if source == "hamlet":
            if format != "text":
                raise ValueError("source='hamlet' is plain text: use format='text', or source='files' for JSONL.")
            if train_file or validation_file:
                raise ValueError("train_file/validation_file are read only with source='files', not 'hamlet'.")
            self.files["train"] = packaged_file("hamlet")
        elif source == "files":
            if train_file is None:
                suffixes = " or ".join(FORMATS[format])
                raise ValueError(f"source='files' needs train_file ({suffixes} for format='{format}').")
            self.files = {
                "train": check_file(train_file, "train", FORMATS[format]),
                "validation": check_file(validation_file, "validation", FORMATS[format]),
            }
        else:
            if train_file or validation_file:
                raise ValueError(
                    "With source='datasets' give local files as data_files, not train_file/validation_file."
                )
            if not dataset:
                raise ValueError(
                    "source='datasets' needs dataset: a hub id, a local folder, or a builder such as 'json' with "
                    "data_files."
                )
            require_datasets("source='datasets'")

    @property
    def eos_token_id(self) -> int:
        """End-of-sequence id appended to responses (SEP for encoder tokenizers without EOS)."""
        eos = self.tokenizer.eos_token_id
        eos = self.tokenizer.sep_token_id if eos is None else eos
        if eos is None:
            raise ValueError(f"The tokenizer of '{self.hparams.backbone}' has neither an EOS nor a SEP token.")
        return eos

    # ------------------------------------------------------------------------------------- reading
    def _dataset_rows(self, split: str) -> Rows:
        hp = self.hparams
        import datasets

        try:
            loaded = datasets.load_dataset(hp.dataset, hp.dataset_config, data_files=hp.data_files, split=split)
        except Exception as error:  # offline, no cache, unknown split, hub errors: all mean "cannot get it here"
            raise RuntimeError(
                f"Could not load split '{split}' of dataset '{hp.dataset}' through datasets "
                f"({type(error).__name__}: {error}). Check dataset/dataset_config/data_files and the split names; "
                "without network access, save the data as local files and use source='files' (or dataset='json' "
                "with data_files)."
            ) from error
        origin = f"dataset '{hp.dataset}' split '{split}'"
        return Rows([dict(row) for row in loaded], list(loaded.column_names), origin, unit="Row")

    def _rows(self, split: str) -> Rows | None:
        """The split's rows (instruction/chat files, or any ``datasets`` split); None when the split is not given."""
        if self.hparams.source == "datasets":
            name = self.hparams.train_split if split == "train" else self.hparams.validation_split
            return None if name is None else self._dataset_rows(name)
        path = self.files[split]
        return None if path is None else Rows(*read_table(path), origin=f"'{path}'")

    def _read(self, split: str) -> list | None:
        """The split's checked content: documents (text), (prompt, response) pairs or (where, messages) pairs."""
        hp = self.hparams
        if hp.format == "text" and hp.source != "datasets":
            return None if self.files[split] is None else [read_text(self.files[split])]
        rows = self._rows(split)
        if rows is None:
            return None
        if not rows.rows:
            raise ValueError(f"{rows.origin} has no examples.")
        if hp.format == "text":
            require_columns(rows.columns, [hp.text_field], rows.origin, "text_field")
            return [str(row[hp.text_field]) for row in rows.rows]
        if hp.format == "chat":
            require_columns(rows.columns, [hp.messages_field], rows.origin, "messages_field")
            return [
                (rows.where(n), check_conversation(row, hp.messages_field, rows.where(n)))
                for n, row in enumerate(rows.rows, start=1)
            ]
        require_columns(rows.columns, [hp.prompt_field, hp.response_field], rows.origin, "prompt_field/response_field")
        pairs = []
        for number, row in enumerate(rows.rows, start=1):
            prompt, response = row.get(hp.prompt_field), row.get(hp.response_field)
            if prompt is None or response is None:
                raise ValueError(
                    f"{rows.where(number)} lacks '{hp.prompt_field}' or '{hp.response_field}'; "
                    f"its keys are {list(row)}."
                )
            pairs.append((str(prompt), str(response)))
        return pairs

    def _encode(self, content: list) -> list[dict]:
        """Token examples of one split's content, cut to ``block_size``."""
        hp = self.hparams
        if hp.format == "text":
            ids: list[int] = []
            for number, document in enumerate(content):  # documents are joined with EOS between them
                ids += ([self.eos_token_id] if number else []) + self.tokenizer(
                    document, add_special_tokens=False, verbose=False
                )["input_ids"]
            return [{"input_ids": block, "labels": list(block)} for block in chunk_blocks(ids, hp.block_size)]
        if hp.format == "chat":
            template = resolve_chat_template(self.tokenizer, hp.chat_template, hp.backbone)
            return keep_trained(chat_examples(self.tokenizer, content, template), hp.block_size, "chat")
        prompts = self.tokenizer([p for p, _ in content], add_special_tokens=False)["input_ids"]
        responses = self.tokenizer([r for _, r in content], add_special_tokens=False)["input_ids"]
        examples = [instruction_example(p, r, self.eos_token_id, hp.block_size) for p, r in zip(prompts, responses)]
        return keep_trained(examples, hp.block_size, "instruction")

    # ------------------------------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Read and check every split before tokenising any, tokenise once, split, subsample, pack; reused after."""
        if self.datasets:
            return
        hp = self.hparams
        if hp.format == "chat":  # a missing template fails before any file is read
            resolve_chat_template(self.tokenizer, hp.chat_template, hp.backbone)
        content = {split: self._read(split) for split in ("train", "validation")}
        train = self._encode(content["train"])
        if content["validation"] is not None:
            validation = self._encode(content["validation"])
        else:
            train_ids, validation_ids = split_indices(len(train), hp.validation_fraction, hp.seed)
            train, validation = [train[i] for i in train_ids], [train[i] for i in validation_ids]
        for split, examples, limit in (
            ("train", train, hp.max_train_samples),
            ("validation", validation, hp.max_eval_samples),
        ):
            examples = subsample(examples, limit, hp.seed)
            if not examples:
                why = "no example is left (dropped ones are counted in a warning). Raise block_size or give more data"
                if hp.format == "text":
                    why = (
                        f"the text is shorter than block_size={hp.block_size} tokens per split. "
                        "Lower block_size or give more text"
                    )
                raise ValueError(f"The {split} split is empty: {why}.")
            if hp.packing:
                examples = pack_examples(examples, hp.block_size)
            self.datasets[split] = EncodedDataset({key: [e[key] for e in examples] for key in examples[0]})

    def collate_fn(self) -> CausalLMCollator:
        return CausalLMCollator(self.tokenizer.pad_token_id)
