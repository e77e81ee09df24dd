#!/usr/bin/env bash
# The development demo of docs/development.md: continued pretraining of the embedded model on the six
# languages' training texts with a step model every STEP_EVERY steps (train.py --save-every), detection and
# deactivation on the base model and on each step model (detection.sh / deactivation.sh with MODELS), then
# figures.py, whose development figure draws the shared ratio, exclusive fraction and LAS against the step.
# Small on purpose (about 30 minutes on 2 CPU cores shared with other jobs); a rerun reuses every finished stage.
#   bash bench/development.sh            # everything into outputs/development/
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export PYTHON

MODEL=gemma-3-270m
OUT=./outputs/development
RUN=cpt-six                 # the training run's folder name
STEPS=9                     # optimizer steps of continued pretraining
STEP_EVERY=3                # a step model after steps 3, 6, 9
BATCH=4                     # documents per step, drawn from all six languages' train/<lang>.jsonl
LR=2e-4
CUTOFF=64                   # tokens per training document
LEN=48                      # tokens per detection sentence and per validation line
DETECT_TEXTS=16             # detection sentences per language (of 160)
PPL_LINES=4                 # validation lines per language for deactivation's perplexity (of 64)

echo "== 1/4 continued pretraining ($STEPS steps of $BATCH documents, every parameter), a step model every $STEP_EVERY"
"$PYTHON" train.py --model "$MODEL" --out "$OUT" --lang en --neurons full --train-data dataset/train \
  --run-name "$RUN" --max-steps "$STEPS" --global-batch-size "$BATCH" --micro-batch-size 4 --lr "$LR" --warmup 0.1 \
  --cutoff-len "$CUTOFF" --save-every "$STEP_EVERY" --save-steps "$STEP_EVERY" --val-limit 4 --max-length "$LEN"
RUN_DIR="$("$PYTHON" -m langneurons.layout trained "$OUT" "$MODEL")/$RUN"
SERIES="$MODEL $(ls -d "$RUN_DIR"/step-* | sort -t- -k2 -n | tr '\n' ' ')"
echo "series: $SERIES"

echo "== 2/4 detection on each model of the series"
MODELS="$SERIES" bash detection.sh --out "$OUT" --sample-size "$DETECT_TEXTS" --max-length "$LEN" --resamples 100
echo "== 3/4 deactivation on each model of the series"
# the sets LAS needs (shared, each exclusive_<lang>) and no random controls: each condition costs a perplexity
# pass whose 262k-token output layer dominates on a CPU
for M in $SERIES; do
  NEURONS=$("$PYTHON" -m langneurons.layout neurons "$OUT" "$M")
  SETS=(--neurons "$NEURONS/shared.json")
  for L in en zh th sw fr de; do SETS+=(--neurons "$NEURONS/exclusive_$L.json"); done
  MODELS="$M" bash deactivation.sh --out "$OUT" --save-variants none --limit "$PPL_LINES" --max-length "$LEN" \
    --random-controls 0 --resamples 1000 "${SETS[@]}"
done
echo "== 4/4 figures"
"$PYTHON" figures.py --out "$OUT"
echo "figures and report: $OUT/figures/"
