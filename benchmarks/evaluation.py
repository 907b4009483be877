"""Benchmark evaluation and start-up on Gemma 3 270M: this checkout ("after") against another ("before",
default the main checkout), and merger's greedy task accuracy against lm-evaluation-harness's ``hf`` model.

    .venv/bin/python benchmarks/evaluation.py --store HOME [--before ../main] [--sections evaluate,accuracy,validate]

HOME is a store (at the before checkout's database revision) that holds what
``recipes/gemma-tasks-quantized.yaml`` builds and ``data/text/python-docs.txt`` (evaluation results it holds are
not used);
the fixtures (``../shared/fixtures``, ``MERGER_FIXTURES`` overrides) give the adapters and task files.
Each side works on its own copy of HOME (models hard-linked, the database copied), so neither sees the
other's evaluations or database revision.

- evaluate: the recipe's evaluate stage (six models, two tasks x 50 examples, the perplexity text), run by
  ``merger run`` in-process in a fresh interpreter of each checkout (``benchmarks/evaluate_stage.py``); the
  stage's own seconds, and every result, so the two sides' numbers can be compared.
- accuracy: greedy accuracy of each fixture fine-tune on its own task file (first 50 lines), by merger
  (batch_size 8, and 1: one example at a time) and by lm-eval's ``hf`` model (batch size 8) given the same
  loaded model, with the same torch thread count (the one merger's evaluation picks); seconds and the ratio
  lm-eval / merger.
- llama: the recipe's Q8_0 and Q4_K_M files on llama.cpp, in this process: greedy accuracy on each task file (first
  50 lines) and the perplexity text, with batch_size 8 (sequences decoded together) and 1 (one at a time), each
  twice in the order 1, 8, 8, 1; seconds and the ratio.
- validate: ``merger validate`` wall time (process start to exit, median of 3) of a one-stage recipe: a
  mergekit merge, and an adapters fold; each side.
"""

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's merger, whatever the venv has installed
FIXTURES = Path(os.environ.get("MERGER_FIXTURES", REPO.parent / "shared" / "fixtures"))
RECIPE = REPO / "recipes" / "gemma-tasks-quantized.yaml"
SECTIONS = ("evaluate", "accuracy", "llama", "validate")
TASKS = ("sentiment", "json")
LIMIT = 50
console = Console()

LM_EVAL_TASK = """\
task: merger_bench_{name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], do_sample: false, max_gen_toks: {max_tokens}}}
metric_list:
  - metric: exact_match
"""


