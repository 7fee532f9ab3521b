"""DataModules: text classification (single sentence, pairs, regression; GLUE task table) and causal LM."""
from lora_lightning.data.causal_lm import CausalLMDataModule
from lora_lightning.data.classification import TextClassificationDataModule
from lora_lightning.data.glue import GLUE_TASKS, GlueTask

__all__ = ["GLUE_TASKS", "CausalLMDataModule", "GlueTask", "TextClassificationDataModule"]
