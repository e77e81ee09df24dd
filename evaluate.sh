#!/usr/bin/env bash
# MGSM and MMMLU accuracy and perplexity per language of each model, into <out>/<tag>/eval/<name>.json
# (docs/method.md section 7). Edit the variables below, then: bash evaluate.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # the project's environment
MODELS=(gemma-3-270m)              # HF hub ids (already in the local cache), model folders or .gguf files; also
                                   # variants and trained models: `"$PYTHON" -m langneurons.layout variants|trained "$OUT" MODEL`
                                   # prints the folder that holds them (figures.py draws the results afterwards)
LANGS=en,zh,th,sw,fr,de
DATASET=./dataset
OUT=./outputs
DEVICE=auto
DTYPE=auto                         # bf16 on GPU, fp32 on CPU
SEED=0
TASKS=ppl,mmmlu,mgsm               # any of ppl, mgsm, mmmlu (a task already in the results file is reused)
LIMIT=0                            # first N items per language and task, 0 = all
BATCH_SIZE=8                       # sequences per forward pass / generate call
MAX_LENGTH=512                     # tokens per text (prompts: cut at the start)
MAX_NEW_TOKENS=256                 # MGSM answer length
EXTRA_FLAGS=()                     # e.g. (--force)
for MODEL in "${MODELS[@]}"; do
    echo "=== evaluation: $MODEL (results in $("$PYTHON" -m langneurons.layout eval "$OUT" "$MODEL"))"
    "$PYTHON" evaluate.py --model "$MODEL" --langs "$LANGS" --dataset "$DATASET" --out "$OUT" \
        --device "$DEVICE" --dtype "$DTYPE" --seed "$SEED" --tasks "$TASKS" --limit "$LIMIT" \
        --batch-size "$BATCH_SIZE" --max-length "$MAX_LENGTH" --max-new-tokens "$MAX_NEW_TOKENS" "${EXTRA_FLAGS[@]}"
done
