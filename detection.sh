#!/usr/bin/env bash
# Detection of the language-related neurons of each model, sorted into shared and exclusive sets
# (docs/method.md sections 2-4). Edit the variables below, then: bash detection.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # the project's environment
MODELS=(gemma-3-270m)              # HF hub ids (already in the local cache), model folders or .gguf files,
                                   # e.g. meta-llama/Llama-3.1-8B Qwen/Qwen2.5-7B google/gemma-3-4b-pt
LANGS=en,zh,th,sw,fr,de
DATASET=./dataset
OUT=./outputs
DEVICE=auto
DTYPE=auto                         # bf16 on GPU, fp32 on CPU
SEED=0
METHOD=importance                  # importance (the paper), activation (LAPE) or authors (their released code)
CORPUS=detect                      # detect: dataset/detect/<lang>.txt; mgsm: the MGSM questions (the authors' runs)
RATIO=0.01                         # top fraction of each layer and group activated per sentence
THRESHOLD=1.0                      # firing rate needed to be language-related (1.0 = every sentence)
SAMPLE_SIZE=0                      # sentences per language drawn with the seed, 0 = all
BATCH_SIZE=8                       # sentences per forward pass
EXTRA_FLAGS=()                     # e.g. (--force) (--qk-score row) (--max-length 512)
LAUNCH=("$PYTHON")                 # e.g. (accelerate launch) to split the sentences over GPUs

for MODEL in "${MODELS[@]}"; do
    echo "=== detection: $MODEL"
    "${LAUNCH[@]}" detection.py --model "$MODEL" --langs "$LANGS" --dataset "$DATASET" --out "$OUT" \
        --device "$DEVICE" --dtype "$DTYPE" --seed "$SEED" --method "$METHOD" --corpus "$CORPUS" --ratio "$RATIO" \
        --threshold "$THRESHOLD" --sample-size "$SAMPLE_SIZE" --batch-size "$BATCH_SIZE" "${EXTRA_FLAGS[@]}"
    echo "neuron files: $("$PYTHON" -m langneurons.layout neurons "$OUT" "$MODEL")"
done
