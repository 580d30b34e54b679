"""MPO (MPOP: lightweight fine-tuning of the auxiliary tensors of each weight's matrix-product-operator
decomposition) on MRPC with a plain Accelerate loop; biases, norms and the head train as usual.

    python examples/mpo_accelerate.py                      # MiniLM, 1 epoch on 1000 pairs: a few minutes on a CPU
"""

import argparse

import torch
from accelerate import Accelerator
from mrpc import add_args, dataloaders
from sam_accelerate import save_and_reload, train
from transformers import AutoModelForSequenceClassification

from peft_sam import MPOConfig, get_peft_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser, output_dir="runs/mpo_accelerate", lr=5e-4)
    parser.add_argument("--num-factors", type=int, default=5, help="local tensors per weight (MPOP: 5)")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=args.cpu)
    model_path, data, collator, train_dl, eval_dl = dataloaders(args)

    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model = get_peft_model(base, MPOConfig(num_factors=args.num_factors, task_type="SEQ_CLS"))  # exact decomposition
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model = train(accelerator, model, optimizer, train_dl, eval_dl, args.epochs)
    save_and_reload(accelerator, model, args.output_dir, model_path, eval_dl)  # trained + initial auxiliaries


if __name__ == "__main__":
    main()
