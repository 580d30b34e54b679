"""CaliSr-S around LoRA on MRPC with the transformers ``Trainer``: the Trainer steps a ``CaliSrOptimizer`` (given
through ``optimizers=``, W_extra with its own learning rate), whose step splits, measures and switches;
``CaliSrCallback`` gives it the schedule and checkpoints its state.

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
    optimizer = peft_sam.CaliSrOptimizer(torch.optim.AdamW(groups), model, log_path=f"{args.output_dir}/calisr.jsonl")
    trainer = make_trainer(
        args, model, data, collator, optimizers=(optimizer, None), callbacks=[peft_sam.CaliSrCallback()]
    )  # fmt: skip
    trainer.train()
    print(trainer.evaluate())
    model.save_pretrained(f"{args.output_dir}/adapter")  # LoRA + W_extra; PeftModel.from_pretrained loads it


if __name__ == "__main__":
    main()
