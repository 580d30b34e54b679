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

# methods table and the shared training loop (benchmarks/train_glue.py, benchmarks)
from .methods import (  # noqa: E402
    METHODS,
    MethodInfo,
    MethodSpec,
    build_peft_model,
    method_unavailable,
    prepare_base_model,
    save_trained,
)
from .training import TrainConfig, load_base_model, train_and_evaluate  # noqa: E402

__all__ += [
    "METHODS",
    "MethodInfo",
    "MethodSpec",
    "TrainConfig",
    "build_peft_model",
    "load_base_model",
    "method_unavailable",
    "prepare_base_model",
    "save_trained",
    "train_and_evaluate",
]
