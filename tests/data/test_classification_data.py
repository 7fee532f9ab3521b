"""TextClassificationDataModule on the packaged Rotten Tomatoes corpus and on small local files (MiniLM tokenizer)."""
import csv
import importlib.util
import json
from collections import Counter

import pytest
import torch

from lora_lightning.data import TextClassificationDataModule
from lora_lightning.data.splits import split_indices

RT_TOTAL, RT_FRESH, RT_ROTTEN = 12808, 7403, 5405


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def rotten_tomatoes():
    data = TextClassificationDataModule(batch_size=8, max_length=64)
    data.setup("fit")
    return data


# ------------------------------------------------------------------------------------------------ packaged corpus
def test_rotten_tomatoes_split_sizes_and_label_counts(rotten_tomatoes):
    train, validation = rotten_tomatoes.datasets["train"], rotten_tomatoes.datasets["validation"]
    assert len(validation) == round(0.1 * RT_TOTAL) == 1281
    assert len(train) + len(validation) == RT_TOTAL
    counts = Counter(train.labels) + Counter(validation.labels)
    assert counts == {1: RT_FRESH, 0: RT_ROTTEN}
    assert rotten_tomatoes.label_names == ["rotten", "fresh"] and rotten_tomatoes.num_labels == 2
    train_ids, validation_ids = split_indices(RT_TOTAL, 0.1, seed=42)
    assert set(train_ids).isdisjoint(validation_ids)


def test_rotten_tomatoes_split_is_the_same_in_a_second_instance(rotten_tomatoes):
    other = TextClassificationDataModule(max_length=64)
    other.setup("validate")
    assert other.datasets["validation"].encodings["input_ids"] == rotten_tomatoes.datasets["validation"].encodings["input_ids"]
    assert other.datasets["validation"].labels == rotten_tomatoes.datasets["validation"].labels


def test_num_labels_is_known_before_setup():
    data = TextClassificationDataModule(max_train_samples=10)
    assert data.num_labels == 2 and data.label_names == ["rotten", "fresh"]
    assert data.datasets == {}  # nothing tokenised yet


