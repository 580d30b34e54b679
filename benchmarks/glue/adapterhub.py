"""The bottleneck Adapter baseline of the SAM paper's table, from AdapterHub ``adapters`` (not a PEFT tuner).

``SeqBnConfig(reduction_factor=16)`` puts one bottleneck (384 -> 24 -> 384 on MiniLM) after every FFN output:
113k parameters, 0.5 % of MiniLM. ``adapters`` 1.3.0 pins ``transformers~=4.57.6``, so this baseline runs in
an environment with transformers 4.57 (``pip install adapters==1.3.0 "transformers~=4.57.6"``); peft-sam
itself works on 4.57 and 5.x. The task head (``classifier``) trains in full, as for every other method.

The trained adapter is saved with ``model.save_adapter`` (safetensors; AdapterHub writes the transformers task
head beside it); :func:`load_bottleneck_adapter` puts both back on a freshly loaded base model.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

__all__ = [
    "ADAPTER_NAME",
    "add_bottleneck_adapter",
    "adapterhub_missing",
    "load_bottleneck_adapter",
    "save_bottleneck_adapter",
]

ADAPTER_NAME = "bottleneck"
REQUIRED = "adapters==1.3.0"


def adapterhub_missing() -> str | None:
    """None when AdapterHub ``adapters`` can be imported; otherwise why not and how to fix it."""
    try:
        import adapters  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or adapters failing against another transformers
        import transformers

        return (
            f"method 'adapter' needs AdapterHub ({REQUIRED}), which could not be imported here "
            f"(transformers {transformers.__version__}: {type(exc).__name__}: {exc}). It pins "
            "transformers~=4.57.6: run it from an environment made with "
            f"`pip install {REQUIRED} \"transformers~=4.57.6\"` (see the README)."
        )
    return None


def _require_adapters():
    """The ``adapters`` module, or an ImportError that says how to get it."""
    missing = adapterhub_missing()
    if missing:
        raise ImportError(missing)
    import adapters

    return adapters


def add_bottleneck_adapter(model: nn.Module, heads: list[str], reduction_factor: int = 16) -> nn.Module:
    """Add a trainable ``SeqBnConfig`` bottleneck adapter to ``model`` in place; the base stays frozen.

    ``heads`` (e.g. ``["classifier"]``) stay fully trainable. Raises ``ImportError`` with the fix when
    ``adapters`` is missing or cannot run on the installed transformers.
    """
    adapters = _require_adapters()
    if reduction_factor <= 0:
        raise ValueError(f"reduction_factor must be a positive integer, got {reduction_factor}.")
    adapters.init(model)
    model.add_adapter(ADAPTER_NAME, config=adapters.SeqBnConfig(reduction_factor=reduction_factor))
    model.train_adapter(ADAPTER_NAME)  # freezes the backbone, activates and unfreezes the adapter
    for name, prm in model.named_parameters():
        prm.requires_grad_(name.split(".")[0] in heads or f"adapters.{ADAPTER_NAME}." in name)
    return model


def save_bottleneck_adapter(model: nn.Module, directory: str | Path) -> None:
    """Write the adapter and the task head (AdapterHub format, safetensors) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_adapter(str(directory), ADAPTER_NAME, with_head=True, use_safetensors=True)


def load_bottleneck_adapter(base_model: nn.Module, directory: str | Path) -> nn.Module:
    """Put a saved bottleneck adapter and its task head on a freshly loaded ``base_model`` (in place, active)."""
    adapters = _require_adapters()
    directory = Path(directory)
    if not (directory / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{directory} has no adapter_config.json: not a folder written by save_bottleneck_adapter."
        )
    adapters.init(base_model)
    name = base_model.load_adapter(str(directory), with_head=True, use_safetensors=True, set_active=True)
    base_model.set_active_adapters(name)
    return base_model
