#!/usr/bin/env bash
# One prepared check of the GPU path: the `cuda` tests (tests/test_cuda.py), then the detection and training
# benchmarks in bf16 on the embedded model, or on random weights of its config when its weights are not here
# (a lent GPU box: they do not travel), then query/key scoring on the paper's shapes: bf16/TF32 products and
# pruned top-k against float32 by the top lists (bench/qk_precision.py) and the detection benchmark on a
# random 2-layer Llama-3.1-8B (launches and host synchronisations per layer in its profile). Each step is
# bounded (280 + 120 + 90 + 150 + 180 s); GPU_CHECK_ONLY=step,step runs only those steps, so the check can be
# split over two device calls of under 10 minutes each. Prints one summary table; writes it, the logs and the
# JSON results to the folder given as argument, else $OUT, else ./gpu_check.
#
#   bash bench/gpu_check.sh [FOLDER]                  # on a GPU box
#   GPU_CHECK_ONLY=qk_precision,detection_shapes bash bench/gpu_check.sh [FOLDER]   # the query/key steps alone
#   bash bench/gpu_check.sh --cpu-dry-run [FOLDER]    # the same steps on the CPU with tiny sizes (catches typos)
#
# Needs a python with torch, transformers, accelerate, safetensors, pytest ($PYTHON, default python3; no venv).
# `datasets` may be missing; WHEELS=DIR installs wheels carried in DIR (no network) into a temporary folder.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY=1; shift; fi
[[ "${GPU_CHECK_CPU_DRY_RUN:-0}" == 1 ]] && DRY=1
DEST=${1:-${OUT:-./gpu_check}}
mkdir -p "$DEST" && DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
STEPS="$DEST/steps.tsv"
: > "$STEPS"

# step NAME TIMEOUT_S CMD...: run, log to $DEST/NAME.log, record status and seconds; a failure never stops the rest
ONLY=",${GPU_CHECK_ONLY:-all},"
step() {
  local name=$1 limit=$2; shift 2
  if [[ $ONLY != ",all," && $ONLY != *",$name,"* ]]; then return 0; fi
  local t0=$SECONDS rc
  echo "== $name: $*" | tee "$DEST/$name.log"
  timeout "$limit" "$@" >> "$DEST/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
  echo "   exit $rc after $((SECONDS - t0)) s (log: $DEST/$name.log)"
}

