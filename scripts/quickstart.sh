#!/usr/bin/env bash
# Quickstart on one machine, no server, no GPU: import Gemma 3 270M from PyPI, merge two task fine-tunes
# of it (the fixture LoRAs folded in) with TIES, show the lineage, and load the result with transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

FIXTURES=${MERGER_FIXTURES:-../shared/fixtures}
if [ ! -d "$FIXTURES/adapters" ]; then
  echo "quickstart: no LoRA fixtures at $FIXTURES (set MERGER_FIXTURES)" >&2
  exit 1
fi
export MERGER_MODEL_ROOTS=${MERGER_MODEL_ROOTS:-$(cd "$FIXTURES" && pwd)}
export MERGER_HOME=${MERGER_HOME:-$PWD/.merger}
merger=.venv/bin/merger

echo "== import Gemma 3 270M (GGUF from PyPI -> bf16 safetensors; about two minutes, once)"
$merger import-gguf
echo "== validate and run recipes/gemma-tasks-ties.yaml"
$merger validate recipes/gemma-tasks-ties.yaml
model=$($merger run recipes/gemma-tasks-ties.yaml)
echo "== lineage of $model"
$merger lineage "$model"
echo "== export and load with transformers"
rm -rf "$MERGER_HOME/export/gemma-tasks-ties"
$merger export "$model" "$MERGER_HOME/export/gemma-tasks-ties"
.venv/bin/python scripts/generate.py "$MERGER_HOME/export/gemma-tasks-ties" \
  "Review: The food was delicious and the service was superb.
Sentiment:" \
  "Text: Living in Hanoi, Kofi is 68.
JSON:"
