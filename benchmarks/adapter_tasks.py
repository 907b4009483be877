"""Task accuracy of Gemma 3 270M with the fixture LoRA adapters: base, each adapter alone, both folded
by merger, and one adapter combined by merger (cat, and linear).

    .venv/bin/python benchmarks/adapter_tasks.py [--limit 50] [--home DIR]

Uses the fixtures beside the checkout (../shared/fixtures; MERGER_FIXTURES overrides). Imports Gemma
into the store at --home if it is not there (about two minutes, once). Evaluation as the fixtures
README defines it, in float32.
"""

import argparse
import os
import time
from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from merger.evaluation.datasets import read_examples
from merger.evaluation.metrics import generation_accuracy
from merger.evaluation.runtimes import HFModel
from merger.gguf_import import bundled_gemma_gguf, import_gguf
from merger.orchestrator import check_recipe, run_recipe
from merger.settings import Settings
from merger.store import Store

FIXTURES = Path(os.environ.get("MERGER_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
TASKS = ("sentiment", "json")
console = Console()


def stage(name: str, mode: str, adapters: list[str], **extra) -> dict:
    spec = {"base": "gemma-3-270m", "mode": mode, "adapters": [{"path": f"adapters/{a}"} for a in adapters], **extra}
    return {"name": name, "adapters": spec}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=50, help="examples per task (the fixtures' reference uses 50)")
    parser.add_argument("--home", type=Path, default=Path(__file__).parent / ".work" / "home")
    args = parser.parse_args()
    os.environ["MERGER_HOME"] = str(args.home.resolve())
    os.environ["MERGER_MODEL_ROOTS"] = str(FIXTURES.resolve())
    settings = Settings()
    store = Store(settings)
    base, _ = import_gguf(store, bundled_gemma_gguf())

    recipe = {"stages": [
        stage("sentiment-folded", "fold", ["sentiment"], dtype="float32"),
        stage("json-folded", "fold", ["json"], dtype="float32"),
        stage("both-folded", "fold", ["sentiment", "json"], dtype="float32"),
        stage("both-cat", "combine", ["sentiment", "json"], combination={"type": "cat"}),
        stage("both-linear", "combine", ["sentiment", "json"], combination={"type": "linear"}),
    ]}
    started = time.perf_counter()
    results = {r.stage: r for r in run_recipe(check_recipe(recipe, settings, store, default_name="tasks"), settings, store)}
    console.print(f"stages built in {time.perf_counter() - started:.1f} s (cache hits: {sum(r.cache_hit for r in results.values())})")

    base_dir = store.path_of(base)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = {task: read_examples(FIXTURES / "tasks" / f"{task}.jsonl", args.limit) for task in TASKS}
    candidates = {
        "base": lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        "+ sentiment (folded)": lambda: _model(store, results["sentiment-folded"]),
        "+ json (folded)": lambda: _model(store, results["json-folded"]),
        "+ both folded": lambda: _model(store, results["both-folded"]),
        "+ both combined (cat)": lambda: _with_adapter(base_dir, store, results["both-cat"]),
        "+ both combined (linear)": lambda: _with_adapter(base_dir, store, results["both-linear"]),
    }
    table = Table("model", *TASKS, "seconds", title=f"task accuracy, first {args.limit} examples, greedy, float32")
    for label, load in candidates.items():
        started = time.perf_counter()
        lm = HFModel("transformers", load(), tokenizer)
        scores = [generation_accuracy(lm, examples[task], step=lambda _done, _total: None).values["accuracy"] for task in TASKS]
        table.add_row(label, *(f"{s:.2f}" for s in scores), f"{time.perf_counter() - started:.0f}")
        del lm
    console.print(table)


def _model(store: Store, result):
    return AutoModelForCausalLM.from_pretrained(store.path_of(result.model), dtype=torch.float32)


def _with_adapter(base_dir: Path, store: Store, result):
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, store.path_of(result.model))


if __name__ == "__main__":
    main()
