"""CausalLMDataModule: packaged Hamlet and .txt blocks, instruction JSONL with prompt-masked labels (SmolLM2 tokenizer)."""
import json

import pytest
import torch

from lora_lightning.assets import packaged_file
from lora_lightning.backbone import load_tokenizer
from lora_lightning.data import CausalLMDataModule
from lora_lightning.data.causal_lm import chunk_blocks, instruction_example
from lora_lightning.data.collate import IGNORE_INDEX, CausalLMCollator


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("smollm2")  # cached for the process: loaded once


def test_chunk_blocks_drops_the_tail():
    assert chunk_blocks(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk_blocks([1, 2], 4) == []


def test_instruction_example_masks_the_prompt_and_truncates():
    example = instruction_example([5, 6, 7], [8, 9], eos_id=2, block_size=10)
    assert example == {"input_ids": [5, 6, 7, 8, 9, 2], "labels": [-100, -100, -100, 8, 9, 2]}
    assert instruction_example([5, 6, 7], [8, 9], eos_id=2, block_size=4)["labels"] == [-100, -100, -100, 8]


def test_collator_pads_ids_mask_and_labels():
    batch = CausalLMCollator(pad_token_id=0)(
        [{"input_ids": [4, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [7], "labels": [7]}]
    )
    assert batch["input_ids"].tolist() == [[4, 5, 6], [7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [7, -100, -100]]


def test_hamlet_blocks_have_exactly_block_size_tokens(smollm2):
    data = CausalLMDataModule(block_size=64, batch_size=4)
    data.setup("fit")
    n_tokens = len(smollm2(packaged_file("hamlet").read_text(), add_special_tokens=False, verbose=False)["input_ids"])
    train, validation = data.datasets["train"], data.datasets["validation"]
    assert len(train) + len(validation) == n_tokens // 64
    assert len(validation) == round(0.1 * (n_tokens // 64))
    assert all(len(block) == 64 for block in train.encodings["input_ids"] + validation.encodings["input_ids"])
    train_blocks = {tuple(block) for block in train.encodings["input_ids"]}
    assert train_blocks.isdisjoint(tuple(block) for block in validation.encodings["input_ids"])
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64)
    assert torch.equal(batch["labels"], batch["input_ids"]) and bool(batch["attention_mask"].all())
    other = CausalLMDataModule(block_size=64, max_train_samples=10, max_eval_samples=5)
    other.setup("fit")
    assert len(other.datasets["train"]) == 10 and len(other.datasets["validation"]) == 5
    assert set(map(tuple, other.datasets["validation"].encodings["input_ids"])) <= {
        tuple(block) for block in validation.encodings["input_ids"]
    }


def test_text_file_with_a_validation_file(tmp_path, smollm2):
    (tmp_path / "train.txt").write_text("To be, or not to be, that is the question. " * 30)
    (tmp_path / "valid.txt").write_text("Whether 'tis nobler in the mind to suffer. " * 10)
    data = CausalLMDataModule(source="files", train_file=str(tmp_path / "train.txt"),
                              validation_file=str(tmp_path / "valid.txt"), block_size=16)
    data.setup("fit")
    n_valid = len(smollm2((tmp_path / "valid.txt").read_text(), add_special_tokens=False)["input_ids"])
    assert len(data.datasets["validation"]) == n_valid // 16
    assert next(iter(data.predict_dataloader()))["input_ids"].shape[1] == 16


def test_instruction_labels_are_ignored_exactly_on_prompt_and_padding(tmp_path, smollm2):
    rows = [
        {"prompt": "Question: who wrote Hamlet?\nAnswer:", "response": " Shakespeare."},
        {"prompt": "Translate to French: cat\n", "response": " chat, a small domesticated feline"},
        {"prompt": "Say hi.", "response": " Hi!"},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = CausalLMDataModule(source="files", train_file=str(path), validation_file=str(path),
                              format="instruction", batch_size=3)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    eos = smollm2.eos_token_id
    for i, row in enumerate(rows):
        prompt = smollm2(row["prompt"], add_special_tokens=False)["input_ids"]
        response = smollm2(row["response"], add_special_tokens=False)["input_ids"]
        n = len(prompt) + len(response) + 1
        assert batch["input_ids"][i, :n].tolist() == prompt + response + [eos]
        assert batch["labels"][i, :n].tolist() == [IGNORE_INDEX] * len(prompt) + response + [eos]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
    trained = batch["labels"] != IGNORE_INDEX
    assert int(trained.sum()) == sum(len(smollm2(r["response"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)


def test_examples_whose_prompt_fills_the_block_are_dropped(tmp_path, smollm2):
    rows = [{"prompt": "word " * 40, "response": " yes"}, {"prompt": "Short?", "response": " yes"}] * 5
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = CausalLMDataModule(source="files", train_file=str(path), validation_file=str(path),
                              format="instruction", block_size=16)
    with pytest.warns(UserWarning, match=r"Dropped 5 instruction examples .*block_size=16"):
        data.setup("fit")
    assert len(data.datasets["train"]) == 5
    assert all(len(ids) <= 16 for ids in data.datasets["train"].encodings["input_ids"])


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train file '.*gone\.txt' does not exist"):
        CausalLMDataModule(source="files", train_file=str(tmp_path / "gone.txt"))


def test_missing_field_lists_the_columns(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    data = CausalLMDataModule(source="files", train_file=str(path), format="instruction")
    with pytest.raises(KeyError, match=r"\['prompt', 'response'\] not found.*\['instruction', 'output'\]"):
        data.setup("fit")


def test_a_line_without_the_field_is_named(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    data = CausalLMDataModule(source="files", train_file=str(path), format="instruction")
    with pytest.raises(ValueError, match=r"Line 2 of .* lacks 'prompt' or 'response'"):
        data.setup("fit")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"format": "chat"}, r"Unknown format 'chat'.*'text', 'instruction'"),
        ({"source": "wikitext"}, r"Unknown source 'wikitext'.*'hamlet', 'files'"),
        ({"format": "instruction"}, r"source='hamlet' is plain text"),
        ({"source": "files"}, r"source='files' needs train_file"),
        ({"block_size": 1}, r"block_size must be >= 2"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalLMDataModule(**kwargs)


def test_wrong_extension_for_the_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported extension '\.txt'; use one of \.jsonl, \.json"):
        CausalLMDataModule(source="files", train_file=str(tmp_path / "notes.txt"), format="instruction")