def test_batches_are_dynamically_padded_with_long_labels(rotten_tomatoes):
    batch = next(iter(rotten_tomatoes.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (8,)
    lengths = batch["attention_mask"].sum(dim=1)
    assert batch["input_ids"].shape[1] == lengths.max() <= 64
    expected = [len(ids) for ids in rotten_tomatoes.datasets["validation"].encodings["input_ids"][:8]]
    assert lengths.tolist() == expected


def test_train_order_is_seeded_and_subsample_deterministic():
    def first_batches(seed):
        data = TextClassificationDataModule(max_train_samples=40, max_eval_samples=10, batch_size=4, seed=seed)
        data.setup("fit")
        assert len(data.datasets["train"]) == 40 and len(data.datasets["validation"]) == 10
        loader = data.train_dataloader()
        return [batch["input_ids"].tolist() for batch in loader], data

    batches, data = first_batches(0)
    again, _ = first_batches(0)
    assert batches == again
    other_seed, _ = first_batches(1)
    assert other_seed != batches
    # the order of an epoch depends on (seed, epoch) only, so a resumed fit replays it exactly
    loader = data.train_dataloader()
    epoch_one = [batch["input_ids"].tolist() for batch in loader]
    loader.sampler.set_epoch(1)
    epoch_two = [batch["input_ids"].tolist() for batch in loader]
    assert epoch_one == batches and epoch_two != epoch_one
    assert [batch["input_ids"].tolist() for batch in data.train_dataloader()] == batches
    def unpadded(epoch):  # the MiniLM pad id is 0
        return sorted(str([token for token in row if token != 0]) for batch in epoch for row in batch)

    assert unpadded(epoch_two) == unpadded(epoch_one)


# ------------------------------------------------------------------------------------------------ local files
def test_sentence_pairs_use_both_segments(tmp_path):
    rows = [
        {"sentence1": "The cat sat.", "sentence2": "A cat was sitting down.", "label": 1},
        {"sentence1": "Stocks fell sharply today.", "sentence2": "It rained.", "label": 0},
    ]
    train = write_csv(tmp_path / "train.csv", rows * 5)
    data = TextClassificationDataModule(
        source="files", train_file=train, validation_file=train, text_fields=["sentence1", "sentence2"], batch_size=2
    )
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    tokenizer = data.tokenizer
    for row, example in enumerate(rows):
        n = int(batch["attention_mask"][row].sum())
        segments = batch["token_type_ids"][row, :n]
        assert segments[0] == 0 and segments[-1] == 1
        second = batch["input_ids"][row, :n][segments == 1]
        first = batch["input_ids"][row, :n][segments == 0]
        assert tokenizer.decode(second, skip_special_tokens=True) == example["sentence2"].lower()
        assert tokenizer.decode(first, skip_special_tokens=True) == example["sentence1"].lower()
    assert batch["labels"].tolist() == [1, 0]


def test_string_labels_map_sorted_and_save_restore(tmp_path):
    rows = [{"text": f"review {i}", "label": name} for i, name in enumerate(["pos", "neg", "neutral"] * 4)]
    path = write_csv(tmp_path / "train.tsv", rows, delimiter="\t")
    data = TextClassificationDataModule(source="files", train_file=path, validation_file=path)
    assert data.label_names == ["neg", "neutral", "pos"] and data.num_labels == 3
    data.setup("fit")
    assert data.datasets["validation"].labels[:3] == [2, 0, 1]
    state = data.state_dict()
    assert state == {"label_names": ["neg", "neutral", "pos"], "num_labels": 3}

    # data without 'neutral' alone would map pos -> 1; the restored mapping keeps pos -> 2
    two = write_csv(tmp_path / "two.csv", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    restored = TextClassificationDataModule(source="files", train_file=two, validation_file=two)
    restored.setup("fit")
    assert restored.datasets["validation"].labels == [1, 0]
    restored.load_state_dict(state)  # Lightning restores after setup
    assert restored.label_names == ["neg", "neutral", "pos"] and restored.num_labels == 3
    assert restored.datasets["validation"].labels == [2, 0]
    before_setup = TextClassificationDataModule(source="files", train_file=two, validation_file=two)
    before_setup.load_state_dict(state)
    before_setup.setup("fit")
    assert before_setup.datasets["validation"].labels == [2, 0]


def test_regression_labels_are_float(tmp_path):
    rows = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i / 2, "idx": i} for i in range(10)]
    path = write_jsonl(tmp_path / "stsb.jsonl", rows)
    data = TextClassificationDataModule(
        source="files", train_file=path, text_fields=["sentence1", "sentence2"], validation_fraction=0.2, batch_size=3
    )
    assert data.num_labels == 1 and data.is_regression and data.label_names is None
    data.setup("fit")
    labels = torch.cat([batch["labels"] for batch in data.train_dataloader()])
    assert labels.dtype == torch.float32
    assert sorted(labels.tolist() + data.datasets["validation"].labels) == [i / 2 for i in range(10)]


def test_csv_scores_with_num_labels_1_and_integer_labels_inferred(tmp_path):
    scores = write_csv(tmp_path / "s.csv", [{"text": "x", "label": "3"}, {"text": "y", "label": "4.5"}])
    data = TextClassificationDataModule(source="files", train_file=scores, validation_file=scores, num_labels=1)
    data.setup("validate")
    assert data.datasets["validation"].labels == [3.0, 4.5]
    ids = write_csv(tmp_path / "i.csv", [{"text": "x", "label": "0"}, {"text": "y", "label": "4"}])
    assert TextClassificationDataModule(source="files", train_file=ids, validation_file=ids).num_labels == 5


def test_predict_uses_test_file_and_its_labels_are_optional(tmp_path):
    train = write_csv(tmp_path / "train.csv", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}] * 5)
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "fine"}, {"text": "awful film"}, {"text": "ok"}])
    data = TextClassificationDataModule(source="files", train_file=train, test_file=test, eval_batch_size=3)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert "labels" not in batch and batch["input_ids"].shape[0] == 3
    assert len(data.datasets["validation"]) == 1 and len(data.datasets["train"]) == 9


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture()
def small_csv(tmp_path):
    return write_csv(tmp_path / "small.csv", [{"review": "good", "label": 1}, {"review": "bad", "label": 3}])


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "absent.csv"
    with pytest.raises(FileNotFoundError, match=r"train file '.*absent\.csv' does not exist"):
        TextClassificationDataModule(source="files", train_file=str(missing))


def test_missing_text_field_lists_the_columns(small_csv):
    data = TextClassificationDataModule(source="files", train_file=small_csv)  # text_fields defaults to ['text']
    with pytest.raises(KeyError, match=r"\['text'\] not found .*Columns that exist: \['review', 'label'\]"):
        data.setup("fit")


def test_missing_label_field_lists_the_columns(small_csv):
    data = TextClassificationDataModule(source="files", train_file=small_csv, text_fields=["review"], label_field="y")
    with pytest.raises(KeyError, match=r"\['y'\] not found .*\['review', 'label'\].*label_field"):
        data.setup("fit")


def test_label_outside_num_labels(small_csv):
    data = TextClassificationDataModule(source="files", train_file=small_csv, text_fields=["review"], num_labels=2)
    with pytest.raises(ValueError, match=r"Label 3 does not fit num_labels=2.*num_labels=4"):
        data.setup("fit")
    assert data.datasets == {}  # raised before any tokenisation