def side_store(template: Path, dest: Path) -> Path:
    """A copy of the store: models hard-linked (content-addressed, never written), data copied, database backed up
    without its evaluation results (each side measures every one)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copytree(template / "models", dest / "models", copy_function=os.link)
    shutil.copytree(template / "data", dest / "data")
    source = sqlite3.connect(f"file:{template / 'merger.db'}?mode=ro", uri=True)
    target = sqlite3.connect(dest / "merger.db")
    source.backup(target)
    with target:
        target.execute("DELETE FROM evaluations")
    source.close(), target.close()
    return dest


def side_env(checkout: Path, home: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(checkout), "MERGER_HOME": str(home),
                         "MERGER_MODEL_ROOTS": f"{FIXTURES}{os.pathsep}{home / 'data'}"}


def evaluate_section(sides: dict[str, Path], template: Path, work: Path, *, limit: int | None, concurrent: bool) -> dict:
    recipe = yaml.safe_load(RECIPE.read_text())
    if limit:
        for stage in recipe["stages"]:
            if "evaluate" in stage:
                stage["evaluate"]["limit"] = limit
    recipe_path = work / "quickstart.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    runs = {}
    for side, checkout in sides.items():
        home = side_store(template, work / f"{side}-home")
        runs[side] = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "evaluate_stage.py"), str(recipe_path)],
                                      env=side_env(checkout, home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not concurrent:
            runs[side].wait()
    out = {}
    for side, run in runs.items():
        stdout, stderr = run.communicate()
        if run.returncode != 0:
            sys.exit(f"evaluate ({side}) failed:\n{stderr[-3000:]}")
        out[side] = json.loads(stdout)
        console.print(f"evaluate stage, {side}: {out[side]['seconds']:.1f} s")
    table = Table(title=f"the quickstart's evaluate stage (6 models, 2 tasks x {limit or 50}, perplexity text)"
                        f"{', both sides at once' if concurrent else ''}")
    for heading in ("model", "metric", "data", *sides, "seconds " + " / ".join(sides)):
        table.add_column(heading)
    rows = {side: {(r["model"], r["metric"], r["dataset"]): r for r in out[side]["results"]} for side in sides}
    for key in sorted(set().union(*rows.values())):
        values = [rows[side].get(key) for side in sides]
        table.add_row(*key, *(f"{v['value']:.4f}" if v else "-" for v in values),
                      " / ".join(f"{v['seconds']:.1f}" if v else "-" for v in values))
    console.print(table)
    if len(sides) == 2:
        before, after = (out[s]["seconds"] for s in sides)
        console.print(f"evaluate stage: {before:.1f} s -> {after:.1f} s, {before / after:.2f}x faster")
    return out


def accuracy_section(store_home: Path, work: Path) -> list[dict]:
    """In this process (this checkout): merger's greedy accuracy and lm-eval's on the same loaded model."""
    import torch

    from merger.evaluation.runtimes import evaluation_threads
    from merger.settings import Settings
    from merger.store import Store

    os.environ |= side_env(REPO, store_home)
    store = Store(Settings())
    with evaluation_threads():
        threads = torch.get_num_threads()
        rows = [_accuracy_row(store, task, work) for task in TASKS]
    table = Table(title=f"greedy task accuracy, first {LIMIT} lines, same loaded model (float32), {threads} torch thread(s)")
    for heading in ("task", "merger b8 acc", "merger b8 s", "merger b1 s", "lm-eval hf b8 exact_match", "lm-eval s",
                    "lm-eval s / merger b8 s"):
        table.add_column(heading, justify="right")
    for r in rows:
        table.add_row(r["task"], f"{r['merger_b8']['accuracy']:.2f}", f"{r['merger_b8']['seconds']:.1f}",
                      f"{r['merger_b1']['seconds']:.1f}", f"{r['lm_eval_b8']['exact_match']:.2f}",
                      f"{r['lm_eval_b8']['seconds']:.1f}", f"{r['lm_eval_b8']['seconds'] / r['merger_b8']['seconds']:.2f}")
    console.print(table)
    return rows


def _accuracy_row(store, task: str, work: Path) -> dict:
    """One fixture fine-tune on its own task file: merger at batch 8 and 1, lm-eval's hf model at batch 8."""
    from merger.evaluation import harness
    from merger.evaluation.datasets import read_examples
    from merger.evaluation.metrics import generation_accuracy
    from merger.evaluation.runtimes import Transformers

    path = FIXTURES / "tasks" / f"{task}.jsonl"
    examples = read_examples(path, LIMIT)
    lm = Transformers().load(store.path_of(store.find(f"gemma-{task}")), dtype="float32")
    row = {"task": task, "model": f"gemma-{task}", "examples": len(examples)}
    for batch in (8, 1):
        measured = generation_accuracy(lm, examples, batch_size=batch, step=lambda *_: None)
        row[f"merger_b{batch}"] = {"accuracy": measured.values["accuracy"], "seconds": measured.seconds}
    max_tokens = max(len(lm.encode(e.answer, special=False)) + 1 for e in examples)
    yaml_path = work / f"lm-eval-{task}.yaml"
    yaml_path.write_text(LM_EVAL_TASK.format(name=task, data=path.name, max_tokens=max_tokens))
    shutil.copy(path, work / path.name)
    spec = harness.read_task(yaml_path, lambda text, base: (base / text).resolve())
    with tempfile.TemporaryDirectory() as cache:
        measured = harness.run_task(lm.model, lm.tokenizer, spec, limit=LIMIT, batch_size=8, cache_dir=Path(cache),
                                    step=lambda *_: None)
    row["lm_eval_b8"] = {"exact_match": measured.values["metrics"][measured.values["primary"]], "seconds": measured.seconds}
    return row


