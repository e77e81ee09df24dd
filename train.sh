#!/usr/bin/env bash
# Neuron-targeted continued pretraining, one run per model, trained language and neuron set
# (docs/method.md section 6). Edit the variables below, then: bash train.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # the project's environment
MODELS=(gemma-3-270m)              # HF hub ids (already in the local cache), model folders or .gguf files
LANGS=en,zh,th,sw,fr,de            # validation perplexity before/after training (the trained language always)
DATASET=./dataset
OUT=./outputs
DEVICE=auto
DTYPE=auto                         # bf16 on GPU, fp32 on CPU
SEED=0
TRAIN_LANGS=(sw th zh)             # languages to train on dataset/train/<lang>.jsonl, one run per language and set
NEURON_SETS=(exclusive_LANG random_exclusive_LANG)  # neuron files detection.sh wrote (LANG = the trained language);
                                   # also: shared random_shared related_all, or "full" (all parameters)
LORA_RANKS=()                      # e.g. (8): LoRA baselines, merged into the saved model
LR=5e-5                            # the paper: 5e-5, 3% warmup, 1 epoch, batch 128, cutoff 1024, bf16 on GPU
EPOCHS=1
GLOBAL_BATCH_SIZE=128              # documents per optimizer step over all processes
MICRO_BATCH_SIZE=4                 # documents per forward pass per process (gradient accumulation does the rest)
CUTOFF_LEN=1024
MAX_STEPS=0                        # > 0 stops early (short runs)
SAMPLE_SIZE=0                      # training documents per language drawn with the seed (the paper: 100000; 0 = all)
EXTRA_FLAGS=()                     # e.g. (--gradient-checkpointing) (--legacy-kv-mapping) (--force)
LAUNCH=("$PYTHON")                 # e.g. (torchrun --nproc_per_node 8) or (accelerate launch --config_file fsdp.yaml)

for MODEL in "${MODELS[@]}"; do
    NEURONS_DIR=$("$PYTHON" -m langneurons.layout neurons "$OUT" "$MODEL")
    COMMON=(--model "$MODEL" --langs "$LANGS" --dataset "$DATASET" --out "$OUT" --device "$DEVICE" --dtype "$DTYPE"
            --seed "$SEED" --lr "$LR" --epochs "$EPOCHS" --global-batch-size "$GLOBAL_BATCH_SIZE"
            --micro-batch-size "$MICRO_BATCH_SIZE" --cutoff-len "$CUTOFF_LEN" --max-steps "$MAX_STEPS"
            --sample-size "$SAMPLE_SIZE")
    for TRAIN_LANG in "${TRAIN_LANGS[@]}"; do
        for SET in "${NEURON_SETS[@]}"; do
            SET=${SET//LANG/$TRAIN_LANG}
            if [[ $SET == full ]]; then NEURONS=full; else NEURONS="$NEURONS_DIR/$SET.json"; fi
            echo "=== train: $MODEL $TRAIN_LANG $SET"
            "${LAUNCH[@]}" train.py "${COMMON[@]}" --lang "$TRAIN_LANG" --neurons "$NEURONS" "${EXTRA_FLAGS[@]}"
        done
        for R in "${LORA_RANKS[@]}"; do
            echo "=== train: $MODEL $TRAIN_LANG lora rank $R"
            "${LAUNCH[@]}" train.py "${COMMON[@]}" --lang "$TRAIN_LANG" --lora-rank "$R" "${EXTRA_FLAGS[@]}"
        done
    done
done