def test_more_string_labels_than_num_labels(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"text": t, "label": t} for t in ("a", "b", "c", "a")])
    data = TextClassificationDataModule(source="files", train_file=path, num_labels=2)
    with pytest.raises(ValueError, match=r"3 distinct labels \['a', 'b', 'c'\] but num_labels=2"):
        data.setup("fit")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"source": "imdb"}, ValueError, r"Unknown source 'imdb'.*rotten_tomatoes.*files.*glue/<task>"),
        ({"source": "glue/wnli"}, ValueError, r"Unknown GLUE task 'wnli'.*cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte"),
        ({"text_fields": []}, ValueError, r"text_fields must name one column .* or two"),
        ({"text_fields": ["a", "b", "c"]}, ValueError, r"text_fields must name one column .* or two"),
        ({"source": "files"}, ValueError, r"source='files' needs train_file"),
        ({"train_file": "x.csv"}, ValueError, r"read only with source='files'"),
        ({"num_labels": 0}, ValueError, r"num_labels must be at least 1"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, error, message):
    with pytest.raises(error, match=message):
        TextClassificationDataModule(**kwargs)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_glue_without_datasets_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install datasets.*source='files'"):
        TextClassificationDataModule(source="glue/mrpc")


class _BagOfEmbeddings(torch.nn.Module):
    """The smallest real classifier over token ids, enough for Trainer to run steps and save a checkpoint."""

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.embedding = torch.nn.EmbeddingBag(30522, num_labels)

    def forward(self, input_ids):
        return self.embedding(input_ids)


def test_label_mapping_travels_in_a_lightning_checkpoint(tmp_path):
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _BagOfEmbeddings(3)

        def training_step(self, batch, _):
            return torch.nn.functional.cross_entropy(self.net(batch["input_ids"]), batch["labels"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    three = write_csv(tmp_path / "three.csv", [{"text": f"t {i}", "label": "pos neg neutral".split()[i % 3]} for i in range(12)])
    two = write_csv(tmp_path / "two.csv", [{"text": f"t {i}", "label": "pos neg".split()[i % 2]} for i in range(12)])
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, default_root_dir=tmp_path)
    trainer = L.Trainer(max_steps=2, **options)
    trainer.fit(Classifier(), datamodule=TextClassificationDataModule(source="files", train_file=three, batch_size=4))
    trainer.save_checkpoint(tmp_path / "run.ckpt")

    resumed = TextClassificationDataModule(source="files", train_file=two, batch_size=4)
    L.Trainer(max_steps=3, **options).fit(Classifier(), datamodule=resumed, ckpt_path=tmp_path / "run.ckpt")
    assert resumed.label_names == ["neg", "neutral", "pos"]
    assert set(resumed.datasets["train"].labels) == {0, 2}  # pos keeps id 2 from the checkpoint


# ------------------------------------------------------------------------------------------------ issue 10, items 4-5
def test_validation_label_absent_from_training_names_label_and_split(tmp_path):
    train = write_csv(tmp_path / "train.csv", [{"text": f"t{i}", "label": i % 3} for i in range(6)])
    validation = write_csv(tmp_path / "dev.csv", [{"text": "a", "label": 1}, {"text": "b", "label": 3}])
    data = TextClassificationDataModule(source="files", train_file=train, validation_file=validation, num_labels=3)
    with pytest.raises(ValueError, match=r"Label\(s\) \['3'\] occur in the validation split \('.*dev\.csv'\) but "
                                         r"never in the train split \('.*train\.csv'\)") as error:
        data.setup("fit")
    assert "num_labels=4" not in str(error.value)
    words = write_jsonl(tmp_path / "w.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    test = write_jsonl(tmp_path / "t.jsonl", [{"text": "c", "label": "neutral"}])
    with pytest.raises(ValueError, match=r"\['neutral'\] occur in the test split"):
        TextClassificationDataModule(source="files", train_file=words, validation_file=words, test_file=test).setup()


@pytest.mark.parametrize("suffix, cell", [(".csv", ""), (".csv", "NaN"), (".tsv", "  "), (".jsonl", None),
                                          (".jsonl", float("nan")), (".jsonl", "nan")])
def test_missing_text_is_one_error_in_every_format(tmp_path, suffix, cell):
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": cell, "label": 1}]
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    else:
        write_csv(path, rows, delimiter="\t" if suffix == ".tsv" else ",")
    data = TextClassificationDataModule(source="files", train_file=str(path), validation_file=str(path))
    with pytest.raises(ValueError, match=rf"Row 3 of .*d\{suffix}, column 'text': the text is missing"):
        data.setup("fit")


def test_nan_label_is_missing_not_a_regression_score(tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"text": "a", "label": "0.5"}, {"text": "b", "label": "NaN"}])
    with pytest.raises(ValueError, match=r"Row 2 of .*d\.csv: the label is missing \('NaN'\)"):
        TextClassificationDataModule(source="files", train_file=path, validation_file=path).setup("fit")
