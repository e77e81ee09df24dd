#!/usr/bin/env bash
# Zero the neuron sets detection.sh wrote, measure perplexity per language, save the deactivated models
# (docs/method.md section 5). Edit the variables below, then: bash deactivation.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # the project's environment
MODELS=(gemma-3-270m)              # HF hub ids (already in the local cache), model folders or .gguf files
LANGS=en,zh,th,sw,fr,de
DATASET=./dataset
OUT=./outputs
DEVICE=auto
DTYPE=auto                         # bf16 on GPU, fp32 on CPU
SEED=0
SAVE_VARIANTS=all                  # all, none, or a comma list of set names (each variant is a full model copy)
BATCH_SIZE=8                       # sequences per forward pass
MAX_LENGTH=512                     # tokens per validation line
LIMIT=0                            # first N validation lines per language, 0 = all
EXTRA_FLAGS=()                     # e.g. (--streaming) (--legacy-kv-mapping) (--force)
for MODEL in "${MODELS[@]}"; do
    echo "=== deactivation: $MODEL (sets from $("$PYTHON" -m langneurons.layout neurons "$OUT" "$MODEL"))"
    "$PYTHON" deactivation.py --model "$MODEL" --langs "$LANGS" --dataset "$DATASET" --out "$OUT" \
        --device "$DEVICE" --dtype "$DTYPE" --seed "$SEED" --save-variants "$SAVE_VARIANTS" \
        --batch-size "$BATCH_SIZE" --max-length "$MAX_LENGTH" --limit "$LIMIT" --measure-ppl "${EXTRA_FLAGS[@]}"
done
