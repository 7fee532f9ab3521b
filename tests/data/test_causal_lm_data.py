"""CausalLMDataModule: Hamlet/.txt blocks, instruction and chat JSONL with masked labels, packing, datasets sources."""
import importlib.util
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_lightning.assets import packaged_file
from lora_lightning.backbone import load_tokenizer
from lora_lightning.data import CausalLMDataModule
from lora_lightning.data.causal_lm import chunk_blocks, instruction_example
from lora_lightning.data.collate import IGNORE_INDEX, CausalLMCollator
from lora_lightning.data.packing import pack_examples
from lora_lightning.modules import LoRAModule

CHAT_FILE = Path(__file__).parent / "fixtures" / "chat_hamlet.jsonl"
# SmolLM2's own template with the assistant output wrapped in {% generation %}: the exact-mask path of transformers
TAGGED_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
        ({"format": "markdown"}, r"Unknown format 'markdown'.*'text', 'instruction', 'chat'"),
        ({"source": "wikitext"}, r"Unknown source 'wikitext'.*'hamlet', 'files', 'datasets'"),
        ({"format": "instruction"}, r"source='hamlet' is plain text"),
        ({"source": "files"}, r"source='files' needs train_file"),
        ({"block_size": 1}, r"block_size must be >= 2"),
        ({"packing": True}, r"packing joins short instruction/chat examples; format='text' blocks are already full"),
        ({"dataset": "json"}, r"dataset/data_files/validation_split are read only with source='datasets'"),
        ({"source": "datasets", "train_file": "a.jsonl"}, r"give local files as data_files"),
        ({"source": "datasets"}, r"source='datasets' needs dataset: a hub id"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalLMDataModule(**kwargs)


def test_wrong_extension_for_the_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported extension '\.txt'; use one of \.jsonl, \.json"):
        CausalLMDataModule(source="files", train_file=str(tmp_path / "notes.txt"), format="instruction")


# ------------------------------------------------------------------------------------------------ chat
def _write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _chat_data(path, **kwargs) -> CausalLMDataModule:
    return CausalLMDataModule(source="files", train_file=str(path), validation_file=str(path), format="chat", **kwargs)


def _trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive positions with a label, checking that labels equal the inputs there."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + [current] if current else runs


def test_chat_labels_are_exactly_the_assistant_turns(tmp_path, smollm2):
    messages = [
        {"role": "user", "content": "Who is Hamlet?"},
        {"role": "assistant", "content": "The Prince of Denmark."},
        {"role": "user", "content": "And his father?"},
        {"role": "assistant", "content": "The late King, whose ghost walks."},
    ]
    data = _chat_data(_write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]))
    data.setup("fit")
    example = data.datasets["validation"][0]
    # SmolLM2's template, written out: a default system turn, then <|im_start|>role\ncontent<|im_end|>\n per message
    pieces = [
        ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
         "<|im_start|>user\nWho is Hamlet?<|im_end|>\n<|im_start|>assistant\n", False),
        ("The Prince of Denmark.<|im_end|>\n", True),
        ("<|im_start|>user\nAnd his father?<|im_end|>\n<|im_start|>assistant\n", False),
        ("The late King, whose ghost walks.<|im_end|>\n", True),
    ]
    ids, labels = [], []
    for text, trained in pieces:
        piece = smollm2(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    assert example["input_ids"] == ids
    assert example["labels"] == labels
    assert smollm2.decode(ids) == "".join(text for text, _ in pieces)


def test_every_fixture_conversation_trains_on_its_assistant_replies_only(smollm2):
    data = _chat_data(CHAT_FILE, block_size=512)
    data.setup("fit")
    conversations = [json.loads(line)["messages"] for line in CHAT_FILE.read_text().splitlines()]
    encoded = data.datasets["validation"].encodings
    assert len(encoded["input_ids"]) == len(conversations) == 38
    for messages, ids, labels in zip(conversations, encoded["input_ids"], encoded["labels"]):
        replies = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
        assert [smollm2.decode(run) for run in _trained_runs(ids, labels)] == replies


def test_generation_tags_give_the_same_mask_as_prefix_rendering(tmp_path):
    template_file = tmp_path / "smollm2_tagged.jinja"
    template_file.write_text(TAGGED_TEMPLATE)
    by_prefix, by_tags = _chat_data(CHAT_FILE, block_size=512), _chat_data(CHAT_FILE, block_size=512,
                                                                           chat_template=str(template_file))
    by_prefix.setup("fit")
    by_tags.setup("fit")
    assert by_tags.datasets["validation"].encodings == by_prefix.datasets["validation"].encodings


def test_messages_field_is_configurable(tmp_path, smollm2):
    rows = [{"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    data = _chat_data(_write_jsonl(tmp_path / "chat.jsonl", rows), messages_field="conversation")
    data.setup("fit")
    example = data.datasets["validation"][0]
    assert [smollm2.decode(run) for run in _trained_runs(example["input_ids"], example["labels"])] == [
        "Hello.<|im_end|>\n"
    ]


def test_chat_truncation_keeps_partial_replies_and_drops_those_with_none(tmp_path, smollm2):
    long_question = {"role": "user", "content": "Tell me about Elsinore. " * 20}
    reply = {"role": "assistant", "content": "It is a castle in Denmark, guarded at night by sentinels."}
    short_question = {"role": "user", "content": "Where?"}
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [long_question, reply]},
                                                  {"messages": [short_question, reply]}])
    data = _chat_data(path, block_size=40)
    with pytest.warns(UserWarning, match=r"Dropped 1 chat examples with no trained token .*block_size=40"):
        data.setup("fit")
    (ids,), (labels,) = data.datasets["train"].encodings["input_ids"], data.datasets["train"].encodings["labels"]
    full = smollm2.apply_chat_template([short_question, reply], tokenize=False)
    assert len(full) > 40 and ids == smollm2(full, add_special_tokens=False)["input_ids"][:40]
    (run,) = _trained_runs(ids, labels)
    assert run == ids[-len(run):] and reply["content"].startswith(smollm2.decode(run))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user"}]}, r"Line 2 of '.*chat\.jsonl': message 1 needs 'role' and 'content'"),
        ({"messages": [{"content": "x"}]}, r"Line 2 of .*: message 1 needs 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hi"}]},
         r"Line 2 of .*: message 2 has the unknown role 'bot'; use one of \('system', 'user', 'assistant', 'tool'\)"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, r"Line 2 of .* has no assistant message"),
        ({"messages": []}, r"Line 2 of .*: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": ["a", "b"]}]}, r"Line 2 of .*content of message 1 must be text"),
        ({"text": "hello"}, r"Line 2 of .* has no 'messages' field; its keys are \['text'\]. Set messages_field"),
    ],
)
def test_bad_chat_rows_are_named_by_file_and_line(tmp_path, row, message):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    data = _chat_data(_write_jsonl(tmp_path / "chat.jsonl", [good, row]))
    with pytest.raises(ValueError, match=message):
        data.setup("fit")


