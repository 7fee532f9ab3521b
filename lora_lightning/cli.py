"""``lora-lightning fit|validate|test|predict --config ...`` through LightningCLI, and ``lora-lightning export``."""
from __future__ import annotations

import argparse
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lora_lightning import modules
from lora_lightning.callbacks.summary import RunSummary
from lora_lightning.checkpoint import read_checkpoint
from lora_lightning.export import PEFT_FORMATS, export_merged, export_peft
from lora_lightning.modules.base import AdapterModule


class LoRALightningCLI(LightningCLI):
    """Model and data in subclass mode; the backbone is named once, on the model, and given to the data."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")


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
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    LoRALightningCLI(
        AdapterModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [RunSummary()]},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=argv,
    )


if __name__ == "__main__":
    main()
