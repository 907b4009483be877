"""Seconds per learned step and per scoring pass of the search, on Gemma 3 270M with the two fixture tasks.

    MERGER_HOME=... .venv/bin/python benchmarks/search_trial.py [--steps 6] [--passes 3] [--threads 2] [--general FILE]

The search's resident session as the `search` stage opens it (base in float32, the sentiment and json LoRA
adapters attached, test lines 1-50 held back, lines 51-100 split into training and choosing lines). Then:

- scoring pass: one batched teacher-forced pass over every choosing line of both tasks (what a checkpoint,
  or a black-box trial, costs), ``--passes`` times;
- learned step: ``--steps`` steps of the learned searcher (``--examples`` examples each, forward and
  backward, Adam), timed one by one from its progress callback; the first step is reported apart (warm-up)
  and the last is not counted (it includes the final checkpoint);
- with ``--general FILE``: as many steps again with the general-text term on (one chunk of 128 tokens).

Prints the machine's load average before and after (the machine may be shared) and writes the figures as
JSON (``--out``, default benchmarks/.work/search-trial.json). The base is a stored model (``merger
import-gguf``); the fixtures are ../shared/fixtures beside the checkout (MERGER_FIXTURES overrides).
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from merger.search.learned import LearnOptions, learn
from merger.search.scoring import score
from merger.search.session import open_session
from merger.search.split import parse_lines
from merger.settings import Settings
from merger.store import Store

FIXTURES = Path(os.environ.get("MERGER_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
TASKS = ("sentiment", "json")
START = [0.25, 1.0]


def timed_steps(session, options: LearnOptions) -> list[float]:
    """Seconds of each learned step (checkpoints other than the start and the end are not taken)."""
    marks: list[float] = []

    def progress(step, _total, _checkpoint):
        marks.append(time.perf_counter())
        if len(marks) > 1:
            print(f"learned step {step}: {marks[-1] - marks[-2]:.1f} s", flush=True)

    learn(session.mixture, session.train, session.choose, options, pad_id=session.pad_id, general=session.general_chunks,
          progress=progress)
    # progress(0) comes after the start checkpoint, progress(k) after step k (and, for the last, after the end checkpoint)
    return [b - a for a, b in zip(marks[:-2], marks[1:-1], strict=True)]


def summary(seconds: list[float]) -> dict:
    return {"first": round(seconds[0], 2), "median_after_first": round(statistics.median(seconds[1:]), 2) if len(seconds) > 1 else None,
            "all": [round(s, 2) for s in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="gemma-3-270m", help="stored model (id, prefix or name)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--examples", type=int, default=LearnOptions.examples_per_step)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--general", type=Path, help="a general text: also time steps with the general-text term")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / ".work" / "search-trial.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    store = Store(Settings())
    load_before = os.getloadavg()
    opened = time.perf_counter()
    session = open_session(store.path_of(store.resolve(args.base)), [FIXTURES / "adapters" / t for t in TASKS],
                           [(FIXTURES / "tasks" / f"{t}.jsonl", t) for t in TASKS], parse_lines("1-50"), START,
                           general=(args.general, str(args.general)) if args.general else None,
                           general_tokens=128 if args.general else 0)
    results = {"threads": args.threads, "cores": os.cpu_count(), "load_before": load_before,
               "open_seconds": round(time.perf_counter() - opened, 1), "lora_modules": len(session.mixture.modules),
               "choosing_examples": len(session.choose), "examples_per_step": args.examples}

    passes = []
    for _ in range(args.passes):
        started = time.perf_counter()
        score(session.mixture.model, session.choose, len(TASKS), pad_id=session.pad_id)
        passes.append(time.perf_counter() - started)
        print(f"scoring pass over {len(session.choose)} examples: {passes[-1]:.1f} s", flush=True)
    results["scoring_pass_seconds"] = summary(passes)

    options = LearnOptions(steps=args.steps, examples_per_step=args.examples, check_every=args.steps + 1, minutes=60)
    results["learned_step_seconds"] = summary(timed_steps(session, options))
    if args.general:
        session.mixture.set(session.mixture.uniform(START))
        general = LearnOptions(steps=args.steps, examples_per_step=args.examples, check_every=args.steps + 1, minutes=60, general_weight=1.0)
        results["learned_step_with_general_seconds"] = summary(timed_steps(session, general))
    results["load_after"] = os.getloadavg()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
