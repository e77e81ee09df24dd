#!/usr/bin/env bash
# Neuron-targeted continued pretraining (METHOD.md section 6), like the paper's run.sh: for every language,
# train each neuron set detection.sh wrote (and the baselines) on dataset/train/<lang>.jsonl.
# Edit the variables below, then: bash train.sh
set -euo pipefail
cd "$(dirname "$0")"

MODEL=gemma-3-270m                 # HF hub id (already in the local cache), model directory or .gguf file
LANGS=(sw th zh)                   # languages to train, one run per language and neuron set
NEURON_SETS=(exclusive_LANG random_exclusive_LANG)  # files in $OUT/<tag>/neurons/ (LANG = the language);
                                   # also: shared random_shared related_all, or "full" (all parameters)
LORA_RANKS=()                      # e.g. (8): LoRA baselines, merged into the saved model
DATASET=./dataset
OUT=./outputs
LR=5e-5                            # the paper: 5e-5, 3% warmup, 1 epoch, batch 128, cutoff 1024, bf16 on GPU
EPOCHS=1
BATCH_SIZE=128                     # documents per optimizer step over all processes
MICRO_BATCH_SIZE=4                 # documents per forward pass per process (gradient accumulation does the rest)
CUTOFF_LEN=1024
MAX_STEPS=0                        # > 0 stops early (short runs)
LIMIT=0                            # documents per language drawn with the seed (the paper: 100000; 0 = all)
DEVICE=auto
DTYPE=auto                         # bf16 on GPU, fp32 on CPU
SEED=0
EXTRA_FLAGS=()                     # e.g. (--gradient-checkpointing) (--legacy-kv-mapping) (--force)
LAUNCH=(python)                    # e.g. (torchrun --nproc_per_node 8) or (accelerate launch --config_file fsdp.yaml)
PYTHON=${PYTHON:-python}
[[ ${LAUNCH[0]} == python ]] && LAUNCH=("$PYTHON")

TAG=$("$PYTHON" -c "from langneurons.layout import model_tag; print(model_tag('$MODEL'))")
COMMON=(--model "$MODEL" --dataset "$DATASET" --out "$OUT" --lr "$LR" --epochs "$EPOCHS" --batch-size "$BATCH_SIZE"
        --micro-batch-size "$MICRO_BATCH_SIZE" --cutoff-len "$CUTOFF_LEN" --max-steps "$MAX_STEPS" --limit "$LIMIT"
        --device "$DEVICE" --dtype "$DTYPE" --seed "$SEED")

for LANG_ in "${LANGS[@]}"; do
    for SET in "${NEURON_SETS[@]}"; do
        SET=${SET//LANG/$LANG_}
        if [[ $SET == full ]]; then NEURONS=full; else NEURONS="$OUT/$TAG/neurons/$SET.json"; fi
        echo "=== train: $MODEL $LANG_ $SET"
        "${LAUNCH[@]}" train.py "${COMMON[@]}" --lang "$LANG_" --neurons "$NEURONS" "${EXTRA_FLAGS[@]}"
    done
    for R in "${LORA_RANKS[@]}"; do
        echo "=== train: $MODEL $LANG_ lora rank $R"
        "${LAUNCH[@]}" train.py "${COMMON[@]}" --lang "$LANG_" --lora-rank "$R" "${EXTRA_FLAGS[@]}"
    done
done
