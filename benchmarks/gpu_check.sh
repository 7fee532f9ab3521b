#!/usr/bin/env bash
# GPU check (issue 12): a random-weight ~7B Llama (no download), bf16 base + activation checkpointing, a few training
# steps of our LoRA (plain loss and in chunks), our Sensitivity-LoRA and PEFT's LoRA: tokens/s and peak CUDA memory.
# Under 9 minutes on one 80 GB-class GPU (about 1 minute to build and save the 13 GiB backbone once, then
# four fresh processes that each load it and train 6 steps of 2 x 2048 tokens). Writes benchmarks/results/gpu_check.{md,json}.
#   bash benchmarks/gpu_check.sh                 # extra arguments go to gpu_check.py, e.g. --block 1024
#   bash benchmarks/gpu_check.sh --tiny          # CPU, 2-layer model: checks the path only, writes nothing
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python benchmarks/gpu_check.py "$@"
