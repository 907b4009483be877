"""The searchers on the real fixtures: Gemma 3 270M with the sentiment and json LoRA adapters.

``--searcher blackbox`` runs the search stage (Optuna) through the orchestrator instead: TIES over the base with
each adapter folded in, weight and density varied per module family (attention / MLP), on lines 51-100 of each
task file; the result is stored in MERGER_HOME (which must hold gemma-3-270m, with the fixtures under
MERGER_MODEL_ROOTS), and the stage's test-line table, trials and minutes are printed.

The learned searcher (the default):

Learns one coefficient per (adapter, LoRA module) on lines 51-100 of each fixture task file (three quarters
to train, a quarter to choose the best step), then measures by greedy generation on test lines 1-50, which
the search never scored: each adapter alone, the starting point, and the found merge. Prints the table,
the minutes and steps, and the machine's load (it is shared), and writes the coefficients as JSON.

    MERGER_HOME=... python scripts/search_fixtures.py [--base gemma-3-270m] [--steps 40] [--out found.json]

The base is a stored model (``merger import-gguf`` puts Gemma 3 270M in the store).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from merger.search.learned import LearnOptions, learn
from merger.search.session import open_session
from merger.search.split import parse_lines
from merger.settings import Settings
from merger.store import Store

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="gemma-3-270m", help="stored model (id, prefix or name)")
    parser.add_argument("--fixtures", type=Path, default=Path(os.environ.get("MERGER_FIXTURES", FIXTURES)))
    parser.add_argument("--tasks", nargs="+", default=["sentiment", "json"], help="names of fixture adapters and task files, in order")
    parser.add_argument("--start", nargs="+", type=float, default=[0.25, 1.0], help="starting weight of each adapter")
    parser.add_argument("--test-lines", default="1-50")
    parser.add_argument("--steps", type=int, default=LearnOptions.steps)
    parser.add_argument("--examples", type=int, default=LearnOptions.examples_per_step)
    parser.add_argument("--lr", type=float, default=LearnOptions.learning_rate)
    parser.add_argument("--minutes", type=float, default=LearnOptions.minutes)
    parser.add_argument("--check-every", type=int, default=LearnOptions.check_every)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); on a loaded machine 1 can be faster")
    parser.add_argument("--out", type=Path, help="write the found coefficients (per adapter, per weight) here")
    parser.add_argument("--searcher", choices=["learned", "blackbox"], default="learned")
    parser.add_argument("--trials", type=int, default=40, help="blackbox: trials at most")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.searcher == "blackbox":
        blackbox(args)
        return
    store = Store(Settings())
    base = store.resolve(args.base)
    print(f"load average at start: {os.getloadavg()}; torch threads: {torch.get_num_threads()}", flush=True)
    opened = time.monotonic()
    session = open_session(store.path_of(base), [args.fixtures / "adapters" / name for name in args.tasks],
                           [(args.fixtures / "tasks" / f"{name}.jsonl", name) for name in args.tasks],
                           parse_lines(args.test_lines), args.start, seed=args.seed)
    print(f"loaded in {time.monotonic() - opened:.0f} s: {len(session.mixture.modules)} LoRA modules; "
          f"train {[len(t) for t in session.train]}, choose {len(session.choose)} examples", flush=True)

    def progress(step, total, checkpoint):
        if checkpoint is not None:
            scores = " ".join(f"{s.exact:.2f}/{s.loglik:.2f}" for s in checkpoint.scores)
            loss = "" if checkpoint.loss is None else f" loss {checkpoint.loss:.3f}"
            print(f"step {step}/{total} {checkpoint.seconds:.0f} s{loss} choose exact/loglik {scores}", flush=True)

    options = LearnOptions(steps=args.steps, examples_per_step=args.examples, learning_rate=args.lr, minutes=args.minutes,
                           check_every=args.check_every, seed=args.seed)
    result = learn(session.mixture, session.train, session.choose, options, pad_id=session.pad_id, progress=progress)
    load_after_search = os.getloadavg()
    for label, scores in [*((f"{n} alone", p) for n, p in zip(args.tasks, result.parents, strict=True)),
                          ("start", result.start.scores), (f"best (step {result.best.step})", result.best.scores)]:
        print(f"choosing lines, {label}: exact/loglik " + " ".join(f"{s.exact:.2f}/{s.loglik:.2f}" for s in scores))
    print(f"search: {result.steps} steps in {result.seconds / 60:.1f} min; best at step {result.best.step}; "
          f"load average {load_after_search}", flush=True)

    rows = [(f"base + {name} alone", session.mixture.uniform([1.0 if i == a else 0.0 for i in range(len(args.tasks))]))
            for a, name in enumerate(args.tasks)]
    rows += [(f"start {' / '.join(f'{w:g}' for w in args.start)}", session.mixture.uniform(args.start)),
             (f"found (step {result.best.step})", result.coefficients)]
    measured = time.monotonic()
    table = [(label, session.test_accuracy(values)) for label, values in rows]
    print(f"\ntest lines {args.test_lines} (greedy; never scored by the search), measured in {(time.monotonic() - measured) / 60:.1f} min")
    print("| model | " + " | ".join(args.tasks) + " |\n|---|" + "---|" * len(args.tasks))
    for label, accuracies in table:
        print(f"| {label} | " + " | ".join(f"{a:.2f}" for a in accuracies) + " |")
    found = table[-1][1]
    parents = [max(acc[t] for _, acc in table[: len(args.tasks)]) for t in range(len(args.tasks))]
    kept = [f / p if p else 1.0 for f, p in zip(found, parents, strict=True)]
    print(f"found / best parent: {' '.join(f'{k:.2f}' for k in kept)}; goal (>= 0.95 on each) {'met' if min(kept) >= 0.95 else 'NOT met'}")
    print(f"load average at end: {os.getloadavg()}")
    if args.out:
        values = session.mixture.per_adapter(result.coefficients)
        args.out.write_text(json.dumps({name: v for name, v in zip(args.tasks, values, strict=True)}, indent=1))
    sys.exit(0)


def blackbox(args) -> None:
    from merger.orchestrator import check_recipe, run_recipe

    settings = Settings()
    store = Store(settings)
    models = [{"model": f"{args.base}+adapters/{name}", "parameters": {"weight": w, "density": d}}
              for name, w, d in zip(args.tasks, args.start, [0.3, 0.7], strict=True)]
    recipe = {"stages": [{"name": "fixtures-blackbox", "seed": args.seed, "search": {
        "searcher": "blackbox",
        "merge": {"merge_method": "ties", "base_model": args.base, "models": models, "dtype": "float32", "out_dtype": "bfloat16"},
        "vary": {"weight": [0.0, 1.5], "density": [0.1, 1.0]}, "granularity": {"modules": ["attention", "mlp"]},
        "tasks": [f"tasks/{name}.jsonl" for name in args.tasks], "test_lines": args.test_lines,
        "budget": {"trials": args.trials, "minutes": args.minutes}}}]}
    print(f"load average at start: {os.getloadavg()}; torch threads: {torch.get_num_threads()}", flush=True)
    started = time.monotonic()

    def report(event) -> None:
        if event.unit == "trials" and event.phase == "progress":
            print(f"trial {event.done}/{event.total} at {(time.monotonic() - started) / 60:.1f} min, best worst-task {event.best:.2f}", flush=True)

    [result] = run_recipe(check_recipe(recipe, settings, store, default_name="fixtures"), settings, store, report=report, force=True)
    record = result.model.origin["search"]
    print(f"search: {record['trials_this_run']} trials this run ({record['trials']} in the study) in {record['seconds'] / 60:.1f} min; "
          f"best trial {record['best_trial']}; whole stage {(time.monotonic() - started) / 60:.1f} min; load average {os.getloadavg()}")
    print(f"\ntest lines {args.test_lines} (greedy; never scored by the search)")
    print("| model | " + " | ".join(args.tasks) + " |\n|---|" + "---|" * len(args.tasks))
    for row in record["test_table"]:
        print(f"| {row['model']} | " + " | ".join(f"{a:.2f}" for a in row["test"]) + " |")
    kept = record["kept"]
    print(f"found / best parent: {' '.join('n/a' if k is None else f'{k:.2f}' for k in kept)}; model {result.model.id}")
    for h in record["history"]:
        print(f"trial {h['step']} {h['state']} exact {h['exact']} objective {[round(x, 3) for x in h['objective']]}"
              f"{' pareto' if h['pareto'] else ''}")
    if args.out:
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
