"""Peak memory and seconds of each phase of the black-box search stage, on a real recipe with a small budget.

    MERGER_HOME=... MERGER_MODEL_ROOTS=... .venv/bin/python benchmarks/blackbox_memory.py \
        [--recipe recipes/gemma-tasks-blackbox.yaml] [--trials 2] [--threads 2]

Runs the stage's own ``run`` (``merger.stages.search_blackbox.run``) as ``merger search`` would, but writes
nothing to the store: the study goes to a fresh SQLite file and the merged model to a temporary directory.
A thread samples the process's RSS every 50 ms; each phase (loading the resident model and the composer,
the study, the test-line checks of the base, parents and start, writing the found merge, loading and checking
the found model) reports its wall seconds, CPU seconds (user+sys) and the highest RSS sampled in it, plus
the process's peak RSS (``ru_maxrss``). Prints the load average before and after and writes JSON (``--out``).
"""

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Sampler(threading.Thread):
    """The highest RSS seen since the last ``take``."""

    def __init__(self):
        super().__init__(daemon=True)
        self.highest = rss_bytes()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            self.highest = max(self.highest, rss_bytes())

    def take(self) -> int:
        highest, self.highest = max(self.highest, rss_bytes()), rss_bytes()
        return highest


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path(__file__).resolve().parents[1] / "recipes" / "gemma-tasks-blackbox.yaml")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / ".work" / "blackbox-memory.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="blackbox-memory-"))
    os.environ["MERGER_SEARCH_DATABASE_URL"] = f"sqlite:///{work / 'search.db'}"

    import torch

    import merger.search.blackbox as blackbox
    import merger.stages.search_blackbox as stage_module
    from merger.orchestrator import _plans, check_recipe
    from merger.safe_yaml import load_recipe_file
    from merger.settings import Settings
    from merger.store import Store

    torch.set_num_threads(args.threads)
    settings = Settings()
    store = Store(settings)
    data = load_recipe_file(args.recipe, max_bytes=settings.max_recipe_bytes)
    data["stages"][0]["search"]["budget"] = {"trials": args.trials, "minutes": 60}
    recipe = check_recipe(data, settings, store, default_name=args.recipe.stem)
    [plan] = _plans(recipe, settings, store, None)
    dirs = [store.path_of(store.get(i.source.model_id)) if i.source.kind == "store" else Path(i.source.path) for i in plan.inputs]

    sampler = Sampler()
    sampler.start()
    phases: list[dict] = []
    clock = {"wall": time.perf_counter(), "cpu": cpu_seconds()}

    def close(name: str) -> None:
        wall, cpu = time.perf_counter(), cpu_seconds()
        phases.append({"phase": name, "seconds": round(wall - clock["wall"], 1), "cpu_seconds": round(cpu - clock["cpu"], 1),
                       "highest_rss_gb": round(sampler.take() / 1e9, 2), "rss_after_gb": round(rss_bytes() / 1e9, 2)})
        print(json.dumps(phases[-1]), flush=True)
        clock.update(wall=wall, cpu=cpu)

    @contextmanager
    def patched(module, name: str, before: str | None, after: str | None):
        original = getattr(module, name)

        def wrapper(*a, **kw):
            if before:
                close(before)
            result = original(*a, **kw)
            if after:
                close(after)
            return result

        setattr(module, name, wrapper)
        try:
            yield
        finally:
            setattr(module, name, original)

    load_before = os.getloadavg()
    with patched(blackbox, "load_composer", "resident model and tokenizer", "load_composer"), \
            patched(blackbox, "run_study", None, f"study ({args.trials} trials, parents scored first)"), \
            patched(stage_module.merge_stage, "run", "test-line checks (base, parents, start)", "merge written (found recipe)"):
        stage_module.run(plan, dirs, work / "out", work, lambda event: None, lambda: False)
    close("found model loaded and checked")
    sampler.stop.set()

    results = {"recipe": str(args.recipe), "trials": args.trials, "threads": args.threads, "load_before": load_before,
               "load_after": os.getloadavg(), "phases": phases, "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
               "cpu_seconds": round(cpu_seconds(), 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "phases"}, indent=1))


if __name__ == "__main__":
    main()
