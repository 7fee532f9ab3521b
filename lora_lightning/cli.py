"""``lora-lightning fit|validate|test|predict --config ...`` through LightningCLI, and ``lora-lightning export``."""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lora_lightning import modules
from lora_lightning.callbacks.predictions import PredictionWriter
from lora_lightning.callbacks.summary import RunSummary
from lora_lightning.checkpoint import read_checkpoint
from lora_lightning.console import console_callbacks, default_logger, quiet_third_party
from lora_lightning.data.glue import get_glue_task
from lora_lightning.export import export_checkpoint, export_formats
from lora_lightning.modules.base import AdapterModule


# the Trainer's checkpoint IO (a damaged checkpoint is a clear error), as a config entry: it is saved in config.yaml
CHECKPOINT_IO = {"class_path": "lora_lightning.checkpoint.SafeCheckpointIO"}
HPC_CHECKPOINT = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")
LAST_CHECKPOINT = re.compile(r"^last(-v?\d+)?\.ckpt$")


def resume_candidates(trainer: L.Trainer) -> list[str]:
    """Every checkpoint ``--ckpt_path last`` may resume from: the ``last*.ckpt`` of each ``ModelCheckpoint`` (in its
    ``dirpath``, or in any ``*/checkpoints`` folder under the log root when it has none: a logger starts a new
    version folder on every launch) and the Slurm requeue checkpoints ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir``."""
    root = trainer.default_root_dir
    found = [os.path.join(root, name) for name in os.listdir(root) if HPC_CHECKPOINT.match(name)] \
        if os.path.isdir(root) else []
    for callback in trainer.callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath is not None:
            folders = [callback.dirpath]
        else:
            log_root = trainer.loggers[0].save_dir if trainer.loggers and trainer.loggers[0].save_dir else root
            folders = glob.glob(os.path.join(glob.escape(str(log_root)), "**", "checkpoints"), recursive=True)
        for folder in folders:
            if os.path.isdir(folder):
                found += [os.path.join(folder, n) for n in os.listdir(folder) if LAST_CHECKPOINT.match(n)]
    return sorted(set(found))


def resolve_resume_checkpoint(trainer: L.Trainer, ckpt_path: str | None) -> str | None:
    """The file a fit resumes from, checked before any work.

    ``"last"`` means the newest (by modification time) of :func:`resume_candidates`: Lightning's own ``"last"``
    ignores the Slurm requeue checkpoint and, without a ``ModelCheckpoint.dirpath``, looks only in the new
    logger version folder, so a requeued job would silently restart or resume from an older step. No candidate:
    ``None`` (a fresh start: the same command line works for the first launch and every relaunch).
    Any file chosen or given is read with :func:`~lora_lightning.checkpoint.read_checkpoint` (weights only), so a
    truncated or corrupted checkpoint is a :class:`~lora_lightning.checkpoint.CheckpointReadError` naming the file.
    """
    if ckpt_path is None or ckpt_path in ("best", "registry"):
        return ckpt_path
    if ckpt_path in ("last", "hpc"):
        candidates = resume_candidates(trainer)
        if ckpt_path == "hpc":
            candidates = [c for c in candidates if HPC_CHECKPOINT.match(os.path.basename(c))]
        if not candidates:
            rank_zero_info(f"ckpt_path={ckpt_path}: no checkpoint to resume from yet; starting a new fit.")
            return None
        ckpt_path = max(candidates, key=os.path.getmtime)
        rank_zero_info(f"ckpt_path=last: resuming from {ckpt_path}")
    read_checkpoint(ckpt_path)
    return str(ckpt_path)


def clamp_val_check_interval(trainer_config) -> None:
    """A ``val_check_interval`` in batches beyond the run (``max_steps`` × ``accumulate_grad_batches``, e.g. a shipped
    config's 100 with ``--trainer.max_steps 20``) becomes the run's length, with a one-line warning."""
    interval, max_steps = trainer_config.get("val_check_interval"), trainer_config.get("max_steps") or -1
    run_batches = max_steps * (trainer_config.get("accumulate_grad_batches") or 1)
    if isinstance(interval, int) and not isinstance(interval, bool) and 0 < run_batches < interval:
        trainer_config["val_check_interval"] = run_batches
        rank_zero_warn(f"trainer.val_check_interval {interval} is longer than the run (max_steps {max_steps}): "
                       f"validating after batch {run_batches} instead.")


def default_glue_metrics(subcommand_config) -> None:
    """A model without ``metrics`` that trains on ``source: glue/<task>`` reports that task's metrics from the GLUE
    table (CoLA: matthews, STS-B: pearson and spearman, MRPC/QQP: accuracy and f1, the rest: accuracy)."""
    model_args = (subcommand_config.get("model") or {}).get("init_args") or {}
    source = str(((subcommand_config.get("data") or {}).get("init_args") or {}).get("source") or "")
    if source.startswith("glue/") and "metrics" in model_args and model_args.get("metrics") is None:
        model_args["metrics"] = list(get_glue_task(source.split("/", 1)[1]).metric_names)


def check_checkpoint_method(checkpoint: dict, ckpt_path: str, model_config) -> None:
    """Refuse an explicit ``--ckpt_path`` written by another method than the configured model: LightningCLI would
    silently run the checkpoint's class instead (its hyperparameters replace the model config)."""
    configured = (model_config or {}).get("class_path")
    method = checkpoint["lora_lightning"]["method"]
    if configured and configured.rsplit(".", 1)[-1] != method:
        raise ValueError(
            f"--ckpt_path '{ckpt_path}' is a {method} checkpoint but the config's model is {configured}: "
            f"use the config the checkpoint was trained with (or --model.class_path lora_lightning.modules.{method})."
        )


