"""The same fine-tuning as ``train_glue.py``, with transformers' ``Trainer`` instead of an Accelerate loop.

SAM needs no ``TrainerCallback``: its calibration (``peft_sam.select_parameters``) runs once, before the
optimizer exists, so it simply happens before ``Trainer(...)``::

    python benchmarks/train_glue_trainer.py --task rte --method sam --num-calibration-batches 100

CaliSr does need one: ``--method calisr`` adds :class:`peft_sam.CaliSrCallback`, which takes over the Trainer's
``optimizer.step()`` (split steps, stable-rank measurements, switches); W_extra gets its own learning rate::

    python benchmarks/train_glue_trainer.py --task rte --method calisr --calisr-adapter lora --calisr-variant S

The best checkpoint (by validation score) is reloaded at the end, evaluated on the test split and saved to
``<output-dir>/adapter``. (AdaLoRA needs a per-step ``update_and_allocate`` hook: use ``train_glue.py``.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from glue import compute_metrics, get_collator, get_spec, load_task, model_class_for, tokenize_task  # noqa: E402
from glue.methods import METHODS, build_peft_model, save_trained  # noqa: E402
from glue.training import default_model_path  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

import peft_sam  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rte")
    parser.add_argument("--method", default="sam", choices=sorted(set(METHODS) - {"adalora"}))
    parser.add_argument("--model", default=None, help="hub id or path (default: MiniLM)")
    parser.add_argument("--output-dir", default="runs/train_glue_trainer")
    parser.add_argument("--p", type=float, default=0.005)
    parser.add_argument("--lr", type=float, default=None, help="default: the method's default_lr")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-calibration-batches", type=int, default=600)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--calisr-adapter", default="lora", choices=["lora", "mpo", "sam"])
    parser.add_argument("--calisr-variant", default="S", choices=["S", "D"])
    parser.add_argument("--calisr-switch-at", type=float, default=None, help="fixed switch (control)")
    parser.add_argument("--calisr-extra-lr", type=float, default=2e-5, help="lr of W_extra (the full-FT part)")
    args = parser.parse_args()

    transformers.set_seed(args.seed)
    spec = get_spec(args.task)
    model_path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = load_task(spec.name)
    if args.max_train_samples:
        splits["train"] = splits["train"].select(range(min(args.max_train_samples, len(splits["train"]))))
    data = tokenize_task(splits, tokenizer, spec, max_length=args.max_length)
    collator = get_collator(spec, tokenizer)

    model_cls = getattr(transformers, model_class_for(spec))
    base = model_cls.from_pretrained(
        model_path, **({} if spec.kind == "choice" else {"num_labels": spec.num_labels})
    )
    model, info = build_peft_model(
        args.method,
        base,
        spec,
        p=args.p,
        seed=args.seed,
        num_calibration_batches=args.num_calibration_batches,
        calisr_adapter=args.calisr_adapter,
        calisr_variant=args.calisr_variant,
        calisr_switch_at=args.calisr_switch_at,
    )
    if info.needs_calibration:  # before Trainer(...): the optimizer must see the selected entries
        calib = DataLoader(
            data["train"], batch_size=args.batch_size, shuffle=True, collate_fn=collator,
            generator=torch.Generator().manual_seed(args.seed),
        )  # fmt: skip
        summary = peft_sam.select_parameters(model, calib)
        print(f"SAM calibration: {summary.num_selected} entries from {summary.num_batches} batches")

    # transformers 5 takes the warm-up ratio as a float warmup_steps; 4.x has warmup_ratio
    has_ratio = "warmup_ratio" in {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = {"warmup_ratio": 0.06} if has_ratio else {"warmup_steps": 0.06}
    lr = args.lr if args.lr is not None else METHODS[args.method].default_lr
    callbacks, optimizers = [], (None, None)
    if args.method == "calisr":  # core at lr, W_extra at --calisr-extra-lr; the callback drives the switch
        from peft_sam import calisr_param_groups

        groups = calisr_param_groups(model)
        for group in groups:
            group["lr"] = args.calisr_extra_lr if group["calisr"] == "extra" else lr
        optimizers = (torch.optim.AdamW(groups, lr=lr), None)
        callbacks.append(peft_sam.CaliSrCallback(log_path=os.path.join(args.output_dir, "calisr.jsonl")))
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        learning_rate=lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        **warmup,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        seed=args.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["val"],
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=lambda pred: compute_metrics(spec, pred.predictions, pred.label_ids),
        callbacks=callbacks,
        optimizers=optimizers,
    )
    trainer.train()
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    save_trained(model, info, os.path.join(args.output_dir, "adapter"))
    print(
        json.dumps(
            {
                "task": spec.name,
                "method": args.method,
                "trainable_params": info.trainable_params,
                **test,
                **({"calisr": callbacks[0].controller.summary()} if callbacks else {}),
            }
        )
    )


if __name__ == "__main__":
    main()
