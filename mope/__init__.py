"""mope: a faithful, batch-correct implementation of MoPE (Mixture of Prompt Experts, arXiv 2403.10568) and of the
paper's fusion baselines, as a plain-PyTorch library (no ray/mlflow/hydra/deepspeed imports)."""

from mope.adapter_io import AdapterMismatchError, load_adapter, read_adapter_config, save_adapter
from mope.config import ConfigError, EncoderConfig, FusionConfig, Method, MoPEConfig, Task
from mope.model import FusionModel, FusionOutput, build_model, predictions, task_loss
from mope.prompts import PromptGenerator, RoutingStats, importance_loss

__all__ = [
    "AdapterMismatchError",
    "ConfigError",
    "EncoderConfig",
    "FusionConfig",
    "FusionModel",
    "FusionOutput",
    "Method",
    "MoPEConfig",
    "PromptGenerator",
    "RoutingStats",
    "Task",
    "build_model",
    "importance_loss",
    "load_adapter",
    "predictions",
    "read_adapter_config",
    "save_adapter",
    "task_loss",
]
