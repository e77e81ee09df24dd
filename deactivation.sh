#!/usr/bin/env bash
# Zero the neuron sets detection.sh wrote, measure perplexity per language, save the deactivated models
# (docs/method.md section 5). Edit MODELS below, then: bash deactivation.sh [FLAGS]
# FLAGS go to every deactivation.py call and override its defaults (python deactivation.py --help lists them), e.g.
#   bash deactivation.sh --save-variants shared,exclusive_sw   # the variants written (default all: each a model copy)
#   bash deactivation.sh --limit 16 --batch-size 16             # the first 16 validation lines per language
#   bash deactivation.sh --streaming --legacy-kv-mapping --force --out ./outputs-small
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # the project's environment
MODELS=(gemma-3-270m)              # HF hub ids (already in the local cache), model folders or .gguf files

for MODEL in "${MODELS[@]}"; do
    echo "=== deactivation: $MODEL (sets from $("$PYTHON" -m langneurons.layout neurons --model "$MODEL" "$@"))"
    # --measure-ppl: the perplexity table (deactivation.json) besides the variants
    "$PYTHON" deactivation.py --model "$MODEL" --measure-ppl "$@"
done
