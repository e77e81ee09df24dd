#!/usr/bin/env bash
# The whole pipeline on the embedded default model and data, in about 15 minutes on 2 CPU cores:
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
TRAIN_LANG=sw                       # the paper's low-resource example
VARIANTS=shared,exclusive_$TRAIN_LANG  # deactivated models written to disk (each is a full copy)
EVAL_LIMIT=16                        # items per language for MGSM / MMMLU (0 = all)
TRAIN_STEPS=12

TAG=$($PY -c "from langneurons.model import model_tag; print(model_tag('$MODEL'))")
COMMON=(--model "$MODEL" --langs "$LANGS" --dataset "$DATASET" --out "$OUT")

echo "== 1/5 detection"
$PY detection.py "${COMMON[@]}" --ratio 0.01
echo "== 2/5 deactivation (perplexity of every set, variants: $VARIANTS)"
$PY deactivation.py "${COMMON[@]}" --measure-ppl --save-variants "$VARIANTS"
echo "== 3/5 training the $TRAIN_LANG exclusive neurons"
RUN=${TRAIN_LANG}-exclusive_${TRAIN_LANG}
$PY train.py --model "$MODEL" --dataset "$DATASET" --out "$OUT" --lang "$TRAIN_LANG" \
  --neurons "$OUT/$TAG/neurons/exclusive_$TRAIN_LANG.json" --run-name "$RUN" \
  --max-steps "$TRAIN_STEPS" --batch-size 16 --micro-batch-size 4 --cutoff-len 128 --lr 1e-3
echo "== 4/5 evaluation"
for m in "$MODEL" "$OUT/$TAG/variants/shared" "$OUT/$TAG/variants/exclusive_$TRAIN_LANG" "$OUT/$TAG/trained/$RUN"; do
  $PY evaluate.py "${COMMON[@]/$MODEL/$m}" --tasks ppl,mgsm,mmmlu --limit "$EVAL_LIMIT" --max-new-tokens 96
done
echo "== 5/5 figures"
$PY figures.py --out "$OUT"

echo
echo "Results:"
echo "  neuron sets and statistics   $OUT/$TAG/neurons/ (stats.json)"
echo "  deactivation (PPL, Imp, LAS) $OUT/$TAG/deactivation.json"
echo "  trained model and log        $OUT/$TAG/trained/$RUN/ (train_log.json)"
echo "  evaluations                  $OUT/$TAG/eval/"
echo "  figures and report           $OUT/figures/ (report.md)"
