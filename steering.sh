#!/usr/bin/env bash
# Output-language steering of each model: generations from prompts in the source languages with an intervention
# on the target language's neurons, against no intervention and random controls, into
# <out>/<tag>/steering/<name>.json (docs/steering.md). Edit MODELS, SOURCES, TARGETS and INTERVENTIONS below, then:
#   bash steering.sh [FLAGS]
# FLAGS go to every steering.py call and override its defaults (python steering.py --help lists them), e.g.
#   bash steering.sh --limit 8 --max-new-tokens 24 --random-controls 2
#   bash steering.sh --prompts mgsm --device cuda --batch-size 32 --out ./outputs-small
# Each intervention may name the target as TGT and the first source as SRC, e.g. mean=TGT or shift=SRC:TGT;
# INTERVENTIONS=(scale=1) with --alphas 1,2,4,8 in FLAGS draws the dose-response curve.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # the project's environment
MODELS=(gemma-3-270m)              # HF hub ids (already in the local cache), model folders or .gguf files
SOURCES=en                         # the prompts' languages (--langs)
TARGETS=(zh th sw fr de)           # one run per target language, on its exclusive set (detection.sh first)
INTERVENTIONS=(mean=TGT scale=4 shift=SRC:TGT)

for MODEL in "${MODELS[@]}"; do
    echo "=== steering: $MODEL (results in $("$PYTHON" -m langneurons.layout steering --model "$MODEL" "$@"))"
    for TGT in "${TARGETS[@]}"; do
        for IV in "${INTERVENTIONS[@]}"; do
            SPEC=${IV//TGT/$TGT}
            SPEC=${SPEC//SRC/${SOURCES%%,*}}
            "$PYTHON" steering.py --model "$MODEL" --langs "$SOURCES" --target "$TGT" --intervention "$SPEC" "$@"
        done
    done
done
