"""SAM (p = 0.005) on MRPC with the transformers ``Trainer``. Calibration runs once, before ``Trainer(...)`` builds the
optimizer, so SAM needs no callback.

    python examples/sam_trainer.py                         # MiniLM, 1 epoch on all 3668 pairs: ~3 minutes on a CPU
"""

import argparse

import numpy as np
from mrpc import add_args, dataloaders
from sam_accelerate import add_sam_args
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

import peft_sam
from peft_sam import SAMConfig, get_peft_model


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def make_trainer(args, model, data, collator, **kwargs) -> Trainer:
    """A ``Trainer`` evaluating accuracy every epoch, saving no checkpoints; ``kwargs`` go to ``Trainer``."""
    return Trainer(
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
            use_cpu=args.cpu,
            seed=args.seed,
        ),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        compute_metrics=accuracy,
        **kwargs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser, output_dir="runs/sam_trainer", lr=2e-3)
    add_sam_args(parser)
    args = parser.parse_args()

    model_path, data, collator, calibration, _ = dataloaders(args)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2),
        SAMConfig(p=args.p, task_type="SEQ_CLS"),
    )
    peft_sam.select_parameters(model, calibration, num_batches=args.calibration_batches)

    trainer = make_trainer(args, model, data, collator)
    trainer.train()
    print(trainer.evaluate())
    model.save_pretrained(f"{args.output_dir}/adapter")  # indices + values; PeftModel.from_pretrained loads it


if __name__ == "__main__":
    main()
