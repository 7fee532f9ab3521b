"""The console as a user meets it: one-line errors, a refused method swap, help text, the default callbacks."""
from __future__ import annotations

import shutil
import sys
import warnings

import lightning as L
import pytest
import yaml
from transformers import BertForSequenceClassification

from lora_lightning.cli import main as cli_main
from lora_lightning.modules import AdaLoRAModule


def write_config(folder, backbone: str, data: dict | None = None, method: str = "LoRAModule") -> str:
    rows = "".join(f"{'good' if i % 2 else 'bad'} film {i},{i % 2}\n" for i in range(16))
    (folder / "train.csv").write_text("text,label\n" + rows)
    config = {
        "trainer": {"max_steps": 2, "accelerator": "cpu", "default_root_dir": str(folder / "runs"),
                    "enable_progress_bar": False, "val_check_interval": 2, "limit_val_batches": 1},
        "model": {"class_path": f"lora_lightning.modules.{method}",
                  "init_args": {"backbone": backbone, "num_labels": 2, "target_modules": ["query", "value"]}},
        "data": {"class_path": "lora_lightning.data.TextClassificationDataModule",
                 "init_args": {"source": "files", "train_file": str(folder / "train.csv"), "batch_size": 4,
                               **(data or {})}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def console(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """Run ``lora-lightning ARGV`` as the console script does; (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lora-lightning", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli_main()
    return exit_info.value.code, capsys.readouterr().err


def test_bad_data_option_is_one_line_naming_class_and_cause(tiny_bert, tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, tiny_bert, data={"source": "imdb"})
    monkeypatch.delenv("LORA_LIGHTNING_DEBUG", raising=False)
    code, err = console(monkeypatch, capsys, "validate", "--config", config)
    assert code == 1
    assert "Traceback" not in err
    assert err.splitlines()[-2] == ("lora-lightning: error: ValueError (in lora_lightning.data."
                                    "TextClassificationDataModule): Unknown source 'imdb'. Choose one of "
                                    "('rotten_tomatoes', 'files', 'glue/<task>').")
    assert err.splitlines()[-1] == "(full traceback: LORA_LIGHTNING_DEBUG=1 lora-lightning validate ...)"
    monkeypatch.setenv("LORA_LIGHTNING_DEBUG", "1")
    with pytest.raises(ValueError, match="Does not validate"):  # the full chained error, as raised
        console(monkeypatch, capsys, "validate", "--config", config)


def test_non_utf8_file_names_the_file_and_the_encoding(tiny_bert, tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, tiny_bert)
    (tmp_path / "train.csv").write_bytes("text,label\ncaf\u00e9 cr\u00e8me,1\nbad,0\n".encode("latin-1"))
    monkeypatch.delenv("LORA_LIGHTNING_DEBUG", raising=False)
    code, err = console(monkeypatch, capsys, "validate", "--config", config)
    assert code == 1
    line = err.splitlines()[-2]
    assert line.startswith("lora-lightning: error: ValueError: ") and "train.csv' is not UTF-8 text (byte 0xe9" in line
    assert "Save it as UTF-8" in line


def test_checkpoint_of_another_method_is_refused(tiny_bert, tmp_path):
    module = AdaLoRAModule(backbone=tiny_bert, init_r=4, target_r=2, target_modules=["query", "value"])
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "adalora.ckpt")
    config = write_config(tmp_path, tiny_bert)
    with pytest.raises(ValueError, match=r"'.*adalora\.ckpt' is a AdaLoRAModule checkpoint but the config's model is "
                                         r"lora_lightning\.modules\.LoRAModule"):
        cli_main(["validate", "--config", config, "--ckpt_path", str(tmp_path / "adalora.ckpt")])


def test_alpha_zero_is_a_one_line_error(tiny_bert, tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, tiny_bert)
    monkeypatch.delenv("LORA_LIGHTNING_DEBUG", raising=False)
    code, err = console(monkeypatch, capsys, "fit", "--config", config, "--model.init_args.alpha", "0")
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-2].startswith("lora-lightning: error: ValueError (in lora_lightning.modules.LoRAModule): "
                                           "alpha must be > 0")


def test_fit_console_is_quiet_and_logs_the_learning_rate(tiny_bert, tmp_path, capfd, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    headless = tmp_path / "headless"  # a backbone without the classifier head, as the packaged MiniLM
    shutil.copytree(tiny_bert, headless)
    BertForSequenceClassification.from_pretrained(tiny_bert).bert.save_pretrained(headless)
    config = write_config(tmp_path, str(headless))
    capfd.readouterr()
    cli_main(["fit", "--config", config, "--trainer.enable_progress_bar", "true", "--trainer.log_every_n_steps", "1"])
    out, err = capfd.readouterr()
    console = out + err + caplog.text
    noises = ("LOAD REPORT", "already configured with model summary", "set_vital", "litlogger", "litmodels",
              "LeafSpec", "FLOPs", "v_num", "Epoch 0/-", "Loading weights")
    for noise in noises:
        assert noise not in console, noise
    assert "Parameters: " in console and "trainable of" in console
    (events,) = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    scalars = EventAccumulator(str(events.parent)).Reload().Tags()["scalars"]
    assert "hp_metric" not in scalars
    assert [tag for tag in scalars if tag.startswith("lr-")] == ["lr-AdamW/adapters"]
    assert "Epoch 0: 100%" in out  # a bar that finished (TQDM closes it before the run summary prints)


def test_help_lists_export_and_describes_data_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    assert "lora-lightning export --checkpoint CKPT --output DIR" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        cli_main(["fit", "--data.help", "lora_lightning.data.TextClassificationDataModule"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--data.label_field LABEL_FIELD the label column: class ids, class names or real" in text
    assert "--data.num_labels NUM_LABELS number of classes (1 = regression)" in text


def test_noise_filters_drop_only_their_messages():
    from lora_lightning.console import only_new_output_head, quiet_third_party

    head = "X LOAD REPORT from: m\nKey | Status |\n-+-\nclassifier.weight | MISSING |\nclassifier.bias | MISSING |\n"
    assert only_new_output_head(head)
    assert not only_new_output_head(head + "bert.encoder.layer.0.output.dense.weight | MISSING |\n")
    assert not only_new_output_head(head.replace("classifier.bias | MISSING", "classifier.bias | MISMATCH"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party("validate")
        warnings.warn("The dirpath has changed from 'a' to 'b', therefore ...")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...")
        warnings.warn("an actionable warning")
    assert [str(w.message) for w in caught] == ["an actionable warning"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party("fit")
        warnings.warn("The dirpath has changed from 'a' to 'b', therefore ...")
    assert len(caught) == 1  # kept during fit: a resumed fit's best-model tracking restarts


def test_a_glue_source_gives_the_model_its_metrics_unless_the_config_names_them():
    from jsonargparse import Namespace

    from lora_lightning.cli import default_glue_metrics

    def config(source: str, metrics):
        return Namespace(model=Namespace(init_args=Namespace(metrics=metrics)),
                         data=Namespace(init_args=Namespace(source=source)))

    cola, stsb, mine, files = config("glue/cola", None), config("glue/stsb", None), config("glue/cola", ["f1"]), \
        config("files", None)
    for each in (cola, stsb, mine, files):
        default_glue_metrics(each)
    assert cola.model.init_args.metrics == ["matthews"]
    assert stsb.model.init_args.metrics == ["pearson", "spearman"]
    assert mine.model.init_args.metrics == ["f1"]
    assert files.model.init_args.metrics is None
