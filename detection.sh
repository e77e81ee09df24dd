#!/usr/bin/env bash
# Detection of language-related neurons for several models (the paper's detection script).
# Edit the variables, then: bash detection.sh
set -euo pipefail
cd "$(dirname "$0")"

MODELS=(gemma-3-270m)          # e.g. meta-llama/Llama-3.1-8B Qwen/Qwen2.5-7B google/gemma-3-4b-pt (local cache or dirs)
LANGS=en,zh,th,sw,fr,de
DATASET=./dataset
CORPUS=detect                  # detect: dataset/detect/<lang>.txt; mgsm: the MGSM questions (the authors' runs)
RATIO=0.01                     # top fraction of each layer and group activated per sentence
THRESHOLD=1.0                  # firing rate needed to be language-related (1.0 = every sentence)
SAMPLE_SIZE=0                  # sentences per language, 0 = all
METHOD=importance              # or activation (LAPE)
OUT=./outputs
LAUNCH="python"                # e.g. "accelerate launch" to split the sentences over GPUs

for model in "${MODELS[@]}"; do
  $LAUNCH detection.py --model "$model" --langs "$LANGS" --dataset "$DATASET" --corpus "$CORPUS" \
    --ratio "$RATIO" --threshold "$THRESHOLD" --sample-size "$SAMPLE_SIZE" --method "$METHOD" --out "$OUT"
done
