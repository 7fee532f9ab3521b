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
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lora_lightning import modules
from lora_lightning.callbacks.summary import RunSummary
from lora_lightning.checkpoint import read_checkpoint
from lora_lightning.export import PEFT_FORMATS, export_merged, export_peft
from lora_lightning.modules.base import AdapterModule


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


class LoRALightningCLI(LightningCLI):
    """Model and data in subclass mode; the backbone is named once, on the model, and given to the data.

    ``fit`` resumes through :func:`resolve_resume_checkpoint` (``--ckpt_path last`` includes Slurm requeue
    checkpoints; a bad file is a clear error before any work) and loads checkpoints weights-only unless
    ``--weights_only false`` is given.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads an explicit --ckpt_path file in __init__ (its hyperparameters replace the model config);
        # read it ourselves first so that a damaged file is a clear error rather than a raw torch.load traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and os.path.isfile(ckpt_path):
            read_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        kwargs = self.config_init[self.subcommand]
        kwargs["ckpt_path"] = resolve_resume_checkpoint(self.trainer, kwargs.get("ckpt_path"))
        if "weights_only" in kwargs and kwargs["weights_only"] is None:
            kwargs["weights_only"] = True


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lora-lightning export", description="Export a trained adapter checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a .ckpt written by lora-lightning fit")
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--format", default="lora", choices=[*sorted(PEFT_FORMATS), "merged"],
                        help="PEFT adapter format, or 'merged' for a full model with the adapter folded in")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    method = read_checkpoint(args.checkpoint)["lora_lightning"]["method"]
    module_class = getattr(modules, method, None)
    if module_class is None:
        raise SystemExit(f"The checkpoint was written by '{method}', which this version of lora-lightning lacks.")
    module = module_class.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=True)
    if args.format == "merged":
        folder = export_merged(module, args.output, overwrite=args.overwrite)
    else:
        folder = export_peft(module, args.output, format=args.format, overwrite=args.overwrite)
    print(f"Exported {method} ({args.format}) to {folder}")


def main(args: list[str] | None = None) -> None:
    """The ``lora-lightning`` console script (it must return ``None``: its value becomes the exit status)."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    run_cli(args)


def run_cli(args: list[str] | None = None) -> LoRALightningCLI:
    """``lora-lightning fit|validate|...`` from Python; returns the CLI object (``.trainer``, ``.model``)."""
    return LoRALightningCLI(
        AdapterModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [RunSummary()]},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )


if __name__ == "__main__":
    main()
