#!/usr/bin/env bash
# Detection of the language-related neurons of each model, sorted into shared and exclusive sets
# (docs/method.md sections 2-4). Edit MODELS (and LAUNCH) below or set MODELS/REVISIONS, then: bash detection.sh [FLAGS]
# FLAGS go to every detection.py call and override its defaults (python detection.py --help lists them), e.g.
#   bash detection.sh --ratio 0.02 --corpus mgsm      # detect on the MGSM questions (the authors' runs)
#   bash detection.sh --method activation             # LAPE; also: authors (their released code)
#   bash detection.sh --sample-size 1000 --threshold 0.9 --langs en,zh,sw --out ./outputs-small
#   bash detection.sh --device cuda --dtype bfloat16 --batch-size 16 --max-length 512 --qk-score row --force
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # the project's environment
MODELS=(${MODELS:-gemma-3-270m})  # HF hub ids (already in the local cache), model folders or .gguf files,
                                   # e.g. meta-llama/Llama-3.1-8B Qwen/Qwen2.5-7B google/gemma-3-4b-pt
# A series (docs/development.md): MODELS="a b c" from the environment (e.g. the step models of train.py
# --save-every), and/or REVISIONS="step1000 step143000": every model at each of these hub revisions (--revision)
read -r -a REVS <<< "${REVISIONS:-}"
LAUNCH=("$PYTHON")                 # e.g. (accelerate launch) to split the sentences over GPUs

for MODEL in "${MODELS[@]}"; do
  for REV in "${REVS[@]:-}"; do
    WHICH=(--model "$MODEL" ${REV:+--revision "$REV"})
    echo "=== detection: $MODEL${REV:+ at revision $REV}"
    "${LAUNCH[@]}" detection.py "${WHICH[@]}" "$@"
    echo "neuron files: $("$PYTHON" -m langneurons.layout neurons "${WHICH[@]}" "$@")"
  done
done