def test_a_file_without_the_messages_field_lists_its_columns(tmp_path):
    data = _chat_data(_write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "a", "response": "b"}]))
    with pytest.raises(KeyError, match=r"\['messages'\] not found .*\['prompt', 'response'\]. Set messages_field"):
        data.setup("fit")


def test_a_tokenizer_without_a_chat_template_names_the_option(tmp_path):
    data = CausalLMDataModule(backbone="minilm", source="files", train_file=str(CHAT_FILE), format="chat")
    with pytest.raises(ValueError, match=r"tokenizer of 'minilm' has no chat template.*Set chat_template"):
        data.setup("fit")


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ messages | length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
         r"Line 1 of .*: the chat template's rendering up to message 3 \(an assistant turn\) is not a prefix of"
         r" .*\{% generation %\}"),
        ("{{ raise_exception('Conversation roles must alternate user/assistant') }}",
         r"Line 1 of .*: the chat template refused this conversation: Conversation roles must alternate"),
    ],
)
def test_template_failures_are_named_by_line(template, message):
    with pytest.raises(ValueError, match=message):
        _chat_data(CHAT_FILE, chat_template=template).setup("fit")


def test_a_chat_template_path_that_does_not_exist():
    with pytest.raises(FileNotFoundError, match=r"chat_template 'nowhere\.jinja' is neither a Jinja template"):
        _chat_data(CHAT_FILE, chat_template="nowhere.jinja").setup("fit")


# ------------------------------------------------------------------------------------------------ packing
def test_pack_examples_best_fit_decreasing():
    examples = [{"input_ids": [n] * n, "labels": [10 + n] * n} for n in (1, 3, 5, 2, 4)]
    rows = pack_examples(examples, block_size=6)
    assert [row["input_ids"] for row in rows] == [[5] * 5 + [1], [4] * 4 + [2] * 2, [3] * 3]
    assert rows[0]["labels"] == [-100, 15, 15, 15, 15, -100]  # no example predicts the next one's first token
    assert rows[1]["position_ids"] == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError, match=r"An example of 7 tokens does not fit block_size=6"):
        pack_examples([{"input_ids": [1] * 7, "labels": [1] * 7}], block_size=6)


def test_packed_collation_has_position_ids_and_no_attention_mask():
    rows = [{"input_ids": [4, 5, 6, 7], "labels": [-100, 5, -100, 7], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [8, 9], "labels": [-100, 9], "position_ids": [0, 1]}]
    batch = CausalLMCollator(pad_token_id=0)(rows)
    assert set(batch) == {"input_ids", "position_ids", "labels", "use_cache"} and batch["use_cache"] is False
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]  # the padding tail is its own segment
    assert batch["input_ids"].tolist() == [[4, 5, 6, 7], [8, 9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, -100, 7], [-100, 9, -100, -100]]