if [[ -n "${WHEELS:-}" ]]; then
  $PYTHON -m pip install -q --no-index --find-links "$WHEELS" --target "$WORK/site" "$WHEELS"/*.whl \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---------------------------------------------------------------- machine and model
$PYTHON - > "$DEST/environment.txt" 2>&1 <<'EOF'
import importlib, platform, torch
print("python", platform.python_version())
for m in ("torch", "transformers", "accelerate", "safetensors", "peft", "datasets"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception:
        print(m, "not installed")
print("cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      *[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
EOF
cat "$DEST/environment.txt"

EMBEDDED="${LANGNEURONS_CACHE:-$HOME/.cache/langneurons}/gemma-3-270m"
if [[ $DRY == 1 ]]; then
  DEVICE=cpu
  MODEL="$WORK/random-gemma-3-270m"
  $PYTHON bench/random_model.py "$MODEL" --num-layers 2 --dtype float32 > /dev/null
  echo "random weights, gemma-3-270m config, 2 of its 18 layers (CPU dry run)" > "$DEST/model.txt"
  export LANGNEURONS_CUDA_TESTS_ON_CPU=1
  DET_SIZES=(--lengths 16,32 --per-lang 2 --batch-size 2)
  TRAIN_SIZES=(--steps 1 --micro-batch-size 1 --seq-len 32)
  QK_SIZES=(--dtype float32 --layers 1 --lengths 32 --tokens 64 --products bfloat16)
  SHAPE_SIZES=(--dtype float32 --layers 1 --lengths 32 --tokens 64 --repeats 1 --modes decoder,all --no-profile)
else
  DEVICE=cuda
  if [[ -f "$EMBEDDED/config.json" ]]; then
    MODEL="$EMBEDDED"
    echo "embedded gemma-3-270m ($EMBEDDED)" > "$DEST/model.txt"
  else
    MODEL="$WORK/random-gemma-3-270m"
    $PYTHON bench/random_model.py "$MODEL" --dtype bfloat16 > /dev/null
    echo "random weights of the embedded model's config (bench/gemma-3-270m.config.json; its weights are not here)" > "$DEST/model.txt"
  fi
  DET_SIZES=(--lengths 64,256,1024 --per-lang 16 --batch-size 8)
  TRAIN_SIZES=(--steps 10 --micro-batch-size 4 --seq-len 512)
  QK_SIZES=(--dtype bfloat16 --layers 2 --lengths 64,256 --tokens 512 --products bfloat16,tf32)
  SHAPE_SIZES=(--dtype bfloat16 --layers 2 --lengths mgsm,256,1024 --tokens 2048 --per-lang 16 --repeats 3)
fi
echo "model: $(cat "$DEST/model.txt")"

# ---------------------------------------------------------------- the cuda tests
step cuda_tests 280 $PYTHON -m pytest -q -rs -s -m cuda tests/test_cuda.py -p no:cacheprovider \
  --junitxml "$DEST/cuda_tests.xml"

# ---------------------------------------------------------------- benchmarks (flags the script does not know are left out)
flags() {  # flags SCRIPT --flag value ... --switch: keep what SCRIPT's --help lists
  local help out=(); help=$($PYTHON "$1" --help 2>/dev/null); shift
  while [[ $# -gt 0 ]]; do
    local n=1; [[ $# -gt 1 && $2 != --* ]] && n=2
    grep -qE -- "(^|[[ ])$1([] ]|$)" <<< "$help" && out+=("${@:1:$n}")
    shift $n
  done
  [[ ${#out[@]} -gt 0 ]] && printf '%s\n' "${out[@]}"
}
mapfile -t DET_ARGS < <(flags bench/detection.py --model "$MODEL" --device "$DEVICE" --dtype bfloat16 \
  --json "$DEST/detection.json" "${DET_SIZES[@]}")
if printf '%s\n' "${DET_ARGS[@]}" | grep -q -- '--device'; then
  step detection_bench 120 $PYTHON bench/detection.py "${DET_ARGS[@]}"
else  # before the perf branch's flags: it would run on the CPU with the real MGSM questions
  echo "bench/detection.py has no --device flag (the perf branch adds it): skipped" > "$DEST/detection_bench.log"
  printf 'detection_bench\tskipped\t0\n' >> "$STEPS"
fi

mapfile -t TRAIN_ARGS < <(flags bench/training.py --model "$MODEL" --device "$DEVICE" --dtype bfloat16 \
  --json "$DEST/training.json" --modes neurons,full "${TRAIN_SIZES[@]}")
step training_bench 90 $PYTHON bench/training.py "${TRAIN_ARGS[@]}"

# ---------------------------------------------------------------- query/key scoring on the paper's shapes
# bf16/TF32 products and pruned top-k against float32 by every text's top lists, the device against the CPU,
# the stabilised path on the device; then the detection benchmark on a 2-layer Llama-3.1-8B shape, whose
# profile counts kernel launches and host synchronisations per layer and batch
step qk_precision 150 $PYTHON bench/qk_precision.py --device "$DEVICE" --config bench/llama-3.1-8b.config.json \
  "${QK_SIZES[@]}" --json "$DEST/qk_precision.json"
step detection_shapes 180 $PYTHON bench/detection.py --device "$DEVICE" --config bench/llama-3.1-8b.config.json \
  "${SHAPE_SIZES[@]}" --json "$DEST/detection_shapes.json"

# ---------------------------------------------------------------- one table
$PYTHON bench/gpu_summary.py "$DEST" | tee "$DEST/summary.md"
for name in qk_precision detection_shapes; do
  [[ -f "$DEST/$name.log" ]] && { echo; echo "### $name"; grep -v -e USDT -e '^==' "$DEST/$name.log" | tail -n 12; } | tee -a "$DEST/summary.md"
done
