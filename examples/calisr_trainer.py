"""CaliSr-S around LoRA on MRPC with the transformers ``Trainer``: ``CaliSrCallback`` drives the switch inside the
Trainer's own optimizer step; W_extra (the full-FT part) gets its own learning rate through ``optimizers=``.

    python examples/calisr_trainer.py                      # MiniLM, 2 epochs on 1000 pairs: a few minutes on a CPU
"""

import argparse

import torch
from mrpc import add_args, dataloaders
from peft import LoraConfig
from sam_trainer import accuracy
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

import peft_sam
from peft_sam import CaliSrConfig, get_peft_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser, output_dir="runs/calisr_trainer", lr=1e-3)
    parser.add_argument("--extra-lr", type=float, default=2e-5, help="learning rate of W_extra (full FT)")
    parser.add_argument("--variant", default="S", choices=["S", "D"], help="S: one group per component; D: one")
    parser.set_defaults(epochs=2)
    args = parser.parse_args()

    model_path, data, collator, _, _ = dataloaders(args)
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    lora = LoraConfig(r=8, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
    model = get_peft_model(base, CaliSrConfig(adapter=lora, variant=args.variant, task_type="SEQ_CLS"))
    groups = peft_sam.calisr_param_groups(model)
    for group in groups:
        group["lr"] = args.extra_lr if group["calisr"] == "extra" else args.lr

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            learning_rate=args.lr,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            eval_strategy="epoch",
            save_strategy="no",
            report_to=[],
        ),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        compute_metrics=accuracy,
        optimizers=(torch.optim.AdamW(groups), None),
        callbacks=[peft_sam.CaliSrCallback(log_path=f"{args.output_dir}/calisr.jsonl")],
    )
    trainer.train()
    print(trainer.evaluate())
    model.save_pretrained(f"{args.output_dir}/adapter")  # LoRA + W_extra; PeftModel.from_pretrained loads it


if __name__ == "__main__":
    main()