def test_packing_fills_rows_and_keeps_every_trained_token():
    plain, packed = _chat_data(CHAT_FILE, block_size=256), _chat_data(CHAT_FILE, block_size=256, packing=True)
    plain.setup("fit")
    packed.setup("fit")
    for split in ("train", "validation"):
        examples, rows = plain.datasets[split].encodings, packed.datasets[split].encodings
        assert sum(map(len, rows["input_ids"])) == sum(map(len, examples["input_ids"]))
        assert all(len(row) <= 256 for row in rows["input_ids"])
        assert len(rows["input_ids"]) == -(-sum(map(len, examples["input_ids"])) // 256)  # as few rows as possible
        trained = lambda labels: sum(label != IGNORE_INDEX for row in labels for label in row)  # noqa: E731
        assert trained(rows["labels"]) == trained(examples["labels"])  # first tokens are never trained on in chat
    assert len(packed.datasets["train"]) == 10 and next(iter(packed.train_dataloader()))["input_ids"].shape[0] == 8


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_packed_batch_equals_its_examples_run_one_by_one(tiny_llama, attention):
    data = CausalLMDataModule(backbone=tiny_llama, source="files", train_file=str(CHAT_FILE), format="chat",
                              block_size=256, batch_size=2, packing=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attention).eval()
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        packed = model(**batch)
        loss_sum, n_tokens, n_examples = 0.0, 0, 0
        for row in range(batch["input_ids"].shape[0]):
            positions = batch["position_ids"][row].tolist() + [0]
            starts = [i for i, p in enumerate(positions) if p == 0]
            for start, end in zip(starts, starts[1:]):
                labels = batch["labels"][row, start:end]
                if not (labels != IGNORE_INDEX).any():
                    continue  # the padding tail
                alone = model(input_ids=batch["input_ids"][row : row + 1, start:end], labels=labels[None])
                torch.testing.assert_close(packed.logits[row, start:end], alone.logits[0], atol=2e-5, rtol=1e-4)
                n = int((labels[1:] != IGNORE_INDEX).sum())
                loss_sum, n_tokens, n_examples = loss_sum + float(alone.loss) * n, n_tokens + n, n_examples + 1
        leaking = model(**{**batch, "use_cache": True})  # a cache turns the packed mask off: examples see each other
    assert n_examples > 3
    assert float(packed.loss) == pytest.approx(loss_sum / n_tokens, rel=1e-5)
    assert abs(float(leaking.loss) - float(packed.loss)) > 1e-4


def test_lora_fits_on_packed_chat_data(tiny_llama):
    data = CausalLMDataModule(backbone=tiny_llama, source="files", train_file=str(CHAT_FILE), format="chat",
                              block_size=128, batch_size=4, packing=True)
    module = LoRAModule(backbone=tiny_llama, task="causal-lm", target_modules=["q_proj", "v_proj"], rank=2)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    assert trainer.global_step == 2
    assert 1 < metrics["val/perplexity"] < float("inf")


# ------------------------------------------------------------------------------------------------ datasets sources
def test_datasets_source_without_the_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"source='datasets' needs the optional 'datasets' package: pip install"):
        CausalLMDataModule(source="datasets", dataset="json", data_files=str(CHAT_FILE), format="chat")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs the optional 'datasets' package")
def test_datasets_json_source_equals_the_files_source(tmp_path):
    from_files = _chat_data(CHAT_FILE, block_size=256)
    from_datasets = CausalLMDataModule(source="datasets", dataset="json", format="chat", block_size=256,
                                       data_files={"train": str(CHAT_FILE), "validation": str(CHAT_FILE)},
                                       validation_split="validation")
    from_files.setup("fit")
    from_datasets.setup("fit")
    for split in ("train", "validation"):
        assert from_datasets.datasets[split].encodings == from_files.datasets[split].encodings
    text = tmp_path / "docs.jsonl"
    _write_jsonl(text, [{"body": "To be, or not to be. " * 8}, {"body": "That is the question. " * 8}])
    blocks = CausalLMDataModule(source="datasets", dataset="json", data_files=str(text), text_field="body",
                                block_size=8, validation_fraction=0.5)
    blocks.setup("fit")
    tokenizer = blocks.tokenizer
    stream = (tokenizer("To be, or not to be. " * 8, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
              + tokenizer("That is the question. " * 8, add_special_tokens=False)["input_ids"])
    held = blocks.datasets["train"].encodings["input_ids"] + blocks.datasets["validation"].encodings["input_ids"]
    assert sorted(held) == sorted(chunk_blocks(stream, 8))
    with pytest.raises(RuntimeError, match=r"Could not load split 'test' of dataset 'json'.*source='files'"):
        CausalLMDataModule(source="datasets", dataset="json", data_files=str(text), validation_split="test",
                           text_field="body").setup("fit")
