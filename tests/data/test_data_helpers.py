"""Label parsing and inference, seeded splits, and file reading: the pieces under the DataModules."""
import json

import pytest

from lora_lightning.data.files import check_file, read_table, require_columns
from lora_lightning.data.labels import LabelSpace, infer_label_space, parse_label
from lora_lightning.data.splits import split_indices, subsample


def test_parse_label_reads_numbers_from_text():
    assert parse_label("1") == 1 and isinstance(parse_label("1"), int)
    assert parse_label(" 2.5 ") == 2.5
    assert parse_label("pos") == "pos"
    assert parse_label(3.0) == 3.0 and isinstance(parse_label(3.0), float)
    for missing in ("", " ", "NaN", None, float("nan")):
        with pytest.raises(ValueError, match="the label is missing"):
            parse_label(missing)


def test_text_labels_are_sorted_to_ids():
    space = infer_label_space(["pos", "neg", "neutral", "pos"])
    assert space == LabelSpace(3, ("neg", "neutral", "pos"))
    assert space.encode(["pos", "neg", "neutral"]) == [2, 0, 1]


def test_integer_and_regression_label_spaces():
    assert infer_label_space([0, 2, 1]) == LabelSpace(3)
    assert infer_label_space([0, 1], num_labels=5).num_labels == 5
    assert infer_label_space([0.5, 4.2]).is_regression
    assert infer_label_space([1, 4], num_labels=1).encode([1, 4]) == [1.0, 4.0]
    assert infer_label_space([0.0, 1.0], num_labels=2).encode([1.0, 0.0]) == [1, 0]


@pytest.mark.parametrize(
    "values, num_labels, message",
    [
        ([0, 3], 2, r"Label 3 does not fit num_labels=2"),
        (["a", "b", "c"], 2, r"3 distinct labels \['a', 'b', 'c'\] but num_labels=2"),
        (["a", "b"], 1, r"num_labels=1 means regression"),
        ([0.5, 1.5], 2, r"real-valued scores .* num_labels=2"),
        ([-1, 1], None, r"Label -1 is negative"),
        ([0, "b"], None, r"mix numbers"),
    ],
)
def test_labels_that_do_not_fit(values, num_labels, message):
    with pytest.raises(ValueError, match=message):
        infer_label_space(values, num_labels)


def test_restored_names_fix_the_mapping():
    space = infer_label_space(["pos", "neg"], names=["neg", "neutral", "pos"])
    assert space.num_labels == 3 and space.encode(["pos"]) == [2]
    with pytest.raises(ValueError, match=r"\['bad'\] are not in the restored label names"):
        infer_label_space(["bad"], names=["neg", "pos"])


def test_split_is_seeded_disjoint_and_complete():
    train, validation = split_indices(100, 0.2, seed=7)
    assert len(validation) == 20 and len(train) == 80
    assert set(train).isdisjoint(validation) and set(train) | set(validation) == set(range(100))
    assert split_indices(100, 0.2, seed=7) == (train, validation)
    assert split_indices(100, 0.2, seed=8) != (train, validation)
    with pytest.raises(ValueError, match="validation_fraction"):
        split_indices(10, 1.0, seed=0)


def test_subsample_is_seeded_and_keeps_order():
    chosen = subsample(list(range(50)), 10, seed=3)
    assert len(chosen) == 10 and chosen == sorted(chosen) and chosen == subsample(list(range(50)), 10, seed=3)
    assert subsample([1, 2], 5, seed=0) == [1, 2]


def test_read_csv_tsv_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",1\n')
    (tmp_path / "a.tsv").write_text('sentence\tlabel\nsays "hi\tpos\n')
    (tmp_path / "a.jsonl").write_text(json.dumps({"x": 1}) + "\n\n" + json.dumps({"x": 2, "y": 3}) + "\n")
    assert read_table(tmp_path / "a.csv") == ([{"text": "hello, world", "label": "1"}], ["text", "label"])
    assert read_table(tmp_path / "a.tsv")[0] == [{"sentence": 'says "hi', "label": "pos"}]
    assert read_table(tmp_path / "a.jsonl") == ([{"x": 1}, {"x": 2, "y": 3}], ["x", "y"])


def test_file_checks_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train file '.*nope\.csv' does not exist"):
        check_file(tmp_path / "nope.csv", "train")
    (tmp_path / "a.parquet").write_text("")
    with pytest.raises(ValueError, match=r"unsupported extension '\.parquet'"):
        check_file(tmp_path / "a.parquet", "train")
    with pytest.raises(KeyError, match=r"\['txt'\] not found .* Columns that exist: \['text', 'label'\]"):
        require_columns(["text", "label"], ["txt"], "f.csv", "text_fields")
