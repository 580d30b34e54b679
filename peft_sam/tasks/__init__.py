"""GLUE / SuperGLUE tasks of the SAM paper: readers and protocol splits, tokenisation, metrics."""

from .data import TASKS, TaskSpec, get_spec, load_task, resolve_data_dir
from .metrics import compute_metrics
from .preprocess import (
    MultipleChoiceCollator,
    collate_multiple_choice,
    get_collator,
    model_class_for,
    tokenize_task,
)

__all__ = [
    "TASKS",
    "MultipleChoiceCollator",
    "TaskSpec",
    "collate_multiple_choice",
    "compute_metrics",
    "get_collator",
    "get_spec",
    "load_task",
    "model_class_for",
    "resolve_data_dir",
    "tokenize_task",
]

# methods table and the shared training loop (examples/train_glue.py, benchmarks)
from .methods import METHODS, MethodInfo, MethodSpec, build_peft_model, prepare_base_model  # noqa: E402
from .training import TrainConfig, train_and_evaluate  # noqa: E402

__all__ += [
    "METHODS",
    "MethodInfo",
    "MethodSpec",
    "TrainConfig",
    "build_peft_model",
    "prepare_base_model",
    "train_and_evaluate",
]
