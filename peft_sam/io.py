"""Atomic adapter files: write a temporary file in the same folder, then rename it over the old one.

PEFT's ``save_pretrained`` writes ``adapter_model.safetensors`` in place, so a crash or an exception mid-write leaves a
truncated file where a good adapter was. Inside ``with peft_sam.atomic_adapter_writes():`` it writes through
:func:`atomic_save_file` instead. Importing ``peft_sam`` changes nothing in PEFT; only the ``with`` block does, and the
original writer is back when it ends (it is process-wide while it lasts: do not save from other threads meanwhile).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
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


@contextlib.contextmanager
def atomic_adapter_writes() -> Iterator[None]:
    """Within the block, ``PeftModel.save_pretrained`` writes its safetensors files atomically (nestable)."""
    import peft.peft_model as peft_model

    previous = peft_model.safe_save_file
    peft_model.safe_save_file = atomic_save_file
    try:
        yield
    finally:
        peft_model.safe_save_file = previous