class LoRALightningCLI(LightningCLI):
    """Model and data in subclass mode; the backbone is named once, on the model, and given to the data.

    ``fit`` resumes through :func:`resolve_resume_checkpoint` (``--ckpt_path last`` includes Slurm requeue
    checkpoints; a bad file is a clear error before any work) and loads checkpoints weights-only unless
    ``--weights_only false`` is given.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads an explicit --ckpt_path file right after parsing (its hyperparameters replace the model
        # config); read it ourselves first so that a damaged file is a clear error, not a raw torch.load traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and os.path.isfile(ckpt_path):
            check_checkpoint_method(read_checkpoint(ckpt_path), ckpt_path, self.config[subcommand].get("model"))

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        clamp_val_check_interval(config["trainer"])
        default_glue_metrics(config)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        # the console defaults (lora_lightning/console.py) depend on the trainer config, so they are added here
        # rather than in trainer_defaults: Lightning refuses a progress bar with enable_progress_bar false, etc.
        config = self.config_init[self.subcommand]["trainer"]
        configured = config.get("callbacks") or []
        kwargs.setdefault("callbacks", [*(configured if isinstance(configured, list) else [configured]),
                                        *console_callbacks(config)])
        logger = default_logger(config)
        if logger is not None:
            kwargs.setdefault("logger", logger)
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        kwargs = self.config_init[self.subcommand]
        ckpt_path = resolve_resume_checkpoint(self.trainer, kwargs.get("ckpt_path"))
        if ckpt_path is not None and os.path.isfile(ckpt_path):
            # Lightning's public way to name the checkpoint before fit: unlike fit(ckpt_path=...), it is visible
            # during the setup hooks (Sensitivity-LoRA does not recalibrate a resumed fit)
            self.trainer.ckpt_path, ckpt_path = ckpt_path, None
        kwargs["ckpt_path"] = ckpt_path
        if "weights_only" in kwargs and kwargs["weights_only"] is None:
            kwargs["weights_only"] = True


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lora-lightning export", description="Export a trained adapter checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a .ckpt written by lora-lightning fit")
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--format", default="lora", choices=export_formats(),
                        help="PEFT adapter format, or 'merged' for a full model with the adapter folded in")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--allow-unfinished-ranks", action="store_true",
                        help="export an AdaLoRA/HyperAdaLoRA checkpoint saved before its final rank pattern")
    args = parser.parse_args(argv)
    folder = export_checkpoint(args.checkpoint, args.output, format=args.format, overwrite=args.overwrite,
                               allow_unfinished_ranks=args.allow_unfinished_ranks)
    files = sorted(path for path in folder.iterdir() if path.is_file())
    size = sum(path.stat().st_size for path in files) / 1e6
    print(f"Exported {args.checkpoint} ({args.format}) to {folder}/ ({len(files)} files, {size:.1f} MB): "
          f"{', '.join(path.name for path in files)}")


DEBUG_ENV = "LORA_LIGHTNING_DEBUG"
TOP_LEVEL_HELP = (
    "LoRA, AdaLoRA, HyperAdaLoRA and Sensitivity-LoRA fine-tuning. Subcommands: fit, validate, test, predict "
    "(listed below; 'lora-lightning fit --help') and export: 'lora-lightning export --checkpoint CKPT --output DIR "
    "[--format FORMAT]' writes a PEFT adapter folder or a merged model ('lora-lightning export --help'). "
    f"Errors print one line; {DEBUG_ENV}=1 shows the full traceback."
)


def error_line(error: BaseException) -> str:
    """The cause of a failed command in one line: the innermost chained exception (jsonargparse wraps a class's
    ``__init__`` error in a "Does not validate against any of the Union subtypes" error), and the class it was
    instantiating, which says which config section (``model``/``data``/a callback) holds the option."""
    where = ""
    while error.__cause__ is not None:
        found = re.search(r"class_path='([\w.]+)'", str(error))
        where = f" (in {found.group(1)})" if found else where
        error = error.__cause__
    message = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}{where}: {message}"


def main(args: list[str] | None = None) -> None:
    """The ``lora-lightning`` console script (it must return ``None``: its value becomes the exit status).

    Run as the console script (``args`` None), a failure prints one line, ``lora-lightning: error: <cause>``, and
    exits with status 1; ``LORA_LIGHTNING_DEBUG=1`` shows the full traceback. Called with ``args``, it raises.
    """
    argv = sys.argv[1:] if args is None else args
    quiet_third_party(argv[0] if argv else None)
    try:
        if argv and argv[0] == "export":
            export_main(argv[1:])
        else:
            run_cli(args)
    except Exception as error:  # noqa: BLE001 - the console script's last line of defence
        if args is not None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        sys.stderr.write(f"lora-lightning: error: {error_line(error)}\n"
                         f"(full traceback: {DEBUG_ENV}=1 lora-lightning {' '.join(argv[:1])} ...)\n")
        raise SystemExit(1) from None


def run_cli(args: list[str] | None = None) -> LoRALightningCLI:
    """``lora-lightning fit|validate|...`` from Python; returns the CLI object (``.trainer``, ``.model``)."""
    return LoRALightningCLI(
        AdapterModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [RunSummary(), PredictionWriter()], "plugins": [CHECKPOINT_IO]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": TOP_LEVEL_HELP},
        auto_configure_optimizers=False,
        args=args,
    )


if __name__ == "__main__":
    main()
