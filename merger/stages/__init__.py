"""The runners of the stage kinds: the closed table the orchestrator dispatches on.

A runner module provides ``plan(stage, loc, context) -> (StagePlan | None, [Problem])`` (resolve and
check, no heavy work) and, for a kind that makes a model, ``run(plan, inputs, out_dir, work_dir, report,
should_cancel) -> StageOutput``; for one that doesn't (``evaluate``), ``evaluate(plan, models, store, ...)``.
"""

from merger.stages import adapters, evaluate, extract_lora, merge, quantize, search

STAGE_RUNNERS = {"merge": merge, "adapters": adapters, "extract_lora": extract_lora, "quantize": quantize, "evaluate": evaluate,
                 "search": search}
