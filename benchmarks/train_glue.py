"""Fine-tune a model on a GLUE / SuperGLUE task with SAM, LoRA, full fine-tuning, ... (Accelerate).

Runs as plain ``python`` or on several processes::

    python benchmarks/train_glue.py --task rte --method sam --num-calibration-batches 100
    accelerate launch --multi_gpu --num_processes 2 benchmarks/train_glue.py --task cb --method lora --cpu
    torchrun --nproc_per_node 2 benchmarks/train_glue.py --task cb --method sam --cpu

On CPUs, note that ``accelerate launch --cpu --num_processes 2`` starts only ONE process (accelerate's CPU
launcher needs MPI for more); the torchrun-based launchers above start two, which talk over gloo.

Prints the validation metrics at every evaluation and the final summary (also written to
``<output-dir>/summary.json``); the best adapter is saved to ``<output-dir>/adapter`` (``model`` for
``--method full``). Reload it with ``PeftModel.from_pretrained(base, "<output-dir>/adapter")`` after
``import peft_sam`` (``--method adapter``, AdapterHub's bottleneck:
``glue.adapterhub.load_bottleneck_adapter``). The training loop itself is
:func:`glue.training.train_and_evaluate`.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from glue.training import add_train_args, config_from_args, train_and_evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_args(parser)
    args = parser.parse_args()
    summary = train_and_evaluate(config_from_args(args))
    if summary.get("num_processes", 1) == 1 or int(os.environ.get("RANK", "0")) == 0:
        brief = {k: v for k, v in summary.items() if k not in ("history", "config")}
        print(json.dumps(brief, indent=2))


if __name__ == "__main__":
    main()
