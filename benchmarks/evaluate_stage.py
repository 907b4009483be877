"""Run a recipe in this process (whatever merger is first on PYTHONPATH) and print, as JSON, its evaluate stage's
seconds and results. Used by benchmarks/evaluation.py on both checkouts, so it uses only APIs both have.

    python benchmarks/evaluate_stage.py RECIPE   (MERGER_HOME, MERGER_MODEL_ROOTS set)
"""

import json
import sys
from pathlib import Path

from merger.evaluation.table import headline
from merger.orchestrator import load_and_check, run_recipe
from merger.settings import Settings
from merger.store import Store

settings = Settings()
store = Store(settings)
results = run_recipe(load_and_check(Path(sys.argv[1]), settings, store), settings, store)
[stage] = [r for r in results if r.evaluation is not None]
print(json.dumps({"seconds": stage.seconds, "cache_hit": stage.cache_hit, "results": [
    {"model": r.subject.model.name, "metric": r.row.metric, "dataset": r.row.dataset, "value": headline(r.row),
     "seconds": r.row.seconds, "runtime": r.row.runtime, "cached": r.cache_hit} for r in stage.evaluation.results]}))
