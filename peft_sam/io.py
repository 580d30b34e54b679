"""Atomic adapter files: PEFT writes ``adapter_model.safetensors`` in place; we write a temporary file and rename.

A crash or an exception mid-write then never leaves a truncated adapter behind, and an existing adapter in the same
directory stays intact until the new one is complete.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from safetensors.torch import save_file


def atomic_save_file(tensors: dict, filename: str, metadata: dict[str, Any] | None = None) -> None:
    """``safetensors.torch.save_file`` that writes to a temporary file in the same folder, then renames it."""
    directory = os.path.dirname(os.path.abspath(filename))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, filename)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def install_atomic_adapter_writes() -> None:
    """Route PeftModel.save_pretrained's safetensors writes through :func:`atomic_save_file` (idempotent)."""
    import peft.peft_model as peft_model

    if getattr(peft_model, "safe_save_file", None) is not atomic_save_file:
        peft_model.safe_save_file = atomic_save_file
