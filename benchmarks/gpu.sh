#!/usr/bin/env bash
# GPU runbook (issue "SAM and MPO at GPU grade"): run whenever a CUDA machine is lent; never needed for CI.
#   bash benchmarks/gpu.sh            # from the repository root, with the package installed (pip install -e ".[test]")
# Writes benchmarks/results/gpu_<gpu>/{b16,b32,bertbase_b32}/speed.{jsonl,md} and cost.{jsonl,md}: speed.py for MiniLM at batch 16 and 32 and a random
# bert-base-size model at batch 32 (full, LoRA, SAM, MPO interleaved), and cost.py on CUDA, whose SAM rows
# include a training step under torch.cuda.set_sync_debug_mode("error").
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
TAG="$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")"
OUT="benchmarks/results/gpu_${TAG}"
METHODS="${METHODS:-full,lora,sam,mpo}"
python benchmarks/speed.py --device cuda --methods "$METHODS" --batch-size 16 --rounds 6 --out-dir "$OUT/b16"
python benchmarks/speed.py --device cuda --methods "$METHODS" --batch-size 32 --rounds 6 --out-dir "$OUT/b32"
python benchmarks/speed.py --device cuda --methods "$METHODS" --batch-size 32 --rounds 4 --model bert-base-random \
    --out-dir "$OUT/bertbase_b32"
python benchmarks/cost.py --device cuda --out "$OUT/cost"
python benchmarks/sr_cost.py --device cuda --out "$OUT/sr_cost"   # CaliSr's measurement share on the GPU
ls -lR "$OUT"