def llama_section(store_home: Path) -> list[dict]:
    """In this process (this checkout): the quantized files on llama.cpp, batch_size 8 against 1 on the same loaded model."""
    from functools import partial

    from merger.evaluation.datasets import read_examples
    from merger.evaluation.metrics import generation_accuracy, perplexity
    from merger.evaluation.runtimes import LlamaCpp, evaluation_threads
    from merger.settings import Settings
    from merger.store import Store

    os.environ |= side_env(REPO, store_home)
    store = Store(Settings())
    text = (store_home / "data" / "text" / "python-docs.txt").read_text()
    rows = []
    with evaluation_threads():
        for name in ("gemma-tasks-q8", "gemma-tasks-q4"):
            lm = LlamaCpp().load(store.path_of(store.find(name)), dtype="float32")
            measures = {task: partial(generation_accuracy, lm, read_examples(FIXTURES / "tasks" / f"{task}.jsonl", LIMIT))
                        for task in TASKS} | {"perplexity": partial(perplexity, lm, text, window=512, limit=None)}
            for label, measure in measures.items():
                seconds, values = {1: [], 8: []}, set()
                for batch in (1, 8, 8, 1):
                    run = measure(batch_size=batch, step=lambda *_: None)
                    seconds[batch].append(run.seconds)
                    values.add(run.values["perplexity" if label == "perplexity" else "accuracy"])
                rows.append({"model": name, "data": label, "values": sorted(values), "b1_seconds": seconds[1], "b8_seconds": seconds[8]})
    table = Table(title="llama.cpp, same loaded model, batch_size 8 against 1 (runs in the order 1, 8, 8, 1; seconds summed)")
    for heading in ("model", "data", "value (every run)", "b1 s", "b8 s", "b1 s / b8 s"):
        table.add_column(heading, justify="right")
    for r in rows:
        one, eight = sum(r["b1_seconds"]), sum(r["b8_seconds"])
        table.add_row(r["model"], r["data"], ", ".join(f"{v:.4f}" for v in r["values"]), f"{one:.1f}", f"{eight:.1f}", f"{one / eight:.2f}")
    console.print(table)
    return rows


def validate_section(sides: dict[str, Path], template: Path, work: Path) -> dict:
    recipes = {
        "merge (linear)": {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": "gemma-sentiment", "parameters": {"weight": 0.5}}, {"model": "gemma-json", "parameters": {"weight": 0.5}}]},
        "adapters fold": {"stages": [{"name": "folded", "adapters": {"base": "gemma-3-270m", "mode": "fold",
                                                                       "adapters": [{"path": "adapters/json"}]}}]},
    }
    out: dict = {}
    for side, checkout in sides.items():
        home = side_store(template, work / f"{side}-validate-home")
        env = side_env(checkout, home)
        for label, recipe in recipes.items():
            path = work / f"validate-{label.split()[0]}.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            seconds = []
            for _ in range(3):
                started = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", "from merger.cli import main; main()", "validate", str(path)],
                                      env=env, capture_output=True, text=True)
                seconds.append(time.perf_counter() - started)
                if done.returncode != 0:
                    sys.exit(f"validate ({side}, {label}) failed:\n{done.stdout}{done.stderr}")
            out.setdefault(label, {})[side] = {"median_seconds": statistics.median(seconds), "runs": seconds,
                                                "stderr_lines": len(done.stderr.splitlines())}
    table = Table(title="merger validate, one-stage recipe, process start to exit (median of 3)")
    for heading in ("recipe", *(f"{side} s" for side in sides), *(f"{side} stderr lines" for side in sides)):
        table.add_column(heading, justify="right")
    for label, by_side in out.items():
        table.add_row(label, *(f"{by_side[s]['median_seconds']:.2f}" for s in sides),
                      *(str(by_side[s]["stderr_lines"]) for s in sides))
    console.print(table)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="a store holding the quickstart's models (see above)")
    parser.add_argument("--before", default=str(REPO.parent / "main"), help="the checkout to compare with ('' for none)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / ".work" / "evaluation")
    parser.add_argument("--limit", type=int, help="evaluate: examples per task file and windows of text (the recipe says 50)")
    parser.add_argument("--concurrent", action="store_true", help="evaluate: run both sides at once (same load on both)")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sides = ({"before": Path(args.before).resolve()} if args.before else {}) | {"after": REPO}
    console.print(f"cores: {os.cpu_count()}  load: {os.getloadavg()}  sides: {sides}")
    results = {}
    if "evaluate" in sections:
        results["evaluate"] = evaluate_section(sides, args.store.resolve(), work, limit=args.limit, concurrent=args.concurrent)
    if "accuracy" in sections:
        results["accuracy"] = accuracy_section(side_store(args.store.resolve(), work / "accuracy-home"), work)
    if "llama" in sections:
        results["llama"] = llama_section(side_store(args.store.resolve(), work / "llama-home"))
    if "validate" in sections:
        results["validate"] = validate_section(sides, args.store.resolve(), work)
    console.print(f"load after: {os.getloadavg()}")
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"written to {work / 'results.json'}")


if __name__ == "__main__":
    main()
