#!/usr/bin/env bash
# The whole pipeline on the embedded default model and data, in about 18 minutes on 2 CPU cores:
# detection -> deactivation with perplexity -> a short neuron-targeted training run -> evaluation of
# the base model, two deactivated variants and the trained model -> figures and report.
# A second run reuses everything already computed with the same arguments.
# Edit the variables to run it on another model or dataset (see README).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
export HF_HUB_OFFLINE=1
PY=.venv/bin/python

MODEL=gemma-3-270m
LANGS=en,zh,th,sw,fr,de
DATASET=./dataset
OUT=./outputs
TRAIN_LANG=sw                          # the paper's low-resource example
VARIANTS=shared,exclusive_$TRAIN_LANG  # deactivated models written to disk (1.1 GB each)
PPL_LINES=16                           # val lines per language for perplexity (0 = all 64)
EVAL_LIMIT=12                          # MGSM / MMMLU items per language (0 = all 32)
TRAIN_STEPS=12                         # a demonstration; the paper trains one epoch over 100k documents
TRAIN_LR=5e-4                          # higher than the paper's 5e-5 so that 12 steps show an effect

TAG=$($PY -c "from langneurons.layout import model_tag; print(model_tag('$MODEL'))")
RUN=${TRAIN_LANG}-exclusive_${TRAIN_LANG}
DATA=(--langs "$LANGS" --dataset "$DATASET" --out "$OUT")

echo "== 1/5 detection"
$PY detection.py --model "$MODEL" "${DATA[@]}" --ratio 0.01
echo "== 2/5 deactivation: perplexity of every set; variants written: $VARIANTS"
$PY deactivation.py --model "$MODEL" "${DATA[@]}" --measure-ppl --limit "$PPL_LINES" --save-variants "$VARIANTS"
echo "== 3/5 training only the $TRAIN_LANG exclusive neurons"
$PY train.py --model "$MODEL" "${DATA[@]}" --lang "$TRAIN_LANG" --neurons "$OUT/$TAG/neurons/exclusive_$TRAIN_LANG.json" \
  --run-name "$RUN" --max-steps "$TRAIN_STEPS" --lr "$TRAIN_LR" --batch-size 16 --micro-batch-size 4 --cutoff-len 128
echo "== 4/5 evaluation of the base model, two variants and the trained model"
for m in "$MODEL" "$OUT/$TAG/variants/shared" "$OUT/$TAG/variants/exclusive_$TRAIN_LANG" "$OUT/$TAG/trained/$RUN"; do
  $PY evaluate.py --model "$m" "${DATA[@]}" --tasks ppl --limit "$PPL_LINES"
  $PY evaluate.py --model "$m" "${DATA[@]}" --tasks mmmlu,mgsm --limit "$EVAL_LIMIT" --max-new-tokens 64
done
echo "== 5/5 figures and report"
$PY figures.py --out "$OUT"

echo
echo "Results:"
echo "  neuron sets and statistics   $OUT/$TAG/neurons/ (stats.json)"
echo "  deactivation (PPL, Imp, LAS) $OUT/$TAG/deactivation.json"
echo "  trained model and log        $OUT/$TAG/trained/$RUN/ (train_log.json)"
echo "  evaluations                  $OUT/$TAG/eval/"
echo "  figures and report           $OUT/figures/ (report.md)"
