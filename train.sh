#!/usr/bin/env bash
# Neuron-targeted continued pretraining, one run per model, trained language and neuron set
# (docs/method.md section 6). Edit the variables below, then: bash train.sh [FLAGS]
# FLAGS go to every train.py call and override its defaults (python train.py --help lists them; the defaults are
# the paper's: --lr 5e-5, 3% warmup, 1 epoch, --global-batch-size 128, --cutoff-len 1024, bf16 on GPU), e.g.
#   bash train.sh --max-steps 100 --sample-size 100000     # training documents per language drawn with the seed
#   bash train.sh --micro-batch-size 8 --gradient-checkpointing --langs en,sw   # validation languages
#   bash train.sh --legacy-kv-mapping --force --out ./outputs-small
#   SEEDS="1 2 3" bash train.sh --max-steps 100   # every run once per seed, named <run>-seed<N>
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # the project's environment
MODELS=(gemma-3-270m)              # HF hub ids (already in the local cache), model folders or .gguf files
TRAIN_LANGS=(sw th zh)             # languages to train on dataset/train/<lang>.jsonl, one run per language and set
NEURON_SETS=(exclusive_LANG random_exclusive_LANG)  # neuron files detection.sh wrote (LANG = the trained language);
                                   # also: shared random_shared related_all, or "full" (all parameters)
LORA_RANKS=()                      # e.g. (8): LoRA baselines, merged into the saved model
LAUNCH=("$PYTHON")                 # e.g. (torchrun --nproc_per_node 8) or (accelerate launch --config_file fsdp.yaml)
SEEDS=(${SEEDS:-})                 # e.g. SEEDS="1 2 3": the same run with each --seed (data order, sampling); with
                                   # more than one, run names get -seed<N> and figures.py reports the spread over seeds
[[ ${#SEEDS[@]} -gt 0 ]] || SEEDS=("")  # none given: one run with train.py's --seed (default 0, or from FLAGS)

# one train.py call per seed: NAME is the run's folder name without the seed suffix
train() {
    local NAME=$1; shift
    for SEED in "${SEEDS[@]}"; do
        local EXTRA=()
        [[ -n $SEED ]] && EXTRA+=(--seed "$SEED")
        [[ ${#SEEDS[@]} -gt 1 ]] && EXTRA+=(--run-name "$NAME-seed$SEED")
        echo "=== train: $MODEL $NAME${SEED:+ seed $SEED}"
        "${LAUNCH[@]}" train.py --model "$MODEL" "$@" "${EXTRA[@]}"
    done
}

for MODEL in "${MODELS[@]}"; do
    NEURONS_DIR=$("$PYTHON" -m langneurons.layout neurons --model "$MODEL" "$@")
    for TRAIN_LANG in "${TRAIN_LANGS[@]}"; do
        for SET in "${NEURON_SETS[@]}"; do
            SET=${SET//LANG/$TRAIN_LANG}
            if [[ $SET == full ]]; then NEURONS=full; else NEURONS="$NEURONS_DIR/$SET.json"; fi
            train "$TRAIN_LANG-$SET" --lang "$TRAIN_LANG" --neurons "$NEURONS" "$@"
        done
        for R in "${LORA_RANKS[@]}"; do
            train "$TRAIN_LANG-lora$R" --lang "$TRAIN_LANG" --lora-rank "$R" "$@"
        done
    done
done
