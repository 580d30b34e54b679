"""CaliSr-S around LoRA on MRPC with the transformers ``Trainer``: ``CaliSrCallback`` drives the switch inside the
Trainer's own optimizer step; W_extra (the full-FT part) gets its own learning rate through ``optimizers=``.

    python examples/calisr_trainer.py                      # MiniLM, 2 epochs on 1000 pairs: a few minutes on a CPU
"""

import argparse

import torch
from calisr_accelerate import add_calisr_args, calisr_model
from mrpc import add_args, dataloaders
from sam_trainer import make_trainer

import peft_sam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser, output_dir="runs/calisr_trainer", lr=1e-3)
    add_calisr_args(parser)
    args = parser.parse_args()

    model_path, data, collator, _, _ = dataloaders(args)
    model, groups = calisr_model(args, model_path)
    trainer = make_trainer(
        args, model, data, collator,
        optimizers=(torch.optim.AdamW(groups), None),
        callbacks=[peft_sam.CaliSrCallback(log_path=f"{args.output_dir}/calisr.jsonl")],
    )  # fmt: skip
    trainer.train()
    print(trainer.evaluate())
    model.save_pretrained(f"{args.output_dir}/adapter")  # LoRA + W_extra; PeftModel.from_pretrained loads it


if __name__ == "__main__":
    main()
