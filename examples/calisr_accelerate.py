"""CaliSr-S around LoRA on MRPC with a plain Accelerate loop: full fine-tuning first, then each component group
(attention, FFN1, FFN2) switches to LoRA once its stable-rank score says so. ``CaliSrOptimizer`` wraps the AdamW
before ``accelerator.prepare``: its ``step()`` splits, measures and switches; W_extra (the full-FT part) has its own
learning rate.

    python examples/calisr_accelerate.py                   # MiniLM, 2 epochs on 1000 pairs: a few minutes on a CPU
"""

import argparse
import math

import torch
from accelerate import Accelerator
from mrpc import add_args, dataloaders
from peft import LoraConfig
from sam_accelerate import save_and_reload, train
from transformers import AutoModelForSequenceClassification

import peft_sam
from peft_sam import CaliSrConfig, get_peft_model


def add_calisr_args(parser) -> None:
    parser.add_argument("--extra-lr", type=float, default=2e-5, help="learning rate of W_extra (full FT)")
    parser.add_argument("--variant", default="S", choices=["S", "D"], help="S: one group per component; D: one")
    parser.set_defaults(epochs=2)


def calisr_model(args, model_path: str):
    """CaliSr around LoRA (r 8 on every attention and FFN matrix), and its optimizer groups with their own lrs."""
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    lora = LoraConfig(r=8, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
    model = get_peft_model(base, CaliSrConfig(adapter=lora, variant=args.variant, task_type="SEQ_CLS"))
    groups = peft_sam.calisr_param_groups(model)  # core (LoRA, head) and extra (W_extra) parameter groups
    for group in groups:
        group["lr"] = args.extra_lr if group["calisr"] == "extra" else args.lr
    return model, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser, output_dir="runs/calisr_accelerate", lr=1e-3)
    add_calisr_args(parser)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=args.cpu)
    model_path, data, collator, train_dl, eval_dl = dataloaders(args)
    model, groups = calisr_model(args, model_path)
    steps_per_epoch = math.ceil(len(train_dl) / accelerator.num_processes)  # optimizer steps of each process
    optimizer = peft_sam.CaliSrOptimizer(
        torch.optim.AdamW(groups), model, steps_per_epoch=steps_per_epoch, total_steps=args.epochs * steps_per_epoch,
        log_path=f"{args.output_dir}/calisr.jsonl" if accelerator.is_main_process else None,
    )  # fmt: skip
    model = train(accelerator, model, optimizer, train_dl, eval_dl, args.epochs)
    save_and_reload(accelerator, model, args.output_dir, model_path, eval_dl)  # LoRA + W_extra, reloads exactly


if __name__ == "__main__":
    main()
