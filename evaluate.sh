#!/usr/bin/env bash
# Evaluation stage (METHOD.md section 7) for a list of models: MGSM and MMMLU accuracy and perplexity per
# language. Results go to $OUT/<tag>/eval/<name>.json (<tag> = the base model's, <name> = the model's
# basename); each task is one call, and the calls fill the same file (a task already done is reused).
# Edit the variables below, then: bash evaluate.sh
set -euo pipefail

# models: HF hub ids (already in the local cache), model directories or .gguf files, e.g. the base model,
# its deactivated variants (outputs/<tag>/variants/<set>) and trained models (outputs/<tag>/trained/<run>)
MODELS=(gemma-3-270m)
LANGS=en,zh,th,sw,fr,de
TASKS=(ppl mmmlu mgsm)               # any of ppl, mgsm, mmmlu
LIMIT=0                              # items per language and task, 0 = all
DATASET=./dataset
OUT=./outputs
DEVICE=auto
DTYPE=auto
BATCH_SIZE=8
MAX_NEW_TOKENS=256                   # MGSM answer length
EXTRA_FLAGS=()                       # e.g. (--force) (--max-length 1024)

PYTHON=${PYTHON:-python}
cd "$(dirname "$0")"
for MODEL in "${MODELS[@]}"; do
    for TASK in "${TASKS[@]}"; do
        echo "=== evaluation: $MODEL / $TASK"
        "$PYTHON" evaluate.py --model "$MODEL" --tasks "$TASK" --langs "$LANGS" --limit "$LIMIT" \
            --dataset "$DATASET" --out "$OUT" --device "$DEVICE" --dtype "$DTYPE" --batch-size "$BATCH_SIZE" \
            --max-new-tokens "$MAX_NEW_TOKENS" "${EXTRA_FLAGS[@]}"
    done
done
"$PYTHON" figures.py --out "$OUT"
