"""The base LightningModule every method shares: backbone, task, injection, metrics, optimiser, checkpoints.

A method subclasses :class:`AdapterModule` and implements :meth:`make_adapter`; it may add loss terms
(:meth:`extra_losses`), optimiser parameter groups (:meth:`param_groups`) and the callbacks its rank
machinery needs (:meth:`method_callbacks`; ``configure_callbacks`` installs them). Research code may also replace the task (loss and metrics) by
overriding :meth:`AdapterModule.build_task` (docs/extending.md).
"""
from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from transformers import get_linear_schedule_with_warmup

from lora_lightning.adapters.base import (
    AdapterLayer,
    adapter_layers,
    adapter_state_keys,
    find_classifier_head,
    inject_adapters,
    set_trainable,
)
from lora_lightning.backbone import (
    BackboneOptions, enable_gradient_checkpointing, keep_in_float32, load_backbone, load_config,
)
from lora_lightning.checkpoint import read_checkpoint
from lora_lightning.chunked_loss import check_loss_chunking, chunked_loss
from lora_lightning.callbacks.final_checkpoint import FinalCheckpoint
from lora_lightning.callbacks.nonfinite import NonFiniteGuard
from lora_lightning.modules.tasks import Task
from lora_lightning.modules.tasks import build_task as make_task
from lora_lightning.sharding import (
    ShardingError, broadcast_from_rank0, check_sharded, clip_sharded_gradients_, has_meta_tensors, is_sharded,
    keep_only_in_state_dict, launch_rank, shard_backbone,
)

CHECKPOINT_KEY = "lora_lightning"
FINGERPRINT_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")


class CheckpointMismatchError(ValueError):
    """A checkpoint that belongs to another method, backbone or adapter layout."""


def not_configured(trainer: L.Trainer | None, callbacks: list[L.Callback]) -> list[L.Callback]:
    """Those of ``callbacks`` whose type the trainer lacks: a callback the user configured (YAML, ``Trainer``) wins."""
    present = list(trainer.callbacks) if trainer is not None else []
    return [cb for cb in callbacks if not any(isinstance(have, type(cb)) for have in present)]


