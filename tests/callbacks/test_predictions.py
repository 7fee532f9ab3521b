import csv
import json
import math

import pytest
import torch

from lora_lightning.callbacks import PredictionWriter
from lora_lightning.cli import run_cli
from lora_lightning.data.causal_lm import CausalLMDataModule
from lora_lightning.data.classification import TextClassificationDataModule
from lora_lightning.modules import LoRAModule
from tests.helpers import quiet_trainer
from tests.modules.test_lora_module import perturb_adapters

TRAIN = [("a warm, funny film", "pos"), ("flat and tedious", "neg"), ("sharp writing, great cast", "pos"),
         ("I left early", "neg"), ("a delight", "pos"), ("nothing works here", "neg")]
TEST = ["Großartig, with a twist", "boring, boring, boring", "\"quoted\", and commas", "fine"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def read_predictions(path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def sentiment_files(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [{"text": t, "label": y} for t, y in TRAIN])
    test = write_rows(tmp_path / "test.jsonl", [{"text": t} for t in TEST])
    return train, test


@pytest.mark.parametrize("format", ["csv", "jsonl"])
def test_classification_predictions_hold_text_label_name_and_probabilities(tiny_bert, sentiment_files, tmp_path,
                                                                           format):
    train, test = sentiment_files
    data = TextClassificationDataModule(backbone=tiny_bert, source="files", train_file=train, validation_file=train,
                                        test_file=test, eval_batch_size=3)
    module = LoRAModule(backbone=tiny_bert, rank=2).eval()
    perturb_adapters(module)
    writer = PredictionWriter(output_dir=str(tmp_path / "run"), format=format)
    quiet_trainer(callbacks=[writer]).predict(module, datamodule=data, return_predictions=False)
    assert writer.path == tmp_path / "run" / f"predictions.{format}"
    rows = read_predictions(writer.path)
    batch = data.collate_fn()([data.datasets["test"][i] for i in range(len(TEST))])
    with torch.no_grad():
        probabilities = module({k: v for k, v in batch.items() if k != "labels"}).logits.softmax(-1)
    assert [row["text"] for row in rows] == TEST and [int(row["index"]) for row in rows] == [0, 1, 2, 3]
    assert [row["label"] for row in rows] == [["neg", "pos"][i] for i in probabilities.argmax(-1).tolist()]
    assert [float(row["score"]) for row in rows] == pytest.approx(probabilities.max(-1).values.tolist(), abs=1e-6)
    if format == "jsonl":
        assert [row["probabilities"]["pos"] for row in rows] == pytest.approx(probabilities[:, 1].tolist(), abs=1e-6)
    else:
        assert list(rows[0]) == ["index", "text", "label", "score", "prob_neg", "prob_pos"]
        assert [float(row["prob_pos"]) for row in rows] == pytest.approx(probabilities[:, 1].tolist(), abs=1e-6)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [f"predictions.{format}"]  # no staging file left


def test_causal_lm_predictions_score_each_response(tiny_llama, tmp_path):
    pairs = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(5)]
    data = CausalLMDataModule(backbone=tiny_llama, source="files", format="instruction", block_size=32,
                              train_file=write_rows(tmp_path / "train.jsonl", pairs),
                              validation_file=write_rows(tmp_path / "val.jsonl", pairs), eval_batch_size=2)
    module = LoRAModule(backbone=tiny_llama, task="causal-lm", target_modules=["q_proj", "v_proj"], rank=2).eval()
    perturb_adapters(module)
    writer = PredictionWriter(output_dir=str(tmp_path), format="jsonl")
    quiet_trainer(callbacks=[writer]).predict(module, datamodule=data, return_predictions=False)
    rows = read_predictions(writer.path)
    assert len(rows) == 5
    for index, row in enumerate(rows):
        example = data.collate_fn()([data.datasets["validation"][index]])
        with torch.no_grad():
            expected = module(example).loss.item()  # transformers' mean loss over the response tokens (+ eos)
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
        assert row["tokens"] == int((example["labels"][0, 1:] != -100).sum())
        assert pairs[index]["prompt"] in row["text"] and pairs[index]["response"] in row["text"]


def test_failed_predict_leaves_no_file(tiny_bert, sentiment_files, tmp_path, monkeypatch):
    train, test = sentiment_files
    data = TextClassificationDataModule(backbone=tiny_bert, source="files", train_file=train, test_file=test,
                                        eval_batch_size=2)
    module = LoRAModule(backbone=tiny_bert, rank=2)
    calls = []

    def second_batch_fails(batch, batch_idx):
        calls.append(batch_idx)
        if batch_idx == 1:
            raise RuntimeError("out of memory")
        return LoRAModule.predict_step(module, batch, batch_idx)

    monkeypatch.setattr(module, "predict_step", second_batch_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        quiet_trainer(callbacks=[PredictionWriter(output_dir=str(tmp_path / "run"))]).predict(module, datamodule=data)
    assert calls == [0, 1] and list((tmp_path / "run").iterdir()) == []


def test_cli_predict_writes_predictions_into_the_run_folder(tiny_bert, sentiment_files, tmp_path, capsys):
    train, test = sentiment_files
    run_cli(["predict", "--model", "LoRAModule", "--model.backbone", tiny_bert, "--model.rank", "2",
             "--data", "TextClassificationDataModule", "--data.source", "files", "--data.train_file", train,
             "--data.test_file", test, "--trainer.default_root_dir", str(tmp_path / "runs"),
             "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"])
    printed = capsys.readouterr().out
    files = list((tmp_path / "runs").rglob("predictions.csv"))
    assert len(files) == 1 and f"written to {files[0]}" in printed
    assert [row["text"] for row in read_predictions(files[0])] == TEST
