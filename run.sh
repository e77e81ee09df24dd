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
PYTHON=.venv/bin/python

MODEL=gemma-3-270m
LANGS=en,zh,th,sw,fr,de
DATASET=./dataset
OUT=./outputs
TRAIN_LANG=sw                          # the paper's low-resource example
VARIANTS=shared,exclusive_$TRAIN_LANG  # deactivated models written to disk (1.1 GB each)
PPL_LINES=16                           # val lines per language for perplexity (0 = all 64)
CONTROLS=2                             # random controls per set (the default 5 costs 21 more perplexity passes)
EVAL_LIMIT=12                          # MGSM / MMMLU items per language (0 = all 32)
TRAIN_STEPS=12                         # a demonstration; the paper trains one epoch over 100k documents
TRAIN_LR=5e-4                          # higher than the paper's 5e-5 so that 12 steps show an effect

RUN=${TRAIN_LANG}-exclusive_${TRAIN_LANG}
layout() { "$PYTHON" -m langneurons.layout "$1" "$OUT" "$MODEL"; }  # every path from langneurons/layout.py
DATA=(--langs "$LANGS" --dataset "$DATASET" --out "$OUT")

echo "== 1/5 detection"
"$PYTHON" detection.py --model "$MODEL" "${DATA[@]}" --ratio 0.01
echo "== 2/5 deactivation: perplexity of every set and $CONTROLS random controls each; variants written: $VARIANTS"
"$PYTHON" deactivation.py --model "$MODEL" "${DATA[@]}" --measure-ppl --limit "$PPL_LINES" --save-variants "$VARIANTS" \
  --random-controls "$CONTROLS"
echo "== 3/5 training only the $TRAIN_LANG exclusive neurons"
"$PYTHON" train.py --model "$MODEL" "${DATA[@]}" --lang "$TRAIN_LANG" --neurons "$(layout neurons)/exclusive_$TRAIN_LANG.json" \
  --run-name "$RUN" --max-steps "$TRAIN_STEPS" --lr "$TRAIN_LR" --global-batch-size 16 --micro-batch-size 4 --cutoff-len 128
echo "== 4/5 evaluation of the base model, two variants and the trained model"
for m in "$MODEL" "$(layout variants)/shared" "$(layout variants)/exclusive_$TRAIN_LANG" "$(layout trained)/$RUN"; do
  "$PYTHON" evaluate.py --model "$m" "${DATA[@]}" --tasks ppl --limit "$PPL_LINES"
  "$PYTHON" evaluate.py --model "$m" "${DATA[@]}" --tasks mmmlu,mgsm --limit "$EVAL_LIMIT" --max-new-tokens 64
done
echo "== 5/5 figures and report"
"$PYTHON" figures.py --out "$OUT"

echo
echo "Results:"
"$PYTHON" - "$OUT" "$MODEL" "$RUN" <<'EOF_'
import sys
from langneurons import layout
out, model, run = sys.argv[1:]
o = layout.outputs(out, model)
print(f"  neuron sets and statistics   {o.neurons}/ ({layout.STATS})")
print(f"  deactivation (PPL, Imp, LAS) {o.deactivation}")
print(f"  trained model and log        {o.run(run)}/ ({layout.TRAIN_LOG})")
print(f"  evaluations                  {o.eval}/")
print(f"  figures and report           {layout.figures_dir(out)}/ ({layout.REPORT})")
EOF_