class AdapterModule(L.LightningModule):
    """A ``transformers`` backbone with adapter layers injected into ``target_modules``.

    Args:
        backbone (str): hub id, local folder, or packaged alias (``minilm``, ``smollm2``).
        task (str): ``sequence-classification`` (``num_labels=1`` is regression) or ``causal-lm``.
        num_labels (int): classes of a classification head (1: regression); must match the data's.
        target_modules (str | list[str]): linear-layer name suffixes, a regex on the full name, or ``"all-linear"``.
        modules_to_save (list[str] | None): modules trained in full and saved with the adapter; ``None`` finds the
            classification head automatically.
        metrics (list[str] | None): names of validation metrics (default: the task's); the first is the one to
            monitor.
        label_names (list[str] | None): class names, written into exports and predictions (default: the data's).
        learning_rate (float): peak learning rate of the default AdamW and schedule.
        weight_decay (float): AdamW weight decay of the adapter parameters.
        warmup_ratio (float): fraction of the steps of the default schedule's linear warm-up.
        optimizer (OptimizerCallable | None): a callable taking parameter groups (set from YAML); default
            AdamW(``learning_rate``, ``weight_decay``).
        lr_scheduler (LRSchedulerCallable | None): a callable taking the optimiser; default transformers'
            ``get_linear_schedule_with_warmup`` (0 → ``learning_rate`` over ``warmup_ratio`` of the steps, then to 0).
        trust_remote_code (bool): let ``transformers`` run modelling code shipped with the backbone.
        backbone_dtype (str): dtype of the frozen base (``float32``, ``bfloat16``, ``float16`` on CUDA, ``auto``);
            adapters, hypernetworks and ``modules_to_save`` stay fp32 (docs/large_models.md).
        gradient_checkpointing (bool): non-reentrant activation checkpointing of the backbone's transformer blocks.
        quantization (str): ``none``, ``nf4`` or ``int8``: the frozen linear layers stored quantised (bitsandbytes).
        attn_implementation (str | None): ``sdpa``, ``eager`` or ``flash_attention_2`` (``None``: transformers'
            default).
        loss_chunk_tokens (int): causal LM: compute the output layer and the loss on this many tokens at a time, so
            the (tokens × vocabulary) logits never exist whole (:mod:`lora_lightning.chunked_loss`); 0: plain loss.
        base_from_rank0 (bool): under ``ModelParallelStrategy`` only the process of global rank 0 reads the base
            weights; the others build the backbone empty on the meta device and receive their shards (and every
            other tensor) from rank 0 once it is sharded. Saves host memory when loading converts the checkpoint
            (another dtype, GGUF); a checkpoint memory-mapped in ``backbone_dtype`` is shared already. Not with
            ``quantization`` nor Sensitivity-LoRA (docs/large_models.md).
    """

    def __init__(
        self,
        backbone: str = "minilm",
        task: str = "sequence-classification",
        num_labels: int = 2,
        target_modules: str | list[str] = "all-linear",
        modules_to_save: list[str] | None = None,
        metrics: list[str] | None = None,
        label_names: list[str] | None = None,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        trust_remote_code: bool = False,
        backbone_dtype: str = "float32",
        gradient_checkpointing: bool = False,
        quantization: str = "none",
        attn_implementation: str | None = None,
        loss_chunk_tokens: int = 0,
        base_from_rank0: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.task: Task = self.build_task()
        if base_from_rank0 and quantization != "none":
            raise ValueError(
                f"base_from_rank0 builds the base empty on every process but rank 0 and sends it the values later, "
                f"which a quantised base (quantization: {quantization}) cannot take; set base_from_rank0: false."
            )
        options = BackboneOptions(backbone_dtype, attn_implementation, quantization)  # checked before loading
        if loss_chunk_tokens:
            check_loss_chunking(loss_chunk_tokens, task, load_config(backbone, trust_remote_code))
        # from_pretrained returns eval mode; Lightning keeps each submodule's mode, so dropout must be enabled here.
        self.backbone = load_backbone(
            backbone, task, num_labels, trust_remote_code=trust_remote_code, options=options,
            full_precision=list(modules_to_save or ()), empty=base_from_rank0 and launch_rank() != 0,
        ).train()
        self.modules_to_save = (
            list(modules_to_save) if modules_to_save is not None
            else find_classifier_head(self.backbone) if task == "sequence-classification" else []
        )
        keep_in_float32(self.backbone, self.modules_to_save)  # trained heads stay fp32 over a bf16/4-bit base
        inject_adapters(self.backbone, target_modules, self.make_adapter)
        set_trainable(self.backbone, self.modules_to_save)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.backbone)
        self.val_metrics = self.task.build_metrics(metrics)
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        self.label_names = label_names
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    # ----------------------------------------------------------------- what a method defines
    def build_task(self) -> Task:
        """The :class:`~lora_lightning.modules.tasks.Task` (loss and validation metrics) of this module.

        Called once in ``__init__``, after ``save_hyperparameters`` (``self.hparams`` holds every argument) and
        before the backbone is loaded. Override it to train with your own loss or metrics; keep ``hparams.task``
        one of the built-in task names, since it also chooses the ``transformers`` head that is loaded.
        """
        return make_task(self.hparams.task, self.hparams.num_labels)

    def make_adapter(self, name: str, layer: nn.Module) -> AdapterLayer:
        """The adapter that replaces the linear layer ``name``."""
        raise NotImplementedError

    def extra_losses(self) -> dict[str, Tensor]:
        """Weighted terms added to the training loss only (never to validation), logged as ``train/<name>``."""
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups; methods add groups (with a ``name``) rather than toggling requires_grad."""
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        return [{"name": "adapters", "params": params, "weight_decay": self.hparams.weight_decay}]

    def method_callbacks(self) -> list[L.Callback]:
        """The callbacks this method's machinery needs (e.g. AdaLoRA's RankPruningScheduler), built with no
        arguments: they read the module's ``settings``. A subclass extends the list of its parent."""
        return []

    def configure_callbacks(self) -> list[L.Callback]:
        """What every method needs, then :meth:`method_callbacks`, each unless the trainer already has one of the type
        (a callback configured in YAML or ``Trainer(callbacks=...)`` wins): :class:`NonFiniteGuard` (a NaN/inf loss
        or weight stops the fit) and :class:`FinalCheckpoint` (validation and ``last`` at the final step, monitors
        checked first)."""
        return not_configured(self._trainer, [NonFiniteGuard(), FinalCheckpoint(), *self.method_callbacks()])

    def monitorable_metrics(self) -> list[str]:
        """The names this module logs that a ``ModelCheckpoint``/``EarlyStopping`` may monitor; a subclass that logs
        more extends the list (FinalCheckpoint refuses any other monitor before training)."""
        return ["val/loss", *self.val_metrics.keys(), "train/loss"]

    # ----------------------------------------------------------------- structure
    @property
    def adapters(self) -> dict[str, AdapterLayer]:
        return adapter_layers(self.backbone)

    def adapter_state_keys(self) -> list[str]:
        return [f"backbone.{key}" for key in adapter_state_keys(self.backbone, self.modules_to_save)]

    def backbone_fingerprint(self) -> dict[str, Any]:
        config = self.backbone.config
        return {field: getattr(config, field, None) for field in FINGERPRINT_FIELDS}

    # ----------------------------------------------------------------- steps
    def forward(self, batch: dict[str, Tensor]):
        chunk_tokens = self.hparams.loss_chunk_tokens
        if not chunk_tokens or "labels" not in batch:
            return self.backbone(**batch)
        with chunked_loss(self.backbone, chunk_tokens):
            outputs = self.backbone(**batch)
        outputs["logits"] = None  # the final hidden states, not logits: the loss never had them whole
        return outputs

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        task_loss = self.task.loss(self(batch), batch)
        extra = self.extra_losses()
        loss = task_loss + sum(extra.values()) if extra else task_loss
        batch_size = batch["labels"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if extra:
            self.log("train/task_loss", task_loss, batch_size=batch_size)
            for name, value in extra.items():
                self.log(f"train/{name}", value, batch_size=batch_size)
        return loss

    def _evaluate(self, batch: dict[str, Tensor], metrics, stage: str) -> None:
        outputs = self(batch)
        self.task.update_metrics(metrics, outputs, batch)
        batch_size = batch["labels"].shape[0]
        self.log(f"{stage}/loss", self.task.loss(outputs, batch), batch_size=batch_size, sync_dist=True)
        self.log_dict(metrics, batch_size=batch_size, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per example: ``label_id`` and ``probabilities`` (classification), ``score`` (regression), or ``loss``
        (mean next-token loss over the example's target tokens, those whose label is not -100) and ``tokens``
        (their number) for causal LM. :class:`~lora_lightning.callbacks.PredictionWriter` writes them to a file."""
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits = self(inputs).logits.float()
        if self.hparams.task == "causal-lm":
            labels, mask = batch.get("labels"), inputs.get("attention_mask")
            if labels is None:  # score every non-padding token
                labels = inputs["input_ids"] if mask is None else inputs["input_ids"].masked_fill(mask == 0, -100)
            targets = labels[:, 1:]
            token_loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            tokens = (targets != -100).sum(-1)
            return {"loss": token_loss.sum(-1) / tokens.clamp(min=1), "tokens": tokens}
        if self.hparams.num_labels == 1:
            return {"score": logits.squeeze(-1)}
        probabilities = logits.softmax(-1)
        return {"label_id": probabilities.argmax(-1), "probabilities": probabilities}

    # ----------------------------------------------------------------- data link
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_labels = getattr(datamodule, "num_labels", None)
        if self.hparams.task == "sequence-classification" and data_labels is not None:
            if data_labels != self.hparams.num_labels:
                raise ValueError(
                    f"The data has {data_labels} labels but the model was built with num_labels="
                    f"{self.hparams.num_labels}; set model num_labels: {data_labels} in the config."
                )
            self.label_names = getattr(datamodule, "label_names", None) or self.label_names
        if self.label_names:
            self.backbone.config.id2label = dict(enumerate(self.label_names))
            self.backbone.config.label2id = {name: i for i, name in enumerate(self.label_names)}

    # ----------------------------------------------------------------- sharding (ModelParallelStrategy)
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (a device mesh is set), shard the backbone with FSDP2: one unit per
        transformer block, the rest as the root (:mod:`lora_lightning.sharding`). The state dict then holds only the
        adapter state, so checkpoints gather adapters and heads, never the frozen base; loading is not strict about
        the base. Other strategies: nothing to do. Idempotent (Lightning calls it for every stage)."""
        from_rank0 = self.hparams.get("base_from_rank0", False)
        if from_rank0 and self.device_mesh is None:
            raise ShardingError(
                f"base_from_rank0 needs Lightning's ModelParallelStrategy (the backbone is sharded, then filled from "
                f"rank 0), not {type(self.trainer.strategy).__name__}; set trainer.strategy to "
                "lightning.pytorch.strategies.ModelParallelStrategy, or base_from_rank0: false."
            )
        if self.device_mesh is None or is_sharded(self.backbone):
            return
        if from_rank0 and self.global_rank == 0 and has_meta_tensors(self.backbone):
            raise ShardingError(
                "base_from_rank0: global rank 0 built its backbone empty, so no process has the weights. The launcher "
                "did not announce the ranks before the module was built: launch with torchrun, srun or Lightning's "
                "own launcher, or set base_from_rank0: false."
            )
        rank0_state = self.state_dict() if from_rank0 and self.global_rank == 0 else {}
        shard_backbone(self.backbone, self.device_mesh, replicated=self.replicated_parameters())
        if from_rank0:
            broadcast_from_rank0(self, rank0_state, self.trainer.strategy.root_device)
        keep_only_in_state_dict(self, self.adapter_state_keys)
        self.strict_loading = False

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters that sharding must leave whole on every process: none here. A method that reads
        adapter parameters outside the transformer blocks (HyperAdaLoRA's hypernetwork) returns them, in an order
        that is the same on every process, and averages their gradients over the processes itself."""
        return []

    # ----------------------------------------------------------------- optimisation
    def configure_gradient_clipping(self, optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except under ``ModelParallelStrategy``: there trained parameters are FSDP2 shards
        and, for the hypernetwork methods, plain replicated tensors, which torch's clipping cannot mix; the whole
        gradient's norm is computed across both (:func:`~lora_lightning.sharding.clip_sharded_gradients_`)."""
        if self.device_mesh is None or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clip_sharded_gradients_(params, gradient_clip_val, gradient_clip_algorithm or "norm")

    def configure_optimizers(self):
        check_sharded(self, self.backbone)
        groups = self.param_groups()
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            total = int(self.trainer.estimated_stepping_batches)
            scheduler = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- checkpoints: adapter, not backbone
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = set(self.adapter_state_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint[CHECKPOINT_KEY] = {
            "method": type(self).__name__,
            "backbone": self.hparams.backbone,
            "fingerprint": self.backbone_fingerprint(),
            "label_names": self.label_names,
        }

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any):
        """Lightning's ``load_from_checkpoint``, after reading a local file with
        :func:`~lora_lightning.checkpoint.read_checkpoint` (weights only) so that a truncated, corrupted or foreign
        file is a :class:`~lora_lightning.checkpoint.CheckpointReadError` naming it, not an unpickling traceback."""
        if isinstance(checkpoint_path, (str, os.PathLike)) and "://" not in os.fspath(checkpoint_path):
            read_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise CheckpointMismatchError(
                "This checkpoint was not written by lora-lightning (no 'lora_lightning' section); "
                "load it with the tool that wrote it."
            )
        if meta["method"] != type(self).__name__:
            raise CheckpointMismatchError(
                f"The checkpoint holds a {meta['method']} but is being loaded into a {type(self).__name__}; "
                f"use {meta['method']}.load_from_checkpoint or the matching config."
            )
        if meta["fingerprint"] != self.backbone_fingerprint():
            raise CheckpointMismatchError(
                f"The checkpoint was trained on backbone '{meta['backbone']}' ({meta['fingerprint']}), which differs "
                f"from '{self.hparams.backbone}' ({self.backbone_fingerprint()}); load it with backbone: {meta['backbone']}."
            )
        self.label_names = meta.get("label_names") or self.label_names

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False):
        """Load an adapter-only state dict: every adapter key must be present, the backbone keys may not be."""
        expected = set(self.adapter_state_keys())
        missing = sorted(expected - set(state_dict))
        full_keys = set(self.state_dict())
        unexpected = sorted(set(state_dict) - full_keys)
        if strict and (missing or unexpected):
            raise CheckpointMismatchError(
                f"Adapter weights do not fit this model: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}. Was it saved with other "
                f"target_modules or another method?"
            )
        own = self.state_dict()
        wrong_shape = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
        if wrong_shape:
            k = wrong_shape[0]
            raise CheckpointMismatchError(
                f"Adapter tensor '{k}' has shape {tuple(state_dict[k].shape)} in the checkpoint but "
                f"{tuple(own[k].shape)} in this model ({len(wrong_shape)} tensors differ): ranks or targets changed."
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)
