"""SAM (p = 0.005) on MRPC with a plain Accelerate loop: get_peft_model -> select_parameters -> optimizer -> prepare
-> train -> save -> load.

    python examples/sam_accelerate.py                      # MiniLM, 1 epoch on all 3668 pairs: ~3 minutes on a CPU
    accelerate launch --multi_gpu --num_processes 2 examples/sam_accelerate.py --max-train-samples 0
"""

import argparse

import torch
from accelerate import Accelerator
from mrpc import add_args, dataloaders
from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

import peft_sam
from peft_sam import PeftModel, SAMConfig, get_peft_model


def evaluate(model, loader, accelerator) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        with torch.no_grad():
            predictions = model(**batch).logits.argmax(-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    return correct / total


def train(accelerator, model, optimizer, train_dl, eval_dl, epochs: int):
    """A linear schedule with 6 % warm-up."""
    steps = epochs * len(train_dl)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)
    for epoch in range(epochs):
        model.train()
        for batch in train_dl:
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        accelerator.print(f"epoch {epoch}: validation accuracy {evaluate(model, eval_dl, accelerator):.4f}")
    return model


def save_and_reload(accelerator, model, output_dir: str, model_path: str, eval_dl) -> None:
    """Save the adapter (main process), load it onto a fresh base on every process, and evaluate that."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output_dir)
    accelerator.wait_for_everyone()
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    reloaded = accelerator.prepare_model(PeftModel.from_pretrained(base, output_dir), evaluation_mode=True)
    accelerator.print(f"reloaded adapter: validation accuracy {evaluate(reloaded, eval_dl, accelerator):.4f}")


def add_sam_args(parser) -> None:
    """SAM's flags; the defaults train 1 epoch on all 3668 pairs (1000 pairs x 1 epoch stay at the majority class)."""
    parser.set_defaults(max_train_samples=0)
    parser.add_argument("--p", type=float, default=0.005)
    parser.add_argument("--calibration-batches", type=int, default=50, help="the SAM reference uses 600")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser, output_dir="runs/sam_accelerate", lr=2e-3)
    add_sam_args(parser)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=args.cpu)
    model_path, data, collator, train_dl, eval_dl = dataloaders(args)

    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model = get_peft_model(base, SAMConfig(p=args.p, task_type="SEQ_CLS"))
    # calibration: gradients at the pre-trained point pick the entries; before prepare(), same mask on every process
    summary = peft_sam.select_parameters(model, train_dl, num_batches=args.calibration_batches)
    accelerator.print(f"SAM chose {summary.num_selected:,} of {summary.num_candidates:,} entries")
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model = train(accelerator, model, optimizer, train_dl, eval_dl, args.epochs)
    save_and_reload(accelerator, model, args.output_dir, model_path, eval_dl)


if __name__ == "__main__":
    main()
