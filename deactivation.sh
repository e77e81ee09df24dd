#!/usr/bin/env bash
# Deactivation stage (METHOD.md section 5) for a list of models: zero the neuron sets that detection.sh
# wrote to $OUT/<tag>/neurons/, measure perplexity per language before/after, save the variants.
# Edit the variables below, then: bash deactivation.sh
set -euo pipefail

MODELS=(gemma-3-270m)               # HF hub ids (already in the local cache), model directories or .gguf files
LANGS=en,zh,th,sw,fr,de
DATASET=./dataset
OUT=./outputs
DEVICE=auto
DTYPE=auto
SAVE_VARIANTS=all                    # all, none, or a comma list of set names (each variant is a full model copy)
EXTRA_FLAGS=()                       # e.g. (--streaming) (--legacy-kv-mapping) (--batch-size 4) (--force)

PYTHON=${PYTHON:-python}
cd "$(dirname "$0")"
for MODEL in "${MODELS[@]}"; do
    echo "=== deactivation: $MODEL"
    "$PYTHON" deactivation.py --model "$MODEL" --langs "$LANGS" --dataset "$DATASET" --out "$OUT" \
        --device "$DEVICE" --dtype "$DTYPE" --save-variants "$SAVE_VARIANTS" --measure-ppl "${EXTRA_FLAGS[@]}"
done
