#!/usr/bin/env bash
# Zero the neuron sets detection.sh wrote, measure perplexity per language, save the deactivated models
# (docs/method.md section 5). Edit MODELS below or set MODELS/REVISIONS, then: bash deactivation.sh [FLAGS]
# FLAGS go to every deactivation.py call and override its defaults (python deactivation.py --help lists them), e.g.
#   bash deactivation.sh --save-variants shared,exclusive_sw   # the variants written (default all: each a model copy)
#   bash deactivation.sh --limit 16 --batch-size 16             # the first 16 validation lines per language
#   bash deactivation.sh --streaming --legacy-kv-mapping --force --out ./outputs-small
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # the project's environment
MODELS=(${MODELS:-gemma-3-270m})  # HF hub ids (already in the local cache), model folders or .gguf files
# A series (docs/development.md): MODELS="a b c" from the environment (e.g. the step models of train.py
# --save-every), and/or REVISIONS="step1000 step143000": every model at each of these hub revisions (--revision)
read -r -a REVS <<< "${REVISIONS:-}"

for MODEL in "${MODELS[@]}"; do
  for REV in "${REVS[@]:-}"; do
    WHICH=(--model "$MODEL" ${REV:+--revision "$REV"})
    echo "=== deactivation: $MODEL${REV:+ at revision $REV} (sets from $("$PYTHON" -m langneurons.layout neurons "${WHICH[@]}" "$@"))"
    # --measure-ppl: the perplexity table (deactivation.json) besides the variants
    "$PYTHON" deactivation.py "${WHICH[@]}" --measure-ppl "$@"
  done
done
