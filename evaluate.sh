#!/usr/bin/env bash
# MGSM and MMMLU accuracy and perplexity per language of each model, into <out>/<tag>/eval/<name>.json
# (docs/method.md section 7). Edit MODELS below, then: bash evaluate.sh [FLAGS]
# FLAGS go to every evaluate.py call and override its defaults (python evaluate.py --help lists them), e.g.
#   bash evaluate.sh --tasks mgsm --limit 50 --max-new-tokens 128   # a task already in the results file is reused
#   bash evaluate.sh --batch-size 16 --max-length 1024 --force --out ./outputs-small
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # the project's environment
MODELS=(gemma-3-270m)              # HF hub ids (already in the local cache), model folders or .gguf files; also
                                   # variants and trained models: `"$PYTHON" -m langneurons.layout variants|trained --model MODEL`
                                   # prints the folder that holds them (figures.py draws the results afterwards)
TASKS=ppl,mmmlu,mgsm               # any of ppl, mgsm, mmmlu (--tasks in FLAGS replaces it)

for MODEL in "${MODELS[@]}"; do
    echo "=== evaluation: $MODEL (results in $("$PYTHON" -m langneurons.layout eval --model "$MODEL" "$@"))"
    "$PYTHON" evaluate.py --model "$MODEL" --tasks "$TASKS" "$@"
done
