"""Causal language modelling data: plain text cut into fixed blocks, or prompt/response pairs from JSONL.

Plain text (the packaged Hamlet, or a ``.txt`` file) is tokenised once and cut into ``block_size`` blocks whose
labels are their ``input_ids`` (the model shifts them). Instruction data gives ``prompt + response + eos``; the
loss covers only the response and eos: labels are -100 on prompt tokens and on padding.
"""
from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

from lora_lightning.assets import packaged_file
from lora_lightning.data.base import TokenizedDataModule
from lora_lightning.data.collate import IGNORE_INDEX, CausalLMCollator, EncodedDataset
from lora_lightning.data.files import check_file, read_table, read_text, require_columns
from lora_lightning.data.splits import split_indices, subsample

SOURCES = ("hamlet", "files")
FORMATS = {"text": (".txt",), "instruction": (".jsonl", ".json")}


def chunk_blocks(token_ids: list[int], block_size: int) -> list[list[int]]:
    """Consecutive ``block_size`` blocks of a token stream; the incomplete tail is dropped."""
    return [token_ids[start : start + block_size] for start in range(0, len(token_ids) - block_size + 1, block_size)]


def instruction_example(prompt_ids: list[int], response_ids: list[int], eos_id: int, block_size: int) -> dict:
    """``prompt + response + eos`` cut to ``block_size``, with labels -100 on the prompt tokens."""
    input_ids = (prompt_ids + response_ids + [eos_id])[:block_size]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids + [eos_id])[:block_size]
    return {"input_ids": input_ids, "labels": labels}


class CausalLMDataModule(TokenizedDataModule):
    """Next-token prediction data for a decoder-only backbone.

    ``source`` is ``"hamlet"`` (packaged corpus, ``format="text"``) or ``"files"`` (``train_file`` and optional
    ``validation_file``: ``.txt`` for ``format="text"``, JSONL with ``prompt_field``/``response_field`` for
    ``format="instruction"``). Without ``validation_file`` a seeded ``validation_fraction`` of the blocks or
    examples is held out. ``predict_dataloader`` uses the validation split.
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
        if source == "hamlet":
            if format != "text":
                raise ValueError("source='hamlet' is plain text: use format='text', or source='files' for JSONL.")
            if train_file or validation_file:
                raise ValueError("train_file/validation_file are read only with source='files', not 'hamlet'.")
            self.files = {"train": packaged_file("hamlet"), "validation": None}
        else:
            if train_file is None:
                suffixes = " or ".join(FORMATS[format])
                raise ValueError(f"source='files' needs train_file ({suffixes} for format='{format}').")
            self.files = {
                "train": check_file(train_file, "train", FORMATS[format]),
                "validation": check_file(validation_file, "validation", FORMATS[format]),
            }

    @property
    def eos_token_id(self) -> int:
        """End-of-sequence id appended to responses (SEP for encoder tokenizers without EOS)."""
        eos = self.tokenizer.eos_token_id
        eos = self.tokenizer.sep_token_id if eos is None else eos
        if eos is None:
            raise ValueError(f"The tokenizer of '{self.hparams.backbone}' has neither an EOS nor a SEP token.")
        return eos

    # ------------------------------------------------------------------------------------- reading
    def _read_instructions(self, path) -> list[tuple[str, str]]:
        hp = self.hparams
        rows, columns = read_table(path)
        require_columns(columns, [hp.prompt_field, hp.response_field], path, "prompt_field/response_field")
        pairs = []
        for number, row in enumerate(rows, start=1):
            prompt, response = row.get(hp.prompt_field), row.get(hp.response_field)
            if prompt is None or response is None:
                raise ValueError(
                    f"Line {number} of '{path}' lacks '{hp.prompt_field}' or '{hp.response_field}'; "
                    f"its keys are {list(row)}."
                )
            pairs.append((str(prompt), str(response)))
        if not pairs:
            raise ValueError(f"'{path}' has no examples.")
        return pairs

    def _text_examples(self, path) -> list[dict]:
        ids = self.tokenizer(read_text(path), add_special_tokens=False, verbose=False)["input_ids"]
        blocks = chunk_blocks(ids, self.hparams.block_size)
        return [{"input_ids": block, "labels": list(block)} for block in blocks]

    def _instruction_examples(self, pairs: list[tuple[str, str]]) -> list[dict]:
        prompts = self.tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
        responses = self.tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
        examples = [
            instruction_example(p, r, self.eos_token_id, self.hparams.block_size) for p, r in zip(prompts, responses)
        ]
        kept = [example for example in examples if any(label != IGNORE_INDEX for label in example["labels"])]
        if len(kept) < len(examples):
            rank_zero_warn(
                f"Dropped {len(examples) - len(kept)} instruction examples whose prompt fills block_size="
                f"{self.hparams.block_size}: no response token would be trained on. Raise block_size to keep them."
            )
        return kept

    def _examples(self, path) -> list[dict]:
        if self.hparams.format == "text":
            return self._text_examples(path)
        return self._instruction_examples(self._read_instructions(path))

    # ------------------------------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Check fields, tokenise once, split and subsample; repeated calls reuse the result."""
        if self.datasets:
            return
        hp = self.hparams
        if hp.format == "instruction":  # check every file's fields before tokenising any of them
            for path in self.files.values():
                if path is not None:
                    self._read_instructions(path)
        train = self._examples(self.files["train"])
        if self.files["validation"] is not None:
            validation = self._examples(self.files["validation"])
        else:
            train_ids, validation_ids = split_indices(len(train), hp.validation_fraction, hp.seed)
            train, validation = [train[i] for i in train_ids], [train[i] for i in validation_ids]
        for split, examples, limit in (
            ("train", train, hp.max_train_samples),
            ("validation", validation, hp.max_eval_samples),
        ):
            examples = subsample(examples, limit, hp.seed)
            if not examples:
                raise ValueError(
                    f"The {split} split is empty: the text is shorter than block_size={hp.block_size} tokens "
                    "per split. Lower block_size or give more text."
                )
            self.datasets[split] = EncodedDataset(
                {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}
            )

    def collate_fn(self) -> CausalLMCollator:
        return CausalLMCollator(self.tokenizer.pad_token_id)
